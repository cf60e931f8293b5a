"""Weights on disk: train.py's checkpoints, written atomically and loaded with weights_only; the release file that weights/ ships; torchvision's ImageNet start."""
import pickle
import re
import statistics
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from errors import UsageError, WeightsError
from files import save_with
from labels import TRAIN_XML
from landmarks import IBUG, Markup
from model import PIPHead, build_model
from network_cache import (cache_path, choice_path, cpu_name, read_choice, read_frozen, read_int8, write_choice,
                           write_frozen, write_int8)
from quantized import CALIBRATION_KEY, int8_runner, int8_supported, openvino_runner, openvino_supported, quantize_body
from runtime import Network, fast_network, frozen_body, has_native_bf16, pip_head_of

# The project's trained weights, committed once (docs/training.md, "Trained weights"): the default of predict.py
# --image and --video.
RELEASED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "resnet18_300w_68.pt"
# What best.pt keeps of a training state: enough to predict, evaluate and release, not to resume.
BEST_KEYS = ("model", "config", "epoch", "val_loss", "val_nme", "labels_sha256")
# How a torch.save file starts: a zip (since PyTorch 1.6), or the pickle protocol byte of the legacy format.
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def imagenet_weights() -> dict:
    """torchvision's ResNet18 ImageNet weights, from torch's hub cache or the internet."""
    import torchvision  # only here and in model.build_model: importing it takes ~2 s (model.py says why)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except OSError as e:  # URLError is an OSError: no network, DNS failure, refused
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsError(f"--pretrained: cannot download {weights.url} ({e}); "
                           f"without internet, put that file at {cache}") from None


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash or a full disk never leaves a half-written file."""
    save_with(path, lambda tmp: torch.save(obj, tmp))


def save_or_warn(state: dict, path: Path) -> bool:
    """A failed save (full disk, say) keeps the previous file and the run goes on; False then."""
    try:
        save_atomic(state, path)
        return True
    except (OSError, RuntimeError) as e:
        print(f"warning: could not write {path} ({e}); the previous {path.name} is kept", file=sys.stderr)
        return False


def save_checkpoint(state: dict, is_best: bool, out: Path) -> None:
    """pytorch/examples' habit: OUT/last.pt holds the whole state, to resume from; OUT/best.pt, when this
    epoch is the best so far, only the weights, the settings and the scores."""
    if is_best:
        save_or_warn({k: state[k] for k in BEST_KEYS if k in state}, out / "best.pt")
    save_or_warn(state, out / "last.pt")


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict:
    """A file written by train.py; WeightsError, in one line, if it is missing, unreadable, or holds more than
    tensors and plain values (weights_only refuses to run the code a hostile pickle carries)."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: a folder, not a weights file; pass the .pt file inside it")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file; train first with `python train.py`")
    try:
        with open(path, "rb") as f:
            start = f.read(len(ZIP_MAGIC))
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from None
    if not (start.startswith(ZIP_MAGIC) or start.startswith(PICKLE_MAGIC)):
        raise WeightsError(f"{path}: not a readable weights file (not one torch.save wrote)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL (\S+)", str(e))  # what weights_only refused to build
        if not wanted:
            raise WeightsError(f"{path}: not a readable weights file (not one torch.save wrote)") from None
        raise WeightsError(f"{path}: refused: it asks to run {wanted[1]}, and weights hold only tensors and "
                           f"plain values (load only files you trust)") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for broken or foreign files
        if "central directory" in str(e):  # the zip's index is at its end: what a cut-short copy loses first
            raise WeightsError(f"{path}: not a readable weights file (cut short: its zip index is missing)") from None
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise WeightsError(f"{path}: not a readable weights file ({type(e).__name__}: {first})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise WeightsError(f"{path}: not a weights file written by train.py (no 'model' entry of weights)")
    if not isinstance(checkpoint.get("config", {}), dict):
        raise WeightsError(f"{path}: not a weights file written by train.py (its 'config' is not settings)")
    return checkpoint


@dataclass(frozen=True)
class NetworkConfig:
    """What a checkpoint's settings say to everything after training, typed, with the write-up's defaults for
    what older files leave out: the network (head, features, input size, markup) and the split it was trained
    on. Made from the checkpoint in this one place (of), as nanoGPT rebuilds GPTConfig(**model_args); no other
    file reads the raw settings but train.py, which resumes them whole."""
    head: str = "regression"
    features: str = "stride32"
    img_size: int = 224
    markup: Markup = IBUG
    data_dir: str = "data"
    xml: str = TRAIN_XML
    seed: int = 0
    val_fraction: float = 0.1
    skip_bad: bool = False

    @classmethod
    def of(cls, checkpoint: dict) -> "NetworkConfig":
        config = checkpoint.get("config", {})
        given = {f.name: config[f.name] for f in fields(cls) if f.name != "markup" and config.get(f.name) is not None}
        return cls(**given, markup=Markup.from_saved(config.get("markup")))

    def network(self) -> dict:
        """What fixes the network beyond its weights' shapes: the head, the features and the number of points
        (weights of another kind may still load, and then mean something else)."""
        return {"head": self.head, "features": self.features, "points": self.markup.num_points}


def misfit(model: nn.Module, state: dict) -> str | None:
    """How a state dict fails to fit the model, in a few words, or None if it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    other = [k for k in own if k in state and getattr(state[k], "shape", None) != own[k].shape]
    problems = [f"{len(keys)} {what} (first: {keys[0]})" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", other)) if keys]
    return "; ".join(problems) or None


def release_copy(checkpoint: dict, calibration: torch.Tensor | None = None) -> dict:
    """What weights/ ships: the network's floating tensors in fp16 (half the size; loading turns them back
    into fp32), the settings it was trained with, its validation figures and its labels' fingerprint (which
    train.py --init checks); no optimiser state. With `calibration` (quantized.CALIBRATION_KEY's crops), or
    the checkpoint's own, the file also runs in int8."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    kept = {k: checkpoint[k] for k in ("config", "epoch", "val_loss", "val_nme", "labels_sha256", CALIBRATION_KEY)
            if k in checkpoint}
    if calibration is not None:
        kept[CALIBRATION_KEY] = calibration
    # Weights trained before markups were saved are iBUG's 68 points: the release says so in its own config.
    kept["config"] = checkpoint.get("config", {}) | {"markup": NetworkConfig.of(checkpoint).markup.to_config()}
    return {"model": state, **kept}


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, NetworkConfig]:
    """The trained network in eval mode, and the settings it was trained with."""
    checkpoint = load_checkpoint(path, device)
    return model_from(checkpoint, path).to(device).eval(), NetworkConfig.of(checkpoint)


