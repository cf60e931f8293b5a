"""The network as files other runtimes load: ONNX with its markup as metadata, and TorchScript; each written atomically, and ONNX run back through onnxruntime."""
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from errors import UsageError
from files import save_with

OPSET = 17


def require_onnx() -> None:
    """UsageError in one line where onnx or onnxruntime is missing, before any work."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UsageError(f"export.py needs onnx and onnxruntime ({e}): pip install onnx onnxruntime") from None


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, markup: dict | None = None) -> None:
    """Input `image` (N, 1, S, S) in [-1, 1] -> output `landmarks` (N, 2K), N free; `markup` (the config
    of landmarks.Markup) as the file's metadata "markup", in JSON, so that a runtime without this project
    still knows what the 2K outputs are."""
    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated for torch.export's, which would add onnxscript
            # as a dependency; for a plain CNN both give the same graph, and this one runs with onnx alone.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["landmarks"],
                              dynamic_axes={"image": {0: "batch"}, "landmarks": {0: "batch"}})
        if markup is not None:
            add_metadata(tmp, "markup", json.dumps(markup))

    save_with(path, write)


def add_metadata(path: Path, key: str, value: str) -> None:
    import onnx
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value
    onnx.save(model, str(path))


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # Deprecated in favour of torch.export, but still what libtorch (C++) and older runtimes load.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        save_with(path, lambda tmp: traced.save(str(tmp)))
        return torch.jit.load(str(path))


def onnx_runner(path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """The checked ONNX file as a function of a batch, run by onnxruntime on the CPU."""
    import onnx
    import onnxruntime
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"image": images.numpy()})[0]
