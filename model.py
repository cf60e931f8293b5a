"""The network (torchvision's ResNet18, 1 input channel, a regression or PIPNet head, 2K normalised coordinates out for K landmarks), saving and loading its weights, and its fast CPU form for inference."""
import copy
import math
import os
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from dataset import NUM_LANDMARKS, Markup

# The project's trained weights, committed once (README, "Trained weights"): the default of predict.py
# --image and --video.
RELEASED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "resnet18_300w_68.pt"
# A network as evaluate.py and predict.py call it: the nn.Module itself, or its optimized form.
Network = Callable[[torch.Tensor], torch.Tensor]
# ResNet18 halves its input five times: below 32 px its last feature map is under a pixel. Above 1024 px
# a batch of crops no longer fits in memory, and the labels are not that precise anyway.
MIN_IMG_SIZE, MAX_IMG_SIZE = 32, 1024


HEADS = ("regression", "pip")
# PIPNet's defaults (Jin et al. 2021): each landmark also predicts its 10 nearest neighbours in the mean shape.
PIP_NEIGHBOURS = 10


class PIPHead(nn.Module):
    """PIPNet's head on the backbone's stride-32 features: per landmark a score map, x/y offsets within the
    cell, and x/y offsets of its nearest neighbours from that cell.

    In training mode it returns the raw maps (train.py's pip_loss scores them); in eval mode it decodes them
    into (N, 2K) coordinates normalised to [-0.5, 0.5], each landmark averaged with what its neighbours'
    cells say of it, so the network keeps the contract of the regression head (and ONNX holds the decoding).
    """

    def __init__(self, in_channels: int, num_points: int, neighbours: int = PIP_NEIGHBOURS):
        super().__init__()
        # A markup of few points (dlib's 5) has fewer neighbours to ask.
        neighbours = min(neighbours, num_points - 1)
        self.num_points, self.neighbours = num_points, neighbours
        self.score = nn.Conv2d(in_channels, num_points, 1)
        self.offset = nn.Conv2d(in_channels, 2 * num_points, 1)
        self.neighbour_offset = nn.Conv2d(in_channels, 2 * num_points * neighbours, 1)
        # Filled by set_neighbours from the training faces' mean shape; saved with the weights.
        self.register_buffer("neighbour_index", torch.zeros(num_points, neighbours, dtype=torch.long))
        for conv in (self.score, self.offset, self.neighbour_offset):
            nn.init.normal_(conv.weight, std=0.001)
            nn.init.zeros_(conv.bias)

    def set_neighbours(self, mean_shape: torch.Tensor) -> None:
        """The nearest neighbours of each landmark in the mean shape (K, 2), itself excluded."""
        distance = torch.cdist(mean_shape.float(), mean_shape.float())
        distance.fill_diagonal_(math.inf)
        self.neighbour_index.copy_(distance.topk(self.neighbours, largest=False).indices)

    def maps(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (N, K, H, W), offsets (N, K, 2, H, W), neighbour offsets (N, K, M, 2, H, W)."""
        n, _, h, w = features.shape
        k, m = self.num_points, self.neighbours
        return (self.score(features), self.offset(features).view(n, k, 2, h, w),
                self.neighbour_offset(features).view(n, k, m, 2, h, w))

    def forward(self, features: torch.Tensor):
        scores, offsets, neighbour_offsets = self.maps(features)
        return (scores, offsets, neighbour_offsets) if self.training else self.decode(scores, offsets, neighbour_offsets)

    @staticmethod
    def read_cells(offsets: torch.Tensor, neighbour_offsets: torch.Tensor,
                   cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The offsets each landmark's map holds at its cell (`cells`: (N, K) flat indices): (N, K, 2) of its
        own and (N, K, M, 2) of its neighbours; what decoding reads and what the loss scores."""
        n, k, m = neighbour_offsets.shape[:3]
        own = offsets.flatten(3).gather(3, cells[:, :, None, None].expand(n, k, 2, 1)).squeeze(3)
        theirs = neighbour_offsets.flatten(4).gather(4, cells[:, :, None, None, None].expand(n, k, m, 2, 1))
        return own, theirs.squeeze(4)

    def decode(self, scores: torch.Tensor, offsets: torch.Tensor, neighbour_offsets: torch.Tensor) -> torch.Tensor:
        n, k, h, w = scores.shape
        m = self.neighbours
        best = scores.flatten(2).argmax(-1)                                   # (N, K): the winning cell
        cell = torch.stack([best % w, torch.div(best, w, rounding_mode="floor")], -1).to(offsets.dtype)
        own, theirs = self.read_cells(offsets, neighbour_offsets, best)
        own = (cell + own) / w                                                # (N, K, 2) in [0, 1]; crops are square
        theirs = (cell[:, :, None] + theirs) / w                              # (N, K, M, 2): landmark k's say on index[k]
        # Each landmark: the mean of its own estimate and of every estimate made of it from a neighbour's cell.
        spread = F.one_hot(self.neighbour_index.flatten(), k).to(own.dtype)   # (K*M, K)
        votes = torch.einsum("nsc,sk->nkc", theirs.reshape(n, k * m, 2), spread)
        merged = (own + votes) / (1 + spread.sum(0))[None, :, None]
        return (merged - 0.5).flatten(1)


def resnet_features(resnet: nn.Module) -> nn.Sequential:
    """torchvision ResNet's convolutional part, conv1 to layer4 (stride 32), without pooling or fc."""
    return nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2,
                         resnet.layer3, resnet.layer4)