def model_from(checkpoint: dict, path: Path) -> nn.Module:
    """The network a loaded checkpoint describes, with its weights; WeightsError where they do not fit."""
    try:
        config = NetworkConfig.of(checkpoint)
        model = build_model(config.head, config.markup.num_points, features=config.features)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise WeightsError(f"{path}: its settings are not ones train.py writes ({type(e).__name__}: {e})") from None
    problem = misfit(model, checkpoint["model"])
    if problem:
        raise WeightsError(f"{path}: weights do not fit this model: {problem}")
    model.load_state_dict(checkpoint["model"])
    if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
        raise WeightsError(f"{path}: the weights hold NaN or infinite values (the run that wrote them diverged)")
    return model


PRECISIONS = ("auto", "openvino-int8", "int8", "bf16", "fp32")
# How long each candidate path is timed, at one crop a call, when the fastest is chosen (a first start only).
TIMING_SECONDS = 0.4


def load_for_inference(path: Path, device: str | torch.device = "cpu", eager: bool = False, int8: bool = True,
                       precision: str = "auto") -> tuple[Network, NetworkConfig]:
    """What evaluate.py and predict.py run: the trained network, made fast for the CPU unless `eager`. The
    candidates are cpu_candidates': int8 by OpenVINO or by onnxruntime (where `int8` allows and the weights
    carry calibration crops: quantized.py), the frozen network in bf16 (where the CPU does bf16 in hardware)
    and in fp32; with
    `precision` "auto" the fastest of them on this CPU, timed on the first start with these weights and the
    choice kept in the cache (network_cache.choice_path), else the one named. Each fast form is kept on disk
    too, so only the first start builds it. The network says which it is (.precision) and what each
    candidate took (.timed, milliseconds a crop; empty where nothing was timed). With the cache switched off
    nothing is timed (there is nowhere to keep the choice): the first candidate runs, int8 before bf16."""
    checkpoint = load_checkpoint(path, device)
    config = NetworkConfig.of(checkpoint)
    if eager or torch.device(device).type != "cpu":
        return model_from(checkpoint, path).to(device).eval(), config
    candidates = cpu_candidates(checkpoint, int8)
    if precision != "auto":
        if precision not in candidates:
            raise UsageError(f"precision={precision}: {missing_reason(precision, checkpoint, int8)}", "precision")
        candidates = [precision]
    where = choice_path(path, config.img_size, candidates)
    kept = read_choice(where) if len(candidates) > 1 else None
    if kept is not None and kept["precision"] in candidates:
        return labelled(build_fast([kept["precision"]], checkpoint, path, config)[0], kept), config
    if len(candidates) == 1 or where is None:  # nothing to choose, or nowhere to keep the choice: the first
        return labelled(build_fast(candidates[:1], checkpoint, path, config)[0], {"precision": candidates[0]}), config
    networks = build_fast(candidates, checkpoint, path, config)
    timed = {p: round(time_network(net, config.img_size), 3) for p, net in zip(candidates, networks)}
    choice = {"precision": min(timed, key=timed.get), "ms": timed, "cpu": cpu_name(), "threads": torch.get_num_threads()}
    write_choice(where, choice)
    return labelled(networks[candidates.index(choice["precision"])], choice), config


