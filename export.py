"""The trained network as ONNX (and, if asked, TorchScript), each checked against PyTorch on the same inputs."""
import argparse
from pathlib import Path

import numpy as np
import torch

from checkpoints import NetworkConfig, load_checkpoint, load_model, release_copy, save_atomic
from dataset import FaceLandmarksDataset, trained_split
from errors import UsageError
from flags import one_line_errors, out_file, refuse_input_as_output
from labels import TRAIN_XML, load_faces
from landmarks import Face
from onnx_io import OPSET, export_onnx, export_torchscript, onnx_runner, require_onnx
from quantized import CALIBRATION_FACES, from_calibration, to_calibration
from transforms import Transforms

# The check runs a batch of a size the export never saw, which proves the batch axis is dynamic.
EXPORT_BATCH, CHECK_BATCH = 2, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", default="runs/best.pt", help="weights from train.py (default: runs/best.pt)")
    parser.add_argument("--out", type=out_file, help="ONNX file to write (default: the weights path with .onnx)")
    parser.add_argument("--torchscript", action="store_true",
                        help="also write TorchScript, next to the ONNX file as .torchscript.pt")
    parser.add_argument("--release", metavar="FILE", type=out_file,
                        help="instead, write the weights in fp16 for release (as weights/ holds them) and check "
                             "that they predict as the original")
    parser.add_argument("--data-dir", type=Path,
                        help=f"with --release: also store {CALIBRATION_FACES} training faces of this dlib folder (the "
                             "weights' own split) as crops, so that the file runs in int8 (docs/scripts.md)")
    parser.add_argument("--xml", default=TRAIN_XML, help=f"labels file inside --data-dir (default: {TRAIN_XML})")
    return parser.parse_args(argv)


def calibration_crops(faces: list[Face], config: NetworkConfig, n: int = CALIBRATION_FACES) -> torch.Tensor:
    """n training faces of the split these weights were trained on, never validation ones, cropped to
    their boxes as evaluation crops them: the crops an int8 network's ranges are set on (quantized.py).
    The same faces for the same split."""
    train, _ = trained_split(len(faces), config)
    chosen = sorted(np.random.default_rng(0).choice(train, min(n, len(train)), replace=False).tolist())
    data = FaceLandmarksDataset(faces, Transforms(config.img_size, train=False), chosen)
    return to_calibration(torch.stack([data[i][0] for i in range(len(data))]))


def write_release(args: argparse.Namespace) -> float:
    """The fp16 copy, and the largest difference between its predictions and the original's."""
    path = Path(args.release)
    checkpoint = load_checkpoint(args.weights)
    calibration = None
    if args.data_dir is not None:
        faces = load_faces(args.data_dir / args.xml)
        calibration = calibration_crops(faces, NetworkConfig.of(checkpoint))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(release_copy(checkpoint, calibration), path)
    original, config = load_model(args.weights)
    released, _ = load_model(path)
    size = config.img_size
    # Faces where there are any: on noise the pip head's score maps are flat, and fp16 rounding can move their
    # argmax to another cell (0.17 of the crop on the soup release), which says nothing of faces.
    inputs = torch.rand(CHECK_BATCH, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    what = "random inputs"
    if calibration is not None:
        inputs, what = torch.from_numpy(from_calibration(calibration[:CHECK_BATCH])), "of its calibration crops"
    with torch.inference_mode():
        difference = float((released(inputs) - original(inputs)).abs().max())
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB"
          f"{'' if calibration is None else f', with {len(calibration)} calibration crops for int8'}); largest "
          f"|fp16 copy - original| over {len(inputs)} {what}: {difference:.2e}")
    return difference


def main(args: argparse.Namespace) -> float:
    """Writes the files and returns the largest |onnxruntime - PyTorch| over a batch of random inputs."""
    with one_line_errors():
        if args.data_dir is not None and not args.release:
            raise UsageError("--data-dir: only with --release (the calibration crops go into the release file)")
        refuse_input_as_output("--release" if args.release else "--out",
                               args.release or args.out or Path(args.weights).with_suffix(".onnx"), [args.weights])
        return write_release(args) if args.release else write_exports(args)


def write_exports(args: argparse.Namespace) -> float:
    require_onnx()
    model, config = load_model(args.weights, "cpu")
    size = config.img_size
    out = Path(args.out or Path(args.weights).with_suffix(".onnx"))
    out.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(EXPORT_BATCH, 1, size, size, generator=generator) * 2 - 1
    inputs = torch.rand(CHECK_BATCH, 1, size, size, generator=generator) * 2 - 1
    with torch.inference_mode():
        expected = model(inputs).numpy()

    export_onnx(model, example, out, config.markup.to_config())
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
