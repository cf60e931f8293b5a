"""Pictures of predictions: a grid of validation faces, true points green and predicted points red."""
import argparse
import os
from pathlib import Path

import numpy as np
import torch

from dataset import FaceLandmarksDataset, load_faces, split_faces
from model import load_model, pick_device
from transforms import Transforms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=8, help="validation faces to show (default: 8)")
    parser.add_argument("--weights", default="runs/best.pt", help="weights from train.py (default: runs/best.pt)")
    parser.add_argument("--data-dir", help="dataset folder (default: the one the weights were trained on)")
    parser.add_argument("--out", default="predictions.png", help="PNG to write (default: predictions.png)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: auto)")
    return parser.parse_args(argv)


def show_or_close(fig) -> None:
    """Show the figure where a display exists; headless runs only keep the PNG."""
    import matplotlib.pyplot as plt
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.name == "nt":
        plt.show()
    plt.close(fig)


def plot_grid(images: torch.Tensor, truth: np.ndarray, pred: np.ndarray, path: Path) -> None:
    import matplotlib
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.name == "nt"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(images)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    size = images.shape[-1]
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(images[i, 0].numpy(), cmap="gray")
        for points, colour in ((truth[i], "g"), (pred[i], "r")):
            crop = (points + 0.5) * size - 0.5
            ax.scatter(crop[:, 0], crop[:, 1], s=4, c=colour)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
    show_or_close(fig)


def main(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    model, config = load_model(args.weights, device)
    data_dir = Path(args.data_dir or config.get("data_dir", "data"))
    faces = load_faces(data_dir / config.get("xml", "labels_ibug_300W_train.xml"), config.get("skip_bad", False))
    _, val_idx = split_faces(len(faces), config.get("val_fraction", 0.1), config.get("seed", 0))
    dataset = FaceLandmarksDataset(faces, Transforms(config.get("img_size", 224), train=False),
                                   val_idx[:args.n])
    images, targets = map(torch.stack, zip(*(dataset[i] for i in range(len(dataset)))))
    with torch.inference_mode():
        pred = model(images.to(device)).float().cpu().numpy()
    plot_grid(images, targets.numpy().reshape(-1, 68, 2), pred.reshape(-1, 68, 2), Path(args.out))


if __name__ == "__main__":
    main(parse_args())
