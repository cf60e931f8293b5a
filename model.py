"""The network (torchvision's ResNet18, 1 input channel, 136 outputs) and saving and loading its weights."""
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from dataset import NUM_LANDMARKS


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
