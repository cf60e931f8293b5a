"""The network (torchvision's ResNet18, 1 input channel, 136 outputs), saving and loading its weights, and its fast CPU form for inference."""
import copy
import os
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from dataset import NUM_LANDMARKS

# A network as evaluate.py and predict.py call it: the nn.Module itself, or its optimized form.
Network = Callable[[torch.Tensor], torch.Tensor]
# ResNet18 halves its input five times: below 32 px its last feature map is under a pixel. Above 1024 px
# a batch of crops no longer fits in memory, and the labels are not that precise anyway.
MIN_IMG_SIZE, MAX_IMG_SIZE = 32, 1024


def build_model(pretrained: bool = False) -> nn.Module:
    """ResNet18 with a 1-channel conv1 and a 2x68-value fc, as in the write-up.

    pretrained starts from torchvision's ImageNet weights, with conv1 averaged over RGB.
    """
    model = torchvision.models.resnet18(weights=None)
    if pretrained:
        model.load_state_dict(imagenet_weights())
    rgb = model.conv1.weight.data
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if pretrained:
        model.conv1.weight.data = rgb.mean(dim=1, keepdim=True)
    model.fc = nn.Linear(model.fc.in_features, 2 * NUM_LANDMARKS)
    return model


def imagenet_weights() -> dict:
    """torchvision's ResNet18 ImageNet weights, from torch's hub cache or the internet."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except OSError as e:  # URLError is an OSError: no network, DNS failure, refused
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise SystemExit(f"--pretrained: cannot download {weights.url} ({e}); "
                         f"without internet, put that file at {cache}") from None


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` means the GPU when there is one."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp16 where bf16 is missing); plain fp32 on the CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def optimize_for_inference(model: nn.Module, img_size: int, fuse: bool = True) -> Network:
    """The same network, faster on the CPU: traced, frozen (batch norm folded into the convolutions)
    and run by oneDNN's graph fuser in channels-last layout; outputs match the eager model's to ~1e-5.

    At batch 1 and 224 px it runs about 1.9x faster than the model as loaded, where tracing and freezing
    alone gain about 1.2x and onnxruntime is about as fast (README, "Speed"; benchmark.py measures it).
    On CUDA the model comes back as it is: autocast is what speeds it up there. The model passed in is
    left untouched. fuse=False skips the oneDNN fuser (benchmark.py measures what it adds).
    """
    if next(model.parameters()).device.type != "cpu":
        return model
    example = torch.zeros(1, 1, img_size, img_size).contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.no_grad():
        # TorchScript is deprecated for torch.compile, which runs no faster here but needs a C++
        # compiler at run time and ~40 s to compile on 2 cores; trace + freeze takes under a second.
        warnings.simplefilter("ignore", FutureWarning)
        frozen = torch.jit.freeze(torch.jit.trace(model, example))

    # torch on macOS and Windows lacks oneDNN Graph: there the frozen graph runs as it is.
    fuser = fuse and hasattr(torch._C, "_jit_llga_enabled")

    def run(images: torch.Tensor) -> torch.Tensor:
        # The fuser's switch is global, and some other TorchScript (mkldnn-layout graphs) breaks under it:
        # on only while this network runs, which is when TorchScript builds and rebuilds its fused graph.
        # (torch.jit.fuser("fuser3") would do this, but warns about nvFuser on every call.)
        previous = fuser and torch.jit.onednn_fusion_enabled()
        if fuser:
            torch.jit.enable_onednn_fusion(True)
        try:
            with torch.no_grad():
                return frozen(images.contiguous(memory_format=torch.channels_last))
        finally:
            if fuser:
                torch.jit.enable_onednn_fusion(previous)

    for _ in range(3):  # TorchScript profiles the first calls and fuses after; pay that here, not on a face
        run(example)
    return run


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file, then rename: a crash or a full disk never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict:
    """A file written by train.py; one clear line if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no such weights file; train first with `python train.py`")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for broken files
        raise SystemExit(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise SystemExit(f"{path}: not a weights file written by train.py (no 'model' entry)")
    return checkpoint


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained network in eval mode, and the settings it was trained with (img_size, split seed...)."""
    checkpoint = load_checkpoint(path, device)
    model = build_model()
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise SystemExit(f"{path}: weights do not fit this model ({first})") from None
    return model.to(device).eval(), checkpoint.get("config", {})


def load_for_inference(path: Path, device: str | torch.device = "cpu",
                       eager: bool = False) -> tuple[Network, dict]:
    """What evaluate.py and predict.py run: the trained network, made fast for the CPU unless `eager`."""
    model, config = load_model(path, device)
    return (model if eager else optimize_for_inference(model, config.get("img_size", 224))), config
