"""dlib's 300-W XML -> checked face records -> FaceLandmarksDataset, the train/val split, the crop cache and a demo-data maker; the flag checks every script shares."""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# iBUG 300-W's markup, the default: 68 points, jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, lips 48-67.
NUM_LANDMARKS = 68
LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 36, 45
# Each point's mirror twin: jaw, brows, nose, eyes, outer lips, inner lips (the rest lie on the middle line).
IBUG_FLIP_PAIRS = ([(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
                   + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
                   + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)])
TRAIN_XML = "labels_ibug_300W_train.xml"
TEST_XML = "labels_ibug_300W_test.xml"
# Crops in the cache cover this much more than the training crop, so rotation, scale and shift
# jitter still find real pixels rather than padding.
CACHE_EXTENT = 1.25
CACHE_VERSION = 1
# On the 300-W subset the outer eye corners lie 0.33 to 0.81 box sides apart and every point within 0.95
# box sides of the box's centre: labels far beyond either are typos, and would turn NME into inf or noise.
MIN_EYE_DISTANCE, MAX_POINT_DISTANCE = 0.1, 1.5  # in box sides
# numpy's and Python's seeders take at most 32 bits; train.py adds the rank and the epoch.
SEED_MAX = 2**31 - 1


class DataError(ValueError):
    """A problem with one file of the dataset: the message names the file, `reason` names the kind."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Box(NamedTuple):
    left: float
    top: float
    width: float
    height: float

    @property
    def center(self) -> np.ndarray:
        return np.array([self.left + self.width / 2, self.top + self.height / 2])

    @property
    def side(self) -> float:
        return max(self.width, self.height)


@dataclass(frozen=True)
class Face:
    image: Path
    box: Box
    points: np.ndarray  # (K, 2) float32, image pixels; K = 68 for iBUG's markup
    index: int = 0  # which box of its image, counting those not marked ignore, as error messages say


# ---------------------------------------------------------------- dlib's box from landmarks

class BoxRelation(NamedTuple):
    """Where dlib's detector puts its square box, in units of the points' spread (RMS distance from their mean)."""
    side: float  # box side / spread
    dx: float    # (box centre - mean point) / spread, along x and y
    dy: float


# Measured, not guessed: fit_box_relation over the 2,012 faces of ../shared/data/300w_subset (1,910 boxes from
# dlib's detector, 102 derived from its median relation), by `python video_bench.py --fit-box`. The fitted box
# misses dlib's by 4.3% (x) and 4.7% (y) of its side in centre and by 8.1% in side (RMS over the faces; median
# IoU 0.83). The points' extent instead of their spread fits the side as well but the centre twice as badly
# (8.7% in x), and the spread does not change when the head rolls. Video tracking crops each frame with
# the box of the previous frame's points, so the network sees faces framed as in training.
DLIB_BOX = BoxRelation(side=2.7655, dx=-0.0220, dy=-0.1414)


def point_spread(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean point and RMS distance of the points from it, for (..., K, 2) points."""
    points = np.asarray(points, np.float64)
    mean = points.mean(axis=-2)
    return mean, np.sqrt(((points - mean[..., None, :]) ** 2).sum(-1).mean(-1))


def box_from_points(points: np.ndarray, relation: BoxRelation = DLIB_BOX) -> Box:
    """The box dlib's detector would most likely give the face whose landmarks these are."""
    mean, spread = point_spread(points)
    side = relation.side * spread
    center = mean + np.array([relation.dx, relation.dy]) * spread
    return Box(float(center[0] - side / 2), float(center[1] - side / 2), float(side), float(side))


def fit_box_relation(faces: list[Face]) -> tuple[BoxRelation, dict[str, float]]:
    """Least squares of each box's side and centre offset on its points' spread (no intercept: faces of
    any size), and the RMS misfits in units of the box side: what DLIB_BOX and its comment come from."""
    mean, spread = point_spread(np.stack([f.points for f in faces]))
    boxes = np.array([tuple(f.box) for f in faces], np.float64)
    side = (boxes[:, 2] + boxes[:, 3]) / 2
    targets = {"side": side, "dx": boxes[:, 0] + boxes[:, 2] / 2 - mean[:, 0],
               "dy": boxes[:, 1] + boxes[:, 3] / 2 - mean[:, 1]}
    coefficients = {k: float(spread @ y / (spread @ spread)) for k, y in targets.items()}
    misfit = {k: float(np.sqrt((((y - coefficients[k] * spread) / side) ** 2).mean())) for k, y in targets.items()}
    return BoxRelation(**coefficients), misfit