class LandmarkNet(nn.Module):
    """ResNet18's convolutions (1-channel conv1) and a PIPNet head: the 'pip' head of build_model."""

    def __init__(self, backbone: nn.Module, num_points: int):
        super().__init__()
        self.backbone = resnet_features(backbone)
        self.head = PIPHead(backbone.fc.in_features, num_points)

    def forward(self, images: torch.Tensor):
        return self.head(self.backbone(images))


def build_model(pretrained: bool = False, head: str = "regression", num_points: int = NUM_LANDMARKS) -> nn.Module:
    """ResNet18 with a 1-channel conv1 and, as in the write-up, a 2 x num_points-value fc (`regression`);
    or its convolutions with PIPNet's head (`pip`). Either maps (N, 1, S, S) crops to (N, 2K) coordinates
    in eval mode.

    pretrained starts from torchvision's ImageNet weights, with conv1 averaged over RGB.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    model = torchvision.models.resnet18(weights=None)
    if pretrained:
        model.load_state_dict(imagenet_weights())
    rgb = model.conv1.weight.data
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if pretrained:
        model.conv1.weight.data = rgb.mean(dim=1, keepdim=True)
    if head == "pip":
        return LandmarkNet(model, num_points)
    model.fc = nn.Linear(model.fc.in_features, 2 * num_points)
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
    """Autocast for evaluate.py and predict.py: on CUDA only; on the CPU optimize_for_inference decides."""
    return autocast(device) if device.type == "cuda" else nullcontext()


class InferenceBody(nn.Module):
    """What optimize_for_inference traces: the network up to its outputs (the pip head's raw maps), in bf16
    up to the last layer when asked. That layer stays fp32: coordinates in bf16 carry only 8 bits, about
    0.3 px at 160 px, while bf16 convolutions cost nothing measurable (README, "Speed")."""

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
    does bf16 natively (`bf16=None` decides so; README, "Speed", has what each step gains).

    fp32 outputs match the eager model's to ~1e-5; bf16 ones to about 1e-3 of the crop, which leaves the
    validation NME unchanged to 0.01 (README). On CUDA the model comes back as it is: autocast is what
    speeds it up there. The model passed in is left untouched. fuse=False skips the oneDNN fuser.
    """
    if next(model.parameters()).device.type != "cpu":
        return model
    if bf16 is None:
        bf16 = has_native_bf16(torch.device("cpu"))
    example = torch.zeros(1, 1, img_size, img_size).contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(model).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    body = InferenceBody(model, bf16).eval()
    # PIPNet's decoding (argmax, gather) runs after the graph: oneDNN's fuser cannot compile it, and it is cheap.
    finish = (lambda maps: model.head.decode(*maps)) if body.pip else (lambda outputs: outputs)
    with warnings.catch_warnings(), torch.no_grad():
        # TorchScript is deprecated for torch.compile, which runs no faster here but needs a C++
        # compiler at run time and ~40 s to compile on 2 cores; trace + freeze takes under a second.
        warnings.simplefilter("ignore", FutureWarning)
        frozen = torch.jit.freeze(torch.jit.trace(body, example))

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
                return finish(frozen(images.contiguous(memory_format=torch.channels_last)))
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


def release_copy(checkpoint: dict) -> dict:
    """What weights/ ships: the network's floating tensors in fp16 (half the size; loading turns them back
    into fp32), the settings it was trained with and its validation figures; no optimiser state."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    kept = {k: checkpoint[k] for k in ("config", "epoch", "val_loss", "val_nme") if k in checkpoint}
    # Weights trained before markups were saved are iBUG's 68 points: the release says so in its own config.
    config = checkpoint.get("config", {})
    kept["config"] = config | {"markup": Markup.from_config(config).to_config()}
    return {"model": state, **kept}


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained network in eval mode, and the settings it was trained with (img_size, split seed, the
    markup: dataset.Markup.from_config reads it)."""
    checkpoint = load_checkpoint(path, device)
    config = checkpoint.get("config", {})
    model = build_model(head=config.get("head", "regression"), num_points=Markup.from_config(config).num_points)
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
