"""The int8 CPU networks: the body as ONNX, quantized by onnxruntime on calibration crops the weights file carries, its last layer kept in fp32; run by onnxruntime (int8 operators) or by OpenVINO (quantize/dequantize pairs it fuses into its own int8 kernels)."""
import importlib.util
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from runtime import InferenceBody, InferenceNetwork, fast_network

# onnx and onnxruntime are imported inside the functions that build or run the int8 model: a start that runs
# the frozen network (no calibration crops, no VNNI, --no-int8) does not pay for them.

# The checkpoint entry holding the calibration crops: (N, 1, S, S) uint8, network inputs as transforms.py
# makes them ([-1, 1]) stored in 8 bits. 32 training faces set the ranges as well as 128 did (validation NME
# 0.0001 apart, docs/results.md, "int8 inference"), for 0.8 MB in the release file at 160 px.
CALIBRATION_KEY = "calibration"
CALIBRATION_FACES = 32
# The last layer gives the points (offsets, or the regression's coordinates) and stays fp32: in int8 too it
# moved the astronaut's worst point by 0.42% of the box against 0.12%, and cost 0.02 validation NME.
LAYER_OPS = {"Conv", "Gemm", "MatMul"}


def int8_supported() -> bool:
    """Does this CPU have AVX512-VNNI (as torch reports it), the int8 products onnxruntime's kernels are fast
    with? Without it int8 was not measured against the frozen network, which stays the default there."""
    # Found, not imported: onnxruntime.quantization brings onnx with it, about 0.8 s that a start whose int8
    # model is already in the cache never needs.
    try:
        found = importlib.util.find_spec("onnxruntime.quantization") is not None
    except ImportError:  # no onnxruntime at all
        return False
    return found and torch.cpu._is_vnni_supported()