# ---------------------------------------------------------------- the markup: which points, their twins, the NME

@dataclass(frozen=True)
class Markup:
    """What the points of a dataset are, as far as training and scoring need it; saved with the weights."""
    num_points: int
    flip: tuple[int, ...] | None = None  # flip[i]: the point that point i becomes in the mirrored face
    nme_points: tuple[int, int] | None = None  # the two points whose distance normalises NME; None: box diagonal
    box_relation: BoxRelation = DLIB_BOX  # where dlib's box lies around these points (video tracking)

    @property
    def normalisation(self) -> str:
        """How NME is normalised, as tables name it."""
        if self.nme_points == (LEFT_EYE_OUTER, RIGHT_EYE_OUTER) and self.num_points == NUM_LANDMARKS:
            return "outer eye corners"
        return "box diagonal" if self.nme_points is None else f"distance of points {self.nme_points[0]} and " \
                                                              f"{self.nme_points[1]}"

    def to_config(self) -> dict:
        return {"num_points": self.num_points, "flip": None if self.flip is None else list(self.flip),
                "nme_points": None if self.nme_points is None else list(self.nme_points),
                "box_relation": list(self.box_relation)}

    @classmethod
    def from_config(cls, config: dict) -> "Markup":
        """The markup a checkpoint's config names; weights saved before markups existed are iBUG's 68 points."""
        saved = config.get("markup")
        if saved is None:
            return IBUG
        return cls(saved["num_points"], None if saved["flip"] is None else tuple(saved["flip"]),
                   None if saved["nme_points"] is None else tuple(saved["nme_points"]),
                   BoxRelation(*saved.get("box_relation", DLIB_BOX)))


def check_point(i: int, num_points: int) -> None:
    """ValueError unless point number i is one of K points."""
    if not 0 <= i < num_points:
        raise ValueError(f"point {i} is not among the {num_points} points 0..{num_points - 1}")


def flip_permutation(pairs: list[tuple[int, int]], num_points: int) -> tuple[int, ...]:
    """Mirror pairs -> the permutation a horizontal flip applies; points in no pair are their own twin."""
    permutation = list(range(num_points))
    seen = set()
    for a, b in pairs:
        for i in (a, b):
            check_point(i, num_points)
            if i in seen:
                raise ValueError(f"point {i} is in two mirror pairs")
            seen.add(i)
        permutation[a], permutation[b] = b, a
    return tuple(permutation)


IBUG = Markup(NUM_LANDMARKS, flip_permutation(IBUG_FLIP_PAIRS, NUM_LANDMARKS), (LEFT_EYE_OUTER, RIGHT_EYE_OUTER))


def markup_for(num_points: int, flip_pairs: list[tuple[int, int]] | None = None,
               nme_points: tuple[int, int] | None = None, box_relation: BoxRelation = DLIB_BOX) -> Markup:
    """The markup of K points: iBUG's twins and eye corners for 68 unless given; for any other K only what
    is given (no flip; NME over the box diagonal). Raises ValueError naming a bad point number."""
    try:
        for i in nme_points or ():
            check_point(i, num_points)
    except ValueError as e:
        raise ValueError(f"--nme-points: {e}") from None
    if nme_points is not None and nme_points[0] == nme_points[1]:
        raise ValueError("--nme-points: the two points must differ")
    default = IBUG if num_points == NUM_LANDMARKS else Markup(num_points)
    try:
        flip = default.flip if flip_pairs is None else flip_permutation(flip_pairs, num_points)
    except ValueError as e:
        raise ValueError(f"--flip-pairs: {e}") from None
    return Markup(num_points, flip, default.nme_points if nme_points is None else tuple(nme_points), box_relation)


