"""The fast CPU network of a weights file, kept on disk between runs: a later start loads it in a tenth of a second instead of building it again (tracing and freezing, or quantizing to int8), and never imports torchvision."""
import json
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from files import file_sha256, save_with

# The folder: $FACE_LANDMARKS_CACHE where it is set (empty: no cache), else $XDG_CACHE_HOME/face-landmarks,
# else ~/.cache/face-landmarks.
CACHE_ENV = "FACE_LANDMARKS_CACHE"
# Each entry is the network once more (about 23 MB in bf16, 45 in fp32, 14 in int8): the least recently used go
# first.
KEEP = 8
# Only files of these endings are entries: a folder named by $FACE_LANDMARKS_CACHE may hold the user's own .pt
# or .onnx files, and those are never dropped. The frozen TorchScript network (bf16 or fp32), the int8 ONNX one
# for onnxruntime, and the one of quantize/dequantize pairs for OpenVINO.
SUFFIXES = {"bf16": ".frozen.pt", "fp32": ".frozen.pt", "int8": ".int8.onnx", "openvino-int8": ".qdq.onnx"}
# Which of them ran fastest on this CPU, and in how many milliseconds each (checkpoints.load_for_inference).
CHOICE_SUFFIX = ".choice.json"


def cache_dir() -> Path | None:
    """Where frozen networks are kept, or None when the user switched the cache off."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return Path(chosen).expanduser() if chosen else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "face-landmarks"


def cpu_name() -> str:
    """This CPU's model, as /proc/cpuinfo names it (Linux), else as the platform does: the fastest path is
    chosen per CPU, and a cache folder shared between machines keeps each one's choice."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choice_path(weights: Path, img_size: int, candidates: list[str]) -> Path | None:
    """Where the choice of the fastest path for these weights on this CPU is kept, among these candidates and
    at torch's thread count now (a run with int8 switched off, or a one-thread worker, chooses for itself);
    None with no cache."""
    return cache_path(weights, img_size, f"choice of {'+'.join(candidates)} on {cpu_name()}, "
                                         f"{torch.get_num_threads()} threads")


def read_choice(path: Path | None) -> dict | None:
    """The kept choice ({"precision": ..., "ms": {...}, "cpu": ...}), or None where there is none or it is garbled."""
    if path is None or not path.is_file():
        return None
    try:
        choice = json.loads(path.read_text())
        return choice if isinstance(choice, dict) and isinstance(choice.get("precision"), str) else None
    except (OSError, ValueError):
        return None


def write_choice(path: Path | None, choice: dict) -> None:
    keep(path, lambda tmp: tmp.write_text(json.dumps(choice)))


def cache_path(weights: Path, img_size: int, precision: str) -> Path | None:
    """The entry for these weights' bytes, built at this size and precision (a key of SUFFIXES) by this torch;
    None with no cache. The bytes, not the name: retrained weights at the same path never meet an old entry."""
    folder = cache_dir()
    if folder is None:
        return None
    digest = file_sha256(weights, f"|{img_size}|{precision}|torch {torch.__version__}")
    return folder / f"{digest.hexdigest()[:40]}{SUFFIXES.get(precision, CHOICE_SUFFIX)}"


def read_frozen(path: Path | None) -> torch.jit.ScriptModule | None:
    """The frozen network kept at `path`, or None where there is none or it cannot be read (it is then
    built again and written over)."""
    if path is None or not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation (runtime.frozen_body)
            frozen = torch.jit.load(str(path), map_location="cpu")
        os.utime(path)  # used now: the last to be dropped
        return frozen
    except (RuntimeError, OSError, ValueError):
        return None


def write_frozen(path: Path | None, frozen: torch.jit.ScriptModule) -> None:
    """Keep `frozen` at `path` (see keep)."""
    def save(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(frozen, str(tmp))
    keep(path, save)


def read_int8(path: Path | None) -> bytes | None:
    """The int8 ONNX model kept at `path`, or None where there is none. Whether its bytes make a model is
    for onnxruntime to say: a torn entry is built again and written over."""
    if path is None or not path.is_file():
        return None
    try:
        data = path.read_bytes()
        os.utime(path)
        return data
    except OSError:
        return None


def write_int8(path: Path | None, model_bytes: bytes) -> None:
    keep(path, lambda tmp: tmp.write_bytes(model_bytes))


def keep(path: Path | None, save: Callable[[Path], object]) -> None:
    """Write an entry at `path` atomically with `save(tmp)`, and drop the least recently used entries beyond
    KEEP. A cache that cannot be written (read-only home, full disk) costs only the next start's time, so it
    is skipped."""
    if path is None:
        return
    try:
        save_with(path, save)
        entries = [p for suffix in set(SUFFIXES.values()) for p in path.parent.glob(f"*{suffix}")]
        for old in sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:]:
            old.unlink(missing_ok=True)
    except (RuntimeError, OSError):
        pass