def to_calibration(images: torch.Tensor) -> torch.Tensor:
    """Network inputs in [-1, 1] -> uint8, as the checkpoint keeps them."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_calibration(crops: torch.Tensor) -> np.ndarray:
    return crops.numpy().astype(np.float32) / np.float32(127.5) - np.float32(1)


def quantize_body(model: nn.Module, img_size: int, crops: torch.Tensor, pairs: bool = False) -> bytes:
    """The model's InferenceBody (fp32) as an int8 ONNX model: activations uint8 with ranges from `crops`,
    weights int8 per channel, the last layer fp32. For onnxruntime as int8 operators: with quantize/dequantize
    pairs around float ones, onnxruntime 1.32 ran the stride16 network at 20 ms a face, against 4.5. For
    OpenVINO (`pairs`) as those pairs, which it reads as its own int8 layers."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    body = InferenceBody(model.eval().requires_grad_(False), bf16=False).eval()
    with tempfile.TemporaryDirectory() as folder:
        plain, ready, int8 = (Path(folder) / name for name in ("plain.onnx", "ready.onnx", "int8.onnx"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation (onnx_io.export_onnx says why)
            torch.onnx.export(body, (torch.zeros(1, 1, img_size, img_size),), str(plain), dynamo=False,
                              opset_version=17, input_names=["image"], dynamic_axes={"image": {0: "batch"}})
        quant_pre_process(str(plain), str(ready))
        kept = last_layer(onnx.load(str(ready)).graph)
        logging.disable(logging.WARNING)  # the quantizer logs each shape tensor it leaves alone, on the root logger
        try:
            quantize_static(str(ready), str(int8), calibration_reader(from_calibration(crops)),
                            quant_format=QuantFormat.QDQ if pairs else QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=kept)
        finally:
            logging.disable(logging.NOTSET)
        return int8.read_bytes()


def last_layer(graph) -> list[str]:
    """The names of the layers (LAYER_OPS) whose values reach the graph's outputs with no other layer between;
    not through Shape, which passes on only the size of what it reads."""
    producer = {out: node for node in graph.node for out in node.output}
    found, todo, seen = [], [o.name for o in graph.output], set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in LAYER_OPS:
            found.append(node.name)
        elif node.op_type != "Shape":
            todo.extend(node.input)
    return found


def calibration_reader(crops: np.ndarray):
    """onnxruntime's CalibrationDataReader over the crops, one at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Crops(CalibrationDataReader):
        def __init__(self):
            self.crops = iter(crops)

        def get_next(self) -> dict | None:
            crop = next(self.crops, None)
            return None if crop is None else {"image": crop[None]}
    return Crops()


class OnnxBody:
    """The int8 model as the frozen body is called: a (N, 1, S, S) tensor in, the raw outputs out as tensors
    (the pip head's three maps, or the regression head's coordinates)."""

    def __init__(self, model_bytes: bytes):
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Its threads would otherwise spin for work after each call, taking the cores from torch's own
        # threads and OpenCV's between the calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor):
        outputs = self.session.run(None, {"image": np.ascontiguousarray(images.float().numpy())})
        tensors = tuple(torch.from_numpy(o) for o in outputs)
        return tensors if len(tensors) > 1 else tensors[0]


def openvino_supported() -> bool:
    """Is OpenVINO installed (found, not imported: its import takes a while)?"""
    try:
        return importlib.util.find_spec("openvino") is not None
    except ImportError:
        return False


class OpenVinoBody:
    """The int8 model (quantize/dequantize pairs) compiled by OpenVINO for this CPU, called as the frozen body
    is: one compiled model per batch size of a power of two (compiling takes about 0.2 s, once each), a batch
    split into such sizes (5 crops: 4 and 1), each run at once. The layers between the int8 ones run in bf16
    where the CPU does bf16 in hardware, else fp32."""

    def __init__(self, model_bytes: bytes, threads: int, bf16: bool, cache: Path | None = None):
        import openvino
        self.core, self.model_bytes, self.compiled = openvino.Core(), model_bytes, {}
        if cache is not None:  # OpenVINO keeps what it compiled there: a later process loads it in a fraction
            self.core.set_property({"CACHE_DIR": str(cache)})
        self.config = {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}

    def request(self, batch: int, side: int):
        if batch not in self.compiled:
            model = self.core.read_model(self.model_bytes, b"")
            model.reshape({model.inputs[0].get_any_name(): [batch, 1, side, side]})
            self.compiled[batch] = self.core.compile_model(model, "CPU", self.config).create_infer_request()
        return self.compiled[batch]

    def __call__(self, images: torch.Tensor):
        images = np.ascontiguousarray(images.float().numpy())
        parts, at = [], 0
        while at < len(images):
            size = 1 << (len(images) - at).bit_length() - 1  # the largest power of two that fits
            request = self.request(size, images.shape[-1])
            results = request.infer({0: images[at:at + size]}, share_inputs=True)
            parts.append([torch.from_numpy(np.array(results[o])) for o in request.model_outputs])
            at += size
        tensors = tuple(torch.cat(outputs) if len(outputs) > 1 else outputs[0] for outputs in zip(*parts))
        return tensors if len(tensors) > 1 else tensors[0]


def openvino_runner(model_bytes: bytes, pip_head: nn.Module | None, img_size: int, bf16: bool,
                    cache: Path | None = None) -> InferenceNetwork:
    """The int8 model run by OpenVINO, as evaluate.py and predict.py call a network (int8_runner's interface);
    what it compiles kept in `cache`."""
    return fast_network(OpenVinoBody(model_bytes, torch.get_num_threads(), bf16, cache), pip_head, img_size,
                        fuse=False, batched=True)


def int8_runner(model_bytes: bytes, pip_head: nn.Module | None, img_size: int) -> InferenceNetwork:
    """The int8 model as evaluate.py and predict.py call a network: the frozen network's interface, the pip
    head's decoding after it, on all of a call's crops at once. oneDNN's fuser has nothing to do here."""
    return fast_network(OnnxBody(model_bytes), pip_head, img_size, fuse=False, batched=True)