def choose_ahead(path: Path, int8: bool, threads: int) -> None:
    """The fastest CPU path for these weights timed and kept now, at `threads` threads, unless it is kept
    already: what photos.py does once before its worker processes start, so that they load the choice rather
    than each time the paths while the others build theirs."""
    checkpoint = load_checkpoint(path)
    candidates = cpu_candidates(checkpoint, int8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        where = choice_path(path, NetworkConfig.of(checkpoint).img_size, candidates)
        if len(candidates) > 1 and where is not None and read_choice(where) is None:
            load_for_inference(path, "cpu", int8=int8)
    finally:
        torch.set_num_threads(previous)


def cpu_candidates(checkpoint: dict, int8: bool) -> list[str]:
    """The CPU paths these weights can run on this CPU, the fastest measured first (docs/scripts.md): int8 by
    OpenVINO where it is installed, int8 by onnxruntime where the CPU has VNNI (both need calibration crops),
    the frozen network in bf16 where the CPU does bf16 in hardware, and in fp32."""
    crops = int8 and CALIBRATION_KEY in checkpoint
    found = (["openvino-int8"] if crops and openvino_supported() else []) + (["int8"] if crops and int8_supported() else [])
    return found + (["bf16"] if has_native_bf16(torch.device("cpu")) else []) + ["fp32"]


def missing_reason(precision: str, checkpoint: dict, int8: bool) -> str:
    if precision == "bf16":
        return "this CPU does not do bf16 in hardware (AVX512-BF16 or AMX); fp32 is the same network"
    if precision == "openvino-int8" and not openvino_supported():
        return "OpenVINO is not installed: pip install openvino"
    if not int8:
        return "int8 is switched off (int8=False, --no-int8)"
    if CALIBRATION_KEY not in checkpoint:
        return "these weights carry no calibration crops; write them with export.py --release --data-dir"
    return "this CPU has no AVX512-VNNI (or onnxruntime is not installed)"


def build_fast(precisions: list[str], checkpoint: dict, path: Path, config: NetworkConfig) -> list[Network]:
    """Each named fast form: the int8 network, or the frozen one in bf16 or fp32, from the cache or built now
    and kept."""
    built = []
    for precision in precisions:
        if precision in ("int8", "openvino-int8"):
            built.append(int8_network(checkpoint, path, config.img_size, openvino=precision == "openvino-int8"))
            continue
        entry = cache_path(path, config.img_size, precision)
        frozen = read_frozen(entry)
        if frozen is not None:
            built.append(fast_network(frozen, pip_head_from(checkpoint), config.img_size))
            continue
        model = model_from(checkpoint, path).eval()
        frozen = frozen_body(model, config.img_size, precision == "bf16")
        write_frozen(entry, frozen)
        built.append(fast_network(frozen, pip_head_of(model), config.img_size))
    return built


def time_network(network: Network, img_size: int) -> float:
    """Median milliseconds of one crop through the network, decoding included, over TIMING_SECONDS."""
    crop = torch.zeros(1, 1, img_size, img_size)
    times, until = [], time.perf_counter() + TIMING_SECONDS
    while time.perf_counter() < until or len(times) < 5:
        start = time.perf_counter()
        network.with_scores(crop)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def labelled(network: Network, choice: dict) -> Network:
    network.precision, network.timed = choice["precision"], choice.get("ms", {})
    return network


def int8_network(checkpoint: dict, path: Path, img_size: int, openvino: bool = False) -> Network:
    """The int8 network of a checkpoint with calibration crops, for onnxruntime or (`openvino`) OpenVINO, from
    the cache or quantized now (a few seconds) and kept."""
    crops = checkpoint[CALIBRATION_KEY]
    if not (isinstance(crops, torch.Tensor) and crops.dtype == torch.uint8 and crops.dim() == 4
            and len(crops) > 0 and tuple(crops.shape[1:]) == (1, img_size, img_size)):
        raise WeightsError(f"{path}: its '{CALIBRATION_KEY}' entry is not (N, 1, {img_size}, {img_size}) uint8 "
                           f"crops; write it again with export.py --release, or pass --no-int8")
    entry = cache_path(path, img_size, "openvino-int8" if openvino else "int8")

    def runner(model_bytes: bytes, head: PIPHead | None) -> Network:
        if openvino:
            return openvino_runner(model_bytes, head, img_size, has_native_bf16(torch.device("cpu")),
                                   None if entry is None else entry.parent / "openvino")
        return int8_runner(model_bytes, head, img_size)

    kept = read_int8(entry)
    if kept is not None:
        try:
            return runner(kept, pip_head_from(checkpoint))
        except Exception:  # onnxruntime's and OpenVINO's errors derive from Exception alone: a torn entry is built again
            pass
    model = model_from(checkpoint, path).eval()
    model_bytes = quantize_body(model, img_size, crops, pairs=openvino)
    write_int8(entry, model_bytes)
    return runner(model_bytes, pip_head_of(model))


def pip_head_from(checkpoint: dict) -> PIPHead | None:
    """The pip head alone, for decoding the maps a kept frozen network gives; None for the regression head.
    Only weights whose whole network once loaded (model_from) have a kept frozen form."""
    if NetworkConfig.of(checkpoint).head != "pip":
        return None
    state = {k.removeprefix("head."): v for k, v in checkpoint["model"].items() if k.startswith("head.")}
    head = PIPHead(state["score.weight"].shape[1], state["score.weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()
