"""Running the network: the device, the bf16 policy (native bf16 only), and the traced, frozen and fused CPU form that evaluate, predict and video use."""
import copy
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn as nn

from errors import UsageError
from model import LandmarkNet, resnet_features

# A network as evaluate.py and predict.py call it: the nn.Module itself, or its optimized form.
Network = Callable[[torch.Tensor], torch.Tensor]


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` means the GPU when there is one; UsageError in one line for a device this machine lacks."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device={name}: not a device name; expected cpu, cuda, cuda:N or auto", "device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={name}: this machine has no CUDA GPU that torch can use; use cpu", "device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA GPUs", "device")
    return device


AMP_CHOICES = ("auto", "bf16", "off")


def has_native_bf16(device: torch.device) -> bool:
    """Does the device do bf16 matrix work in hardware: CUDA with bf16, or a CPU with AVX512-BF16 or AMX?

    Not torch.ops.mkldnn._is_mkldnn_bf16_supported(): it also says yes to plain AVX512, where oneDNN
    emulates bf16 and runs slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_amp(amp: str, device: torch.device) -> str:
    """train.py's --amp: `auto` becomes `bf16` where the device has it natively, `off` elsewhere."""
    if amp == "auto":
        return "bf16" if has_native_bf16(device) else "off"
    return amp


def autocast(device: torch.device, amp: str = "auto"):
    """Mixed precision for training and GPU inference: bf16 autocast when `amp` resolves to bf16 (on CUDA
    without bf16, fp16), plain fp32 otherwise."""
    if device.type == "cuda" and amp != "off":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if resolve_amp(amp, device) == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def inference_autocast(device: torch.device):
    """Autocast for evaluate.py's batches of crops: on CUDA only; on the CPU optimize_for_inference decides.
    (The Landmarker sets its own, from its dtype option.)"""
    return autocast(device) if device.type == "cuda" else nullcontext()


class InferenceBody(nn.Module):
    """What optimize_for_inference traces: the network up to its outputs (the pip head's raw maps), in bf16
    up to the last layer when asked. That layer stays fp32: coordinates in bf16 carry only 8 bits, about
    0.3 px at 160 px, while bf16 convolutions cost nothing measurable (docs/results.md, "Speed")."""

    def __init__(self, model: nn.Module, bf16: bool):
        super().__init__()
        self.pip = isinstance(model, LandmarkNet)
        if self.pip:
            self.body, self.last = model.backbone, model.head
        else:
            self.body = nn.Sequential(*resnet_features(model), model.avgpool, nn.Flatten(1))
            self.last = model.fc
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.body.to(self.dtype)

    def forward(self, images: torch.Tensor):
        features = self.body(images.to(self.dtype)).float()
        return self.last.maps(features) if self.pip else self.last(features)


def optimize_for_inference(model: nn.Module, img_size: int, fuse: bool = True, bf16: bool | None = None) -> Network:
    """The same network, faster on the CPU: traced, frozen (batch norm folded into the convolutions)
    and run by oneDNN's graph fuser in channels-last layout; in bf16 up to the last layer where the CPU
    does bf16 natively (`bf16=None` decides so; docs/results.md, "Speed", has what each step gains).

    fp32 outputs match the eager model's to ~1e-5; bf16 ones to about 1e-3 of the crop, which leaves the
    validation NME unchanged to 0.01 (README). On CUDA the model comes back as it is: autocast is what
    speeds it up there. The model passed in is left untouched. fuse=False skips the oneDNN fuser.
    """
    if next(model.parameters()).device.type != "cpu":
        return model
    return fast_network(frozen_body(model, img_size, bf16), pip_head_of(model), img_size, fuse)


def pip_head_of(model: nn.Module) -> nn.Module | None:
    """The pip head, whose decoding runs after the frozen graph; None for the regression head, which has none."""
    return model.head if isinstance(model, LandmarkNet) else None


def frozen_body(model: nn.Module, img_size: int, bf16: bool | None = None) -> torch.jit.ScriptModule:
    """optimize_for_inference's first half, what network_cache keeps on disk: the InferenceBody traced on
    one channels-last crop and frozen."""
    if bf16 is None:
        bf16 = has_native_bf16(torch.device("cpu"))
    model = copy.deepcopy(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    body = InferenceBody(model, bf16).eval()
    with warnings.catch_warnings(), torch.no_grad():
        # TorchScript is deprecated for torch.compile, which runs no faster here but needs a C++
        # compiler at run time and ~40 s to compile on 2 cores; trace + freeze takes under a second.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.freeze(torch.jit.trace(body, example_crop(img_size)))


def example_crop(img_size: int) -> torch.Tensor:
    return torch.zeros(1, 1, img_size, img_size).contiguous(memory_format=torch.channels_last)


def fast_network(frozen: torch.jit.ScriptModule, pip_head: nn.Module | None, img_size: int,
                 fuse: bool = True, batched: bool = False) -> "InferenceNetwork":
    """optimize_for_inference's second half: the frozen body (from frozen_body, or loaded back) with the pip
    head's decoding after it, warmed up."""
    # torch on macOS and Windows lacks oneDNN Graph: there the frozen graph runs as it is.
    fast = InferenceNetwork(frozen, pip_head, fuse and hasattr(torch._C, "_jit_llga_enabled"), batched)
    for _ in range(3):  # TorchScript profiles the first calls and fuses after; pay that here, not on a face
        fast(example_crop(img_size))
    return fast


class InferenceNetwork:
    """optimize_for_inference's network: called on crops it gives (N, 2K) coordinates, as the model does;
    with_scores also gives each point's score, (N, K), or None for the regression head. `batched`: the body
    takes a batch of any size at one call (onnxruntime's), instead of one crop at a time (TorchScript's)."""

    def __init__(self, frozen, pip_head: nn.Module | None, fuser: bool, batched: bool = False):
        self.frozen, self.pip_head, self.fuser, self.batched = frozen, pip_head, fuser, batched

    def outputs(self, images: torch.Tensor):
        # The fuser's switch is global, and some other TorchScript (mkldnn-layout graphs) breaks under it:
        # on only while this network runs, which is when TorchScript builds and rebuilds its fused graph.
        # (torch.jit.fuser("fuser3") would do this, but warns about nvFuser on every call.)
        previous = self.fuser and torch.jit.onednn_fusion_enabled()
        if self.fuser:
            torch.jit.enable_onednn_fusion(True)
        try:
            with torch.no_grad():
                return self.frozen(images.contiguous(memory_format=torch.channels_last))
        finally:
            if self.fuser:
                torch.jit.enable_onednn_fusion(previous)

    def with_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        # One crop at a time: TorchScript specialises its fused graph on the input's shape, and a photo's
        # varying face count re-specialised it on every new batch size (40-130 ms a call instead of one
        # face's time); on this CPU a batch of 32 costs per face about what 32 single crops cost.
        # onnxruntime has no such graph: there two faces in one call cost 11.5 ms against 13.8 ms for two calls.
        if not self.batched:
            parts = [self.outputs(image[None]) for image in images]
            outputs = torch.cat(parts) if self.pip_head is None else tuple(torch.cat(p) for p in zip(*parts))
            return self.decoded(outputs)
        # onnxruntime and OpenVINO bring threads of their own: torch's, woken for the small decoding between their
        # calls, only fought them for the cores (OpenVINO's 1.7 ms a face became 3.2 with torch's 2 threads, 2.5
        # with one).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.decoded(self.outputs(images))
        finally:
            torch.set_num_threads(threads)

    def decoded(self, outputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pip_head is None:
            return outputs, None
        # PIPNet's decoding (argmax, gather) runs after the graph: oneDNN's fuser cannot compile it, and it is cheap.
        return self.pip_head.decode(*outputs), self.pip_head.point_scores(outputs[0])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.with_scores(images)[0]


def points_and_scores(network: Network, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Coordinates (N, 2K) and point scores (N, K) from any form of the network: the fast one, the model
    itself (a PIPNet head has score maps; the regression head has none, and gives None)."""
    if isinstance(network, InferenceNetwork):
        return network.with_scores(images)
    if isinstance(network, LandmarkNet) and not network.training:
        maps = network.head.maps(network.backbone(images))
        return network.head.decode(*maps), network.head.point_scores(maps[0])
    return network(images), None