def nme(pred: np.ndarray, true: np.ndarray, markup: Markup = IBUG, diagonal: np.ndarray | None = None) -> np.ndarray:
    """Per-face mean point-to-point error in % of the distance between the markup's two NME points (iBUG:
    the outer eye corners), or, for a markup without them, of the box diagonal `diagonal` (N,), in the
    points' units. Inputs (N, K, 2)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    error = np.linalg.norm(pred - true, axis=-1).mean(axis=-1)
    if markup.nme_points is None:
        if diagonal is None:
            raise ValueError("this markup normalises NME by the box diagonal: pass `diagonal`")
        return 100 * error / np.asarray(diagonal, np.float64)
    i, j = markup.nme_points
    return 100 * error / np.linalg.norm(true[:, i] - true[:, j], axis=-1)


# ---------------------------------------------------------------- reading images

def to_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit grayscale; 16-bit and float images are rescaled rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array * 255.0 / top, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("L")


def rescale(box: Box, points: np.ndarray, scale: float, offset: np.ndarray) -> tuple[Box, np.ndarray]:
    """Box and points under x -> x * scale + offset; points mark pixel centres, hence the half pixels."""
    box = Box(box.left * scale + offset[0], box.top * scale + offset[1], box.width * scale, box.height * scale)
    return box, (points + 0.5) * scale + offset - 0.5


def open_gray(path: Path, reduce: int = 1) -> tuple[Image.Image, int]:
    """Decode an image as grayscale, letting JPEG decode at 1/2, 1/4 or 1/8 scale when `reduce` allows.

    Returns the image and the factor it was shrunk by, so coordinates can follow.
    """
    reduce = 2 ** min(3, int(math.log2(max(reduce, 1))))
    try:
        image = Image.open(path)
        width = image.size[0]
        jpeg = image.format == "JPEG"
        if reduce > 1 and jpeg:
            image.draft("L", (math.ceil(image.size[0] / reduce), math.ceil(image.size[1] / reduce)))
        image = to_gray(image)
        if reduce > 1 and not jpeg:
            image = image.reduce(reduce)
    except FileNotFoundError:
        raise DataError(f"{path}: image not found", "image not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})", "unreadable image") from None
    return image, 2 ** round(math.log2(width / image.size[0]))


def check_image(path: Path) -> tuple[int, int]:
    """Decode the whole file cheaply (JPEG at 1/8 scale) so that truncated files fail now, not mid-epoch."""
    open_gray(path, reduce=8)
    with Image.open(path) as image:
        return image.size


# ---------------------------------------------------------------- parsing dlib's XML

def part_digits(num_points: int) -> int:
    """How many digits dlib writes in part names for K points: two, three beyond 100 points."""
    return 3 if num_points > 100 else 2


def part_name_range(num_points: int) -> str:
    """dlib's part names for K points, as error messages show them."""
    width = part_digits(num_points)
    return f"'{0:0{width}d}'..'{num_points - 1:0{width}d}'"


def parse_box(element: ET.Element, path: Path, index: int, size: tuple[int, int],
              num_points: int | None = None) -> Face:
    """One <box> with its K <part>s -> Face, or DataError saying what is wrong with it. K is num_points (that
    of most boxes of the file), or without it the box's own part count."""
    where = f"{path}: box {index}"
    try:
        box = Box(*(finite(element.get(k)) for k in ("left", "top", "width", "height")))
    except (TypeError, ValueError):
        raise DataError(f"{where} lacks a numeric left, top, width or height", "bad box") from None
    if box.width <= 0 or box.height <= 0:
        raise DataError(f"{where} has size {box.width:g}x{box.height:g}, expected positive", "empty box")
    if box.left >= size[0] or box.top >= size[1] or box.left + box.width <= 0 or box.top + box.height <= 0:
        raise DataError(f"{where} lies entirely outside the {size[0]}x{size[1]} image", "box outside image")
    parts = element.findall("part")
    k = num_points or len(parts)
    if k < 2:
        raise DataError(f"{where} has {len(parts)} parts; a markup needs at least 2", "wrong part count")
    points = np.full((k, 2), np.nan, np.float32)
    for part in parts:
        name = part.get("name", "")
        if not (name.isascii() and name.isdigit()) or int(name) >= k:
            raise DataError(f"{where} has a part named {name!r}, expected {part_name_range(k)}", "bad part name")
        if not np.isnan(points[int(name), 0]):
            raise DataError(f"{where} has part {name} twice", "duplicate part")
        try:
            points[int(name)] = finite(part.get("x")), finite(part.get("y"))
        except (TypeError, ValueError):
            raise DataError(f"{where} part {name} lacks a numeric x or y", "bad part") from None
    if len(parts) != k:
        raise DataError(f"{where} has {len(parts)} parts, expected {k} as most boxes of the file have",
                        "wrong part count")
    return Face(path, box, points, index)


