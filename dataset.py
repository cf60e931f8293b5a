"""Faces as training samples: the train/validation split, the crop cache and FaceLandmarksDataset; run it to draw faces as loaded and as augmented (it also fronts demo.py and importers.py)."""
import argparse
import hashlib
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from checkpoints import NetworkConfig
from errors import DataError
from files import save_figure
from flags import SEED_MAX, figure_file, ignore_ctrl_c, number_in, one_line_errors, out_file, out_folder, worker_pool
from images import open_gray
from labels import TRAIN_XML, load_faces
from landmarks import NUM_LANDMARKS, Box, Face, rescale
from transforms import Transforms

# Crops in the cache cover this much more than the training crop, so rotation, scale and shift
# jitter still find real pixels rather than padding.
CACHE_EXTENT = 1.25


CACHE_VERSION = 1


def split_faces(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic train/validation indices: the same seed always gives the same split."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = max(1, round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def labels_fingerprint(faces: list[Face], root: Path) -> str:
    """sha256 of the faces as loaded, in order (file relative to root, box, points): what the split is
    drawn from. Unlike the XML's bytes it also changes when --skip-bad drops another face."""
    digest = hashlib.sha256()
    for face in faces:
        digest.update(f"{os.path.relpath(face.image, root)}|{tuple(face.box)}|{face.index}|".encode())
        digest.update(np.ascontiguousarray(face.points, np.float32).tobytes())
    return digest.hexdigest()


def trained_split(n: int, config: NetworkConfig) -> tuple[list[int], list[int]]:
    """The train/validation split that the weights of this config were trained on."""
    return split_faces(n, config.val_fraction, config.seed)


# ---------------------------------------------------------------- crop cache


def cache_crop(args: tuple[Face, int, float]) -> np.ndarray:
    """Crop one face, square around its box with CACHE_EXTENT room, to cache_size pixels."""
    face, cache_size, margin = args
    side = face.box.side * margin * CACHE_EXTENT
    image, factor = open_gray(face.image, reduce=max(1, int(side // cache_size)))
    scale = cache_size / side
    center = face.box.center / factor
    # PIL wants the inverse map: output pixel -> input pixel.
    inverse = (1 / (scale * factor), 0, center[0] - cache_size / (2 * scale * factor),
               0, 1 / (scale * factor), center[1] - cache_size / (2 * scale * factor))
    crop = image.transform((cache_size, cache_size), Image.AFFINE, inverse, Image.BILINEAR)
    return np.asarray(crop, np.uint8)


class FaceCache:
    """Every face of one XML cropped once to uint8 in a memory-mapped .npy, so epochs decode no JPEG.

    The file name holds a hash of the XML's bytes and the crop settings: change either and it is rebuilt.
    """

    def __init__(self, faces: list[Face], xml_path: Path, cache_size: int, margin: float, workers: int = 0):
        xml_path = Path(xml_path)
        key = hashlib.sha1(xml_path.read_bytes() + repr((len(faces), cache_size, margin, CACHE_EXTENT,
                                                          CACHE_VERSION)).encode()).hexdigest()[:12]
        name = f"{xml_path.stem}-{cache_size}-{key}.npy"
        self.path = xml_path.parent / ".cache" / name
        # A read-only dataset folder: keep the cache in the user's cache folder instead.
        fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "face-landmarks" / name
        if not self.path.exists() and fallback.exists():
            self.path = fallback
        self.size, self.margin = cache_size, margin
        side = np.array([f.box.side * margin * CACHE_EXTENT for f in faces])
        # Coordinates in the cache: a pure scale and shift of the image's, so boxes stay boxes.
        self.scale = cache_size / side
        self.center = np.stack([f.box.center for f in faces])
        self.faces = faces
        if not self.path.exists():
            self.build_or_raise(workers, fallback)
        self.crops = None  # opened lazily, so each DataLoader worker maps the file itself

    def build_or_raise(self, workers: int, fallback: Path) -> None:
        """Build beside the XML, or in the user's cache folder where the data folder is read-only;
        a full disk raises DataError in one line."""
        try:
            try:
                self.build(workers)
            except PermissionError:
                self.path = fallback
                self.build(workers)
        except OSError as e:
            raise DataError(f"{self.path}: cannot write the crop cache ({e.strerror or e}); no partial cache "
                            f"file was left; free some disk space, or train without --cache") from None

    def build(self, workers: int) -> None:
        """Plain writes to a temporary file, renamed into place only when whole. A memory map would be
        killed by SIGBUS on a full disk; a write raises OSError, and the temporary file is deleted."""
        from tqdm import tqdm
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}.npy")
        jobs = [(f, self.size, self.margin) for f in self.faces]
        bar = dict(total=len(jobs), desc=f"caching crops to {self.path.name}", unit="face")
        try:
            with open(tmp, "wb") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                         "shape": (len(jobs), self.size, self.size)})
                if hasattr(os, "posix_fallocate"):  # claim the space first: a full disk fails before any work
                    os.posix_fallocate(f.fileno(), 0, f.tell() + len(jobs) * self.size ** 2)
                if workers > 1:
                    with worker_pool(workers, ignore_ctrl_c) as pool:
                        for crop in tqdm(pool.imap(cache_crop, jobs, chunksize=8), **bar):
                            f.write(crop.tobytes())
                else:
                    for crop in tqdm(map(cache_crop, jobs), **bar):
                        f.write(crop.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, i: int) -> tuple[Image.Image, Box, np.ndarray]:
        if self.crops is None:
            self.crops = np.load(self.path, mmap_mode="r")
        face, scale, center = self.faces[i], self.scale[i], self.center[i]
        box, points = rescale(face.box, face.points, scale, self.size / 2 - center * scale)
        return Image.fromarray(np.asarray(self.crops[i])), box, points


# ---------------------------------------------------------------- the dataset


class FaceLandmarksDataset(Dataset):
    """(image tensor, landmarks tensor) for each face, through `transform`; from disk or from a FaceCache."""

    def __init__(self, faces: list[Face], transform, indices: list[int] | None = None,
                 cache: FaceCache | None = None):
        self.faces, self.transform, self.cache = faces, transform, cache
        self.indices = list(range(len(faces))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[Image.Image, Box, np.ndarray]:
        """The face's image (shrunk while decoding where the crop allows), its box and points to match."""
        j = self.indices[i]
        if self.cache is not None:
            return self.cache.get(j)
        face = self.faces[j]
        image, factor = open_gray(face.image, reduce=self.transform.max_reduction(face.box))
        return image, *rescale(face.box, face.points, 1 / factor, np.zeros(2))

    def __getitem__(self, i: int):
        return self.transform(*self.load(i))


def plot_samples(dataset: FaceLandmarksDataset, augmented: FaceLandmarksDataset, n: int, out: Path) -> None:
    """Top row: faces as loaded with their points; bottom row: the same faces after the training transforms."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for i in range(n):
        image, box, points = dataset.load(i)
        axes[0, i].imshow(image, cmap="gray")
        axes[0, i].add_patch(plt.Rectangle((box.left, box.top), box.width, box.height, fill=False, color="y"))
        axes[0, i].scatter(points[:, 0], points[:, 1], s=3, c="g")
        tensor, target = augmented[i]
        size = tensor.shape[-1]
        crop_points = (target.reshape(-1, 2).numpy() + 0.5) * size - 0.5
        axes[1, i].imshow(tensor[0].numpy(), cmap="gray")
        axes[1, i].scatter(crop_points[:, 0], crop_points[:, 1], s=3, c="g")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out)
    print(f"wrote {out}")


# The command line also drives the demo maker and the importers; only it needs them (the importers load
# OpenCV and dlib), so they are imported where it runs, and `from dataset import ...` in training and
# evaluation loads neither.

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import demo
    import importers
    parser = argparse.ArgumentParser(description="Check the data: draw faces as loaded and as augmented; write a "
                                                 "small demo dataset; or turn other formats into dlib's XML.")
    parser.add_argument("--data-dir", default="data", help="folder holding dlib's XMLs (default: data)")
    parser.add_argument("--xml", default=TRAIN_XML, help=f"labels file inside --data-dir (default: {TRAIN_XML})")
    parser.add_argument("--n", type=number_in(int, 1), default=8, help="faces to draw (default: 8)")
    parser.add_argument("--seed", type=number_in(int, 0, SEED_MAX), default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=out_file, help="file to write: the PNG of faces (default: samples.png), or "
                                                     "the XML that --from-pts, --from-wflw and --pick-points write")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad faces instead of stopping (with --from-pts: bad .pts files and unreadable images)")
    make = parser.add_mutually_exclusive_group()
    make.add_argument("--make-demo", metavar="DIR", type=out_folder,
                      help="write a small demo dataset into DIR and exit (as `python demo.py DIR`)")
    importers.add_arguments(parser, make)
    parser.add_argument("--points", type=int, choices=demo.DEMO_POINTS, default=NUM_LANDMARKS,
                        help=f"with --make-demo: the markup, {demo.DEMO_POINTS} points (default: {NUM_LANDMARKS})")
    args = parser.parse_args(argv)
    importers.check_arguments(parser, args)
    if args.out and not (args.make_demo or importers.converting(args)):  # then --out is the drawn faces
        try:
            figure_file(args.out)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument --out: {e}")
    return args


def draw_samples(args: argparse.Namespace) -> None:
    random.seed(args.seed)
    faces = load_faces(Path(args.data_dir) / args.xml, args.skip_bad)
    train, _ = split_faces(len(faces), seed=args.seed)
    n = min(args.n, len(train))
    out = Path(args.out or "samples.png")
    shown = FaceLandmarksDataset(faces, Transforms(train=False), train[:n])
    augmented = FaceLandmarksDataset(faces, Transforms(train=True), train[:n])
    plot_samples(shown, augmented, n, out)


def main(args: argparse.Namespace) -> None:
    import demo
    import importers
    with one_line_errors():
        if args.make_demo:
            demo.make_demo(Path(args.make_demo), seed=args.seed, num_points=args.points)
        elif importers.converting(args):
            importers.convert(args)
        else:
            draw_samples(args)


if __name__ == "__main__":
    main(parse_args())
