"""The trained network as ONNX (and, if asked, TorchScript), each checked against PyTorch on the same inputs."""
import argparse
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dataset import Markup, out_file
from model import load_checkpoint, load_model, release_copy, save_atomic

OPSET = 17
# The check runs a batch of a size the export never saw, which proves the batch axis is dynamic.
EXPORT_BATCH, CHECK_BATCH = 2, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", default="runs/best.pt", help="weights from train.py (default: runs/best.pt)")
    parser.add_argument("--out", type=out_file, help="ONNX file to write (default: the weights path with .onnx)")
    parser.add_argument("--torchscript", action="store_true",
                        help="also write TorchScript, next to the ONNX file as .torchscript.pt")
    parser.add_argument("--release", metavar="FILE",
                        help="instead, write the weights in fp16 for release (as weights/ holds them) and check "
                             "that they predict as the original")
    return parser.parse_args(argv)


def write_release(args: argparse.Namespace) -> float:
    """The fp16 copy, and the largest difference between its predictions and the original's."""
    path = Path(args.release)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(release_copy(load_checkpoint(args.weights)), path)
    original, config = load_model(args.weights)
    released, _ = load_model(path)
    size = config.get("img_size", 224)
    inputs = torch.rand(CHECK_BATCH, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        difference = float((released(inputs) - original(inputs)).abs().max())
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); largest |fp16 copy - original| over "
          f"{CHECK_BATCH} random inputs: {difference:.2e}")
    return difference


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Input `image` (N, 1, S, S) in [-1, 1] -> output `landmarks` (N, 2K), N free."""
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated for torch.export's, which would add onnxscript
        # as a dependency; for a plain CNN both give the same graph, and this one runs with onnx alone.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=["landmarks"],
                          dynamic_axes={"image": {0: "batch"}, "landmarks": {0: "batch"}})


def add_markup(path: Path, config: dict) -> None:
    """The markup (point count, mirror twins, NME points) as the ONNX file's metadata "markup", in JSON, so
    that a runtime without this project still knows what the 2K outputs are."""
    import onnx
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "markup", json.dumps(Markup.from_config(config).to_config())
    onnx.save(model, str(path))


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # Deprecated in favour of torch.export, but still what libtorch (C++) and older runtimes load.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        traced.save(str(path))
        return torch.jit.load(str(path))


def onnx_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """The checked ONNX file as a function of a batch, run by onnxruntime on the CPU."""
    import onnx
    import onnxruntime
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"image": images.numpy()})[0]


def main(args: argparse.Namespace) -> float:
    """Writes the files and returns the largest |onnxruntime - PyTorch| over a batch of random inputs."""
    if args.release:
        return write_release(args)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"export.py needs onnx and onnxruntime ({e}): pip install onnx onnxruntime") from None
    model, config = load_model(args.weights, "cpu")
    size = config.get("img_size", 224)
    out = Path(args.out or Path(args.weights).with_suffix(".onnx"))
    out.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(EXPORT_BATCH, 1, size, size, generator=generator) * 2 - 1
    inputs = torch.rand(CHECK_BATCH, 1, size, size, generator=generator) * 2 - 1
    with torch.inference_mode():
        expected = model(inputs).numpy()

    export_onnx(model, example, out)
    add_markup(out, config)
    difference = float(np.abs(onnx_runner(out)(inputs) - expected).max())
    print(f"wrote {out} (opset {OPSET}, input 'image' (batch, 1, {size}, {size}), output 'landmarks' "
          f"(batch, {expected.shape[1]}): {expected.shape[1] // 2} points, x and y; metadata 'markup')")
    print(f"largest |onnxruntime - pytorch| over {CHECK_BATCH} random inputs: {difference:.2e}")

    if args.torchscript:
        script_path = out.with_suffix(".torchscript.pt")
        loaded = export_torchscript(model, example, script_path)
        with torch.inference_mode():
            scripted = loaded(inputs).numpy()
        print(f"wrote {script_path}; largest |torchscript - pytorch|: {np.abs(scripted - expected).max():.2e}")
    return difference


if __name__ == "__main__":
    main(parse_args())