def finite(text: str | None) -> float:
    """A coordinate: a number, and neither NaN nor infinite (float() takes 'nan' and '1e999')."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


def label_problem(face: Face, markup: Markup = IBUG) -> str | None:
    """Why labels that parse still cannot be learnt from or scored, naming the file and box; None if fine.

    The markup's NME points (iBUG: the outer eye corners) normalise the NME: when they (nearly) coincide it
    becomes inf or noise. A point far outside its box is a typo, or belongs to another face.
    """
    where = f"{face.image}: box {face.index}"
    side = face.box.side
    if markup.nme_points is not None:
        i, j = markup.nme_points
        apart = float(np.linalg.norm(face.points[i] - face.points[j]))
        if not apart >= MIN_EYE_DISTANCE * side:
            name = "outer eye corners" if markup.normalisation == "outer eye corners" else "NME points"
            return (f"{where} has its {name} (points {i} and {j}) {apart:.3g} px apart, under "
                    f"{MIN_EYE_DISTANCE:g} box sides, so its NME would divide by almost nothing")
    far = float(np.abs(face.points - face.box.center).max()) / side
    if not far <= MAX_POINT_DISTANCE:
        return f"{where} has a point {far:.3g} box sides from the box's centre, beyond {MAX_POINT_DISTANCE:g}"
    return None


def read_xml(xml_path: Path) -> ET.Element:
    if not xml_path.is_file():
        raise SystemExit(f"{xml_path}: labels file not found (run `bash download.sh`, or pass --data-dir)")
    try:
        return ET.parse(xml_path).getroot()
    except (ET.ParseError, ValueError, LookupError) as e:  # expat: ValueError, LookupError for encodings
        raise SystemExit(f"{xml_path}: malformed XML ({e})") from None


def load_faces(xml_path: Path, skip_bad: bool = False, keep_degenerate: bool = False,
               markup: Callable[[int], Markup] = markup_for) -> list[Face]:
    """Every <box> of every <image> in a dlib XML, with each image decoded once to prove it readable.

    The part count of most boxes sets the point count K (so one bad box cannot reject the good ones);
    `markup(K)` says what the points are (which ones normalise NME, for the label checks), and stops the
    program when they cannot be those of K points.

    The first problem stops the program with one line naming the file; with skip_bad the faces
    concerned are dropped instead and a summary of what was skipped is printed. Faces whose labels
    parse but are degenerate (label_problem) count as problems unless keep_degenerate: evaluate.py
    keeps them, to name them and leave them out of its averages.
    """
    xml_path = Path(xml_path)
    root = read_xml(xml_path)
    faces, skipped = [], Counter()
    counts = Counter(len(b.findall("part")) for b in root.iter("box") if b.get("ignore", "0") != "1")
    num_points = counts.most_common(1)[0][0] if counts else None
    found = markup_of_count(markup, num_points, xml_path) if num_points and num_points >= 2 else None
    for number, image_element in enumerate(root.iter("image")):
        name = image_element.get("file", "")
        path = xml_path.parent / name
        boxes = [b for b in image_element.findall("box") if b.get("ignore", "0") != "1"]
        try:
            if not name.isprintable():  # a character reference such as &#10; would break the one-line messages
                raise DataError(f"{xml_path}: <image> {number} has the file name {name!r}, with control "
                                f"characters", "bad file name")
            size = check_image(path) if boxes else None
        except DataError as e:
            if not skip_bad:
                raise SystemExit(str(e)) from None
            skipped[e.reason] += len(boxes)
            continue
        for index, element in enumerate(boxes):
            try:
                face = parse_box(element, path, index, size, num_points)
                problem = None if keep_degenerate else label_problem(face, found)
                if problem:
                    raise DataError(problem, "degenerate labels")
                faces.append(face)
            except DataError as e:
                if not skip_bad:
                    raise SystemExit(str(e)) from None
                skipped[e.reason] += 1
    if skipped:
        reasons = "; ".join(f"{n} x {why}" for why, n in skipped.most_common())
        print(f"{xml_path}: skipped {sum(skipped.values())} bad faces ({reasons})", file=sys.stderr)
    if not faces:
        raise SystemExit(f"{xml_path}: no usable <box> elements with their <part>s")
    return faces


def markup_of_count(markup: Callable[[int], Markup], num_points: int, xml_path: Path) -> Markup:
    """markup(K) for a file whose boxes have K parts, or one line saying why these points cannot be it."""
    try:
        found = markup(num_points)
    except ValueError as e:
        raise SystemExit(f"{xml_path}: its boxes have {num_points} parts: {e}") from None
    if found.num_points != num_points:
        raise SystemExit(f"{xml_path}: its boxes have {num_points} parts, but the weights are for "
                         f"{found.num_points} points")
    return found


def write_xml(path: Path, images: list[tuple[str, list[tuple[Box, np.ndarray]]]], name: str = "faces",
              shuffle: random.Random | None = None) -> Path:
    """dlib's XML, as imglab and dlib's 300-W files have it: per image its file (relative to the XML's folder)
    and boxes, each box with its K parts named 00..K-1; whole pixels, as dlib stores them (its loader reads
    integers). `shuffle` puts the parts in random document order (the demo data: read them by name)."""
    path = Path(path)
    width = part_digits(max((len(points) for _, faces in images for _, points in faces), default=0))
    lines = ["<?xml version='1.0' encoding='ISO-8859-1'?>", "<dataset>", f"<name>{name}</name>", "<images>"]
    for file, faces in images:
        lines.append(f"  <image file={quoteattr(str(file))}>")
        for box, points in faces:
            lines.append(f"    <box top='{box.top:.0f}' left='{box.left:.0f}' width='{box.width:.0f}' "
                         f"height='{box.height:.0f}'>")
            order = shuffle.sample(range(len(points)), len(points)) if shuffle else range(len(points))
            lines += [f"      <part name='{i:0{width}d}' x='{points[i, 0]:.0f}' y='{points[i, 1]:.0f}'/>" for i in order]
            lines.append("    </box>")
        lines.append("  </image>")
    lines += ["</images>", "</dataset>", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="ISO-8859-1", errors="xmlcharrefreplace")
    return path


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


def trained_split(n: int, config: dict) -> tuple[list[int], list[int]]:
    """The train/validation split that the weights saved with this config were trained on."""
    return split_faces(n, config.get("val_fraction", 0.1), config.get("seed", 0))


# ---------------------------------------------------------------- crop cache

def cache_crop(args: tuple[Face, int]) -> np.ndarray:
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
            self.build_or_stop(workers, fallback)
        self.crops = None  # opened lazily, so each DataLoader worker maps the file itself

    def build_or_stop(self, workers: int, fallback: Path) -> None:
        """Build beside the XML, or in the user's cache folder where the data folder is read-only;
        a full disk stops the program with one line."""
        try:
            try:
                self.build(workers)
            except PermissionError:
                self.path = fallback
                self.build(workers)
        except OSError as e:
            raise SystemExit(f"{self.path}: cannot write the crop cache ({e.strerror or e}); no partial cache "
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
                    with Pool(workers) as pool:
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


# ---------------------------------------------------------------- demo data

def template_shape() -> np.ndarray:
    """A symmetric 68-point face in the iBUG order, about 1 wide, centred on the nose."""
    t = np.linspace(0, np.pi, 17)
    jaw = np.stack([-0.5 * np.cos(t), 0.05 + 0.5 * np.sin(t)], 1)
    u = np.linspace(0, 1, 5)
    left_brow = np.stack([-0.42 + 0.32 * u, -0.25 - 0.06 * np.sin(np.pi * u)], 1)
    right_brow = left_brow[::-1] * [-1, 1]
    bridge = np.stack([np.zeros(4), np.linspace(-0.15, 0.1, 4)], 1)
    nostrils = np.stack([np.linspace(-0.1, 0.1, 5), 0.17 + 0.03 * np.sin(np.pi * u)], 1)

    def eye(cx):
        rx, ry, cy = 0.09, 0.04, -0.1
        return np.array([[cx - rx, cy], [cx - rx / 3, cy - ry], [cx + rx / 3, cy - ry],
                         [cx + rx, cy], [cx + rx / 3, cy + ry], [cx - rx / 3, cy + ry]])

    def lips(n, rx, ry):
        phi = np.pi - np.arange(n) * 2 * np.pi / n
        return np.stack([rx * np.cos(phi), 0.32 - ry * np.sin(phi)], 1)

    return np.concatenate([jaw, left_brow, right_brow, bridge, nostrils, eye(-0.22), eye(0.22),
                           lips(12, 0.2, 0.08), lips(8, 0.12, 0.03)]).astype(np.float32)


FACE_STROKES = [range(0, 17), range(17, 22), range(22, 27), range(27, 31), range(31, 36),
                [*range(36, 42), 36], [*range(42, 48), 42], [*range(48, 60), 48], [*range(60, 68), 60]]


def draw_face(draw: ImageDraw.ImageDraw, points: np.ndarray, rng: random.Random) -> None:
    """A cartoon face whose strokes run through the landmarks, so a network can learn to find them."""
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    pad = 0.15 * (x1 - x0)
    draw.ellipse([x0 - pad / 2, y0 - 2 * pad, x1 + pad / 2, y1 + pad / 3], fill=rng.randint(150, 230))
    ink, width = rng.randint(0, 70), max(1, round((x1 - x0) / 40))
    for stroke in FACE_STROKES:
        draw.line([tuple(points[i]) for i in stroke], fill=ink, width=width)


# dlib's 5-point markup, from the 68: both corners of each eye (left to right in the picture) and the bottom
# of the nose. Its twins are (0, 3) and (1, 2), and its outer eye corners 0 and 3 normalise NME as for 68.
FIVE_FROM_68 = [36, 39, 42, 45, 33]
DEMO_POINTS = (5, 68, 98)


def demo_weights(num_points: int) -> np.ndarray:
    """(K, 68): each demo point as a mix of the 68 iBUG points. 5: dlib's five; 68: iBUG's; 98: WFLW's
    layout (33 jaw, 9 per brow, 9 nose, 8 per eye, 20 lips, 2 pupils), with points between iBUG's."""
    eye = np.eye(NUM_LANDMARKS)
    if num_points == 5:
        return eye[FIVE_FROM_68]
    if num_points == NUM_LANDMARKS:
        return eye
    if num_points != 98:
        raise ValueError(f"demo markups have 5, 68 or 98 points, not {num_points}")
    mid = lambda i, j: (eye[i] + eye[j]) / 2  # noqa: E731
    jaw = [row for i in range(16) for row in (eye[i], mid(i, i + 1))] + [eye[16]]
    brow = [eye[i] for i in range(17, 22)] + [0.8 * mid(i, i + 1) + 0.2 * eye[37 if i < 19 else 38] for i in range(17, 21)]
    left_eye = [eye[36], eye[37], mid(37, 38), eye[38], eye[39], eye[40], mid(40, 41), eye[41]]
    mirror = np.array(IBUG.flip)
    twin = lambda rows: [row[mirror] for row in rows]  # noqa: E731  (the same point on the other half)
    rows = (jaw + brow + twin(brow) + [eye[i] for i in range(27, 36)] + left_eye + twin(left_eye)
            + [eye[i] for i in range(48, 68)] + [eye[36:42].mean(0), eye[42:48].mean(0)])
    return np.array(rows)


def demo_markup(num_points: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The demo markup's mirror pairs (found by mirroring its weights with iBUG's twins) and its outer eye
    corners (the points that are iBUG's 36 and 45)."""
    weights = demo_weights(num_points)
    mirrored = weights[:, np.argsort(IBUG.flip)]
    twins = [int(np.flatnonzero(np.abs(weights - row).sum(1) < 1e-9)[0]) for row in mirrored]
    pairs = [(i, j) for i, j in enumerate(twins) if i < j]
    corners = tuple(int(np.flatnonzero(weights[:, k] == 1)[0]) for k in (LEFT_EYE_OUTER, RIGHT_EYE_OUTER))
    return pairs, corners


def make_demo(out: Path, n_images: int = 120, seed: int = 0, num_points: int = NUM_LANDMARKS) -> None:
    """Write a small dataset in dlib's layout: JPEGs of drawn faces plus train and test XMLs, with the 68
    iBUG points or another demo markup of them (demo_weights); beside them, for other markups, the mirror
    pairs in flip_pairs.json.

    Every fifth image holds two faces. Test images are spread over dlib's subset folders.
    """
    out, rng = Path(out), random.Random(seed)
    template, weights = template_shape(), demo_weights(num_points)
    sets = {TRAIN_XML: ["helen/trainset", "afw"], TEST_XML: ["helen/testset", "lfpw/testset", "ibug"]}
    for xml_name, folders in sets.items():
        n = n_images if xml_name == TRAIN_XML else max(6, n_images // 4)
        images = []
        for k in range(n):
            folder = folders[k % len(folders)]
            n_faces = 2 if k % 5 == 4 else 1
            width, height = 200 * n_faces + rng.randint(0, 60), 220 + rng.randint(0, 60)
            image = Image.new("L", (width, height), rng.randint(0, 255))
            draw = ImageDraw.Draw(image)
            faces = []
            for f in range(n_faces):
                size = rng.uniform(90, 140)
                angle = math.radians(rng.uniform(-15, 15))
                rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
                center = np.array([100 + 200 * f + rng.uniform(-10, 10), height / 2 + rng.uniform(-10, 10)])
                shape = template + np.array([rng.gauss(0, 0.01) for _ in range(2 * NUM_LANDMARKS)]).reshape(-1, 2)
                points = (shape * size) @ rotation.T + center
                draw_face(draw, points, rng)
                # Like dlib's detector: a square that misses some of the jaw.
                side = size * rng.uniform(0.75, 0.85)
                faces.append((Box(center[0] - side / 2, center[1] - side * 0.45, side, side), weights @ points))
            images.append((f"{folder}/{k:04d}.jpg", faces))
            (out / folder).mkdir(parents=True, exist_ok=True)
            image.save(out / folder / f"{k:04d}.jpg", quality=90)
        write_xml(out / xml_name, images, "demo faces", shuffle=rng)
    extra = ""
    if num_points != NUM_LANDMARKS:
        pairs, corners = demo_markup(num_points)
        (out / "flip_pairs.json").write_text(json.dumps(pairs) + "\n")
        extra = (f"; {num_points} points: train with --flip-pairs {out / 'flip_pairs.json'} "
                 f"--nme-points {corners[0]},{corners[1]} (the outer eye corners)")
    print(f"wrote a demo dataset to {out}/ ({TRAIN_XML}, {TEST_XML}){extra}")


# ---------------------------------------------------------------- visualising the data

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
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


# ---------------------------------------------------------------- checking what users type (every script)

def number_in(kind: type, low: float | None = None, high: float | None = None, *,
              low_open: bool = False, high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse `type=`: the text as `kind` (int or float) inside [low, high] (open where asked), else
    argparse's one-line error naming the flag and the range. NaN and infinity are never inside."""
    show = (lambda v: str(int(v))) if kind is int else (lambda v: f"{v:g}")
    bounds = ([f"{'above' if low_open else 'at least'} {show(low)}"] if low is not None else []) + \
             ([f"{'below' if high_open else 'at most'} {show(high)}"] if high is not None else [])
    wanted = f"{'a whole number' if kind is int else 'a number'} {' and '.join(bounds)}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        inside = (math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
                  and (high is None or (value < high if high_open else value <= high)))
        if not inside:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def flip_pairs_arg(text: str) -> list[list[int]]:
    """An argparse `type=` for --flip-pairs: a JSON file holding [[i, j], ...], or the pairs written out as
    "0,3 1,2". Whether the points exist is checked once the labels say how many there are."""
    path = Path(text)
    if path.suffix.lower() == ".json" or path.is_file():
        try:
            pairs = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise argparse.ArgumentTypeError(f"{path}: cannot read mirror pairs ({e})") from None
        where = str(path)
    else:
        pairs = [[int(v) for v in pair.split(",")] if all(v.strip().isdigit() for v in pair.split(","))
                 else pair for pair in text.split()]
        where = repr(text)
    if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 and
                                            all(isinstance(v, int) and v >= 0 for v in p) for p in pairs)):
        raise argparse.ArgumentTypeError(f"{where}: expected mirror pairs of point numbers, such as "
                                         f"\"0,3 1,2\" or a JSON file holding [[0, 3], [1, 2]]")
    return sorted(sorted(pair) for pair in pairs)  # in one order, so that --resume sees "1,2 3,0" as "0,3 1,2"


def point_pair_arg(text: str) -> list[int]:
    """An argparse `type=` for --nme-points: two point numbers, "I,J"."""
    values = text.split(",")
    if len(values) != 2 or not all(v.strip().isdigit() for v in values) or int(values[0]) == int(values[1]):
        raise argparse.ArgumentTypeError(f"expected two different point numbers I,J, got {text!r}")
    return sorted(int(v) for v in values)  # a distance: "45,36" is the run "36,45" (for --resume)


def folder_problem(path: Path) -> str | None:
    """Why `path` can be neither used nor made as an output folder, or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} cannot be made: {parent} is a file, not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{path} cannot be made: {parent} is not writable"


def out_folder(text: str) -> str:
    """An argparse `type=` for --out/--out-dir folders: one that exists or can be made."""
    problem = folder_problem(Path(text))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def out_file(text: str) -> str:
    """An argparse `type=` for a file to write: not a folder, and in a folder that exists or can be made."""
    path = Path(text)
    problem = f"{path} is a folder; expected a file name" if path.is_dir() else folder_problem(path.parent)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Check the data: draw faces as loaded and as augmented; write a "
                                                 "small demo dataset; or turn other formats into dlib's XML.")
    parser.add_argument("--data-dir", default="data", help="folder holding dlib's XMLs (default: data)")
    parser.add_argument("--xml", default=TRAIN_XML, help=f"labels file inside --data-dir (default: {TRAIN_XML})")
    parser.add_argument("--n", type=number_in(int, 1), default=8, help="faces to draw (default: 8)")
    parser.add_argument("--seed", type=number_in(int, 0, SEED_MAX), default=0, help="random seed (default: 0)")
    parser.add_argument("--out", type=out_file, help="file to write: the PNG of faces (default: samples.png), or "
                                                     "the XML that --from-pts, --from-wflw and --pick-points write")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad faces instead of stopping")
    make = parser.add_mutually_exclusive_group()
    make.add_argument("--make-demo", metavar="DIR", type=out_folder,
                      help="write a small demo dataset into DIR and exit")
    make.add_argument("--from-pts", metavar="DIR", nargs="+", type=Path,
                      help="images with 300-W .pts files beside them (1-based points) -> --out XML; boxes from "
                           "dlib's detector, or from the points where it finds no face")
    make.add_argument("--from-wflw", metavar="FILE", type=Path,
                      help="WFLW annotation file (98 points, box, 6 flags, image name per line) -> --out XML")
    make.add_argument("--pick-points", metavar="I,J,...",
                      help="keep these points of --data-dir/--xml, in this order -> --out XML (a smaller markup)")
    parser.add_argument("--images", type=Path, help="with --from-wflw: the folder its image names are relative to")
    parser.add_argument("--points", type=int, choices=DEMO_POINTS, default=NUM_LANDMARKS,
                        help=f"with --make-demo: the markup, {DEMO_POINTS} points (default: {NUM_LANDMARKS})")
    args = parser.parse_args(argv)
    converting = args.from_pts or args.from_wflw or args.pick_points
    if converting and (args.out is None or not args.out.lower().endswith(".xml")):
        parser.error("--from-pts, --from-wflw and --pick-points need --out FILE.xml")
    if args.from_wflw and args.images is None:
        parser.error("--from-wflw needs --images DIR, the folder of WFLW's images")
    return args


def main(args: argparse.Namespace) -> None:
    if args.make_demo:
        make_demo(Path(args.make_demo), seed=args.seed, num_points=args.points)
        return
    if args.from_pts or args.from_wflw or args.pick_points:
        import importers  # other formats in, dlib's XML out: their own file, as they are their own concern
        if args.from_pts:
            importers.from_pts(args.from_pts, Path(args.out))
        elif args.from_wflw:
            importers.from_wflw(args.from_wflw, args.images, Path(args.out))
        else:
            importers.pick_points(Path(args.data_dir) / args.xml, args.pick_points, Path(args.out))
        return
    from transforms import Transforms
    random.seed(args.seed)
    faces = load_faces(Path(args.data_dir) / args.xml, args.skip_bad)
    train, _ = split_faces(len(faces), seed=args.seed)
    n = min(args.n, len(train))
    out = Path(args.out or "samples.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = FaceLandmarksDataset(faces, Transforms(train=False), train[:n])
    augmented = FaceLandmarksDataset(faces, Transforms(train=True), train[:n])
    plot_samples(shown, augmented, n, out)


if __name__ == "__main__":
    main(parse_args())
