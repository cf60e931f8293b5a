"""The vocabulary every file shares: Box, Face, the markup (iBUG's 68 points, their mirror twins, the points that normalise NME), the box relation, and the NME itself. Numpy only."""
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

# iBUG 300-W's markup, the default: 68 points, jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, lips 48-67.
NUM_LANDMARKS = 68


LEFT_EYE_OUTER, RIGHT_EYE_OUTER = 36, 45


# Each point's mirror twin: jaw, brows, nose, eyes, outer lips, inner lips (the rest lie on the middle line).
IBUG_FLIP_PAIRS = ([(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
                   + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
                   + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)])


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


# ---------------------------------------------------------------- boxes


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
DLIB_RELATION = BoxRelation(side=2.7655, dx=-0.0220, dy=-0.1414)


def point_spread(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean point and RMS distance of the points from it, for (..., K, 2) points."""
    points = np.asarray(points, np.float64)
    mean = points.mean(axis=-2)
    return mean, np.sqrt(((points - mean[..., None, :]) ** 2).sum(-1).mean(-1))


def box_from_points(points: np.ndarray, relation: BoxRelation = DLIB_RELATION) -> Box:
    """The box dlib's detector would most likely give the face whose landmarks these are."""
    mean, spread = point_spread(points)
    side = relation.side * spread
    center = mean + np.array([relation.dx, relation.dy]) * spread
    return Box(float(center[0] - side / 2), float(center[1] - side / 2), float(side), float(side))


def fit_box_relation(faces: list[Face]) -> tuple[BoxRelation, dict[str, float]]:
    """Least squares of each box's side and centre offset on its points' spread (no intercept: faces of
    any size), and the RMS misfits in units of the box side: what DLIB_RELATION and its comment come from."""
    mean, spread = point_spread(np.stack([f.points for f in faces]))
    boxes = np.array([tuple(f.box) for f in faces], np.float64)
    side = (boxes[:, 2] + boxes[:, 3]) / 2
    targets = {"side": side, "dx": boxes[:, 0] + boxes[:, 2] / 2 - mean[:, 0],
               "dy": boxes[:, 1] + boxes[:, 3] / 2 - mean[:, 1]}
    coefficients = {k: float(spread @ y / (spread @ spread)) for k, y in targets.items()}
    misfit = {k: float(np.sqrt((((y - coefficients[k] * spread) / side) ** 2).mean())) for k, y in targets.items()}
    return BoxRelation(**coefficients), misfit


def rescale(box: Box, points: np.ndarray, scale: float, offset: np.ndarray) -> tuple[Box, np.ndarray]:
    """Box and points under x -> x * scale + offset; points mark pixel centres, hence the half pixels."""
    box = Box(box.left * scale + offset[0], box.top * scale + offset[1], box.width * scale, box.height * scale)
    return box, (points + 0.5) * scale + offset - 0.5


def box_overlap(a: Box, b: Box) -> float:
    """The area the two boxes share."""
    width = min(a.left + a.width, b.left + b.width) - max(a.left, b.left)
    height = min(a.top + a.height, b.top + b.height) - max(a.top, b.top)
    return max(width, 0) * max(height, 0)


def box_iou(a: Box, b: Box) -> float:
    overlap = box_overlap(a, b)
    return overlap / (a.width * a.height + b.width * b.height - overlap)


def box_cover(a: Box, b: Box) -> float:
    """The share of the smaller box that the other covers: 1 where one lies inside the other, whatever
    their sizes, where their IoU is only the ratio of their areas."""
    return box_overlap(a, b) / min(a.width * a.height, b.width * b.height)


# ---------------------------------------------------------------- the markup: which points, their twins, the NME


@dataclass(frozen=True)
class Markup:
    """What the points of a dataset are, as far as training and scoring need it; saved with the weights."""
    num_points: int
    flip: tuple[int, ...] | None = None  # flip[i]: the point that point i becomes in the mirrored face
    nme_points: tuple[int, int] | None = None  # the two points whose distance normalises NME; None: box diagonal
    box_relation: BoxRelation = DLIB_RELATION  # where dlib's box lies around these points (video tracking)

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
    def from_saved(cls, saved: dict | None) -> "Markup":
        """The markup to_config wrote (checkpoints.NetworkConfig reads it); None, from weights saved before
        markups existed: iBUG's 68 points."""
        if saved is None:
            return IBUG
        return cls(saved["num_points"], None if saved["flip"] is None else tuple(saved["flip"]),
                   None if saved["nme_points"] is None else tuple(saved["nme_points"]),
                   BoxRelation(*saved.get("box_relation", DLIB_RELATION)))


def turn(points: np.ndarray, degrees: float, about: np.ndarray) -> np.ndarray:
    """Points turned clockwise on screen (y down) by `degrees` about `about`."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return (points - about) @ np.array([[c, s], [-s, c]]) + about


def level_frame(points: np.ndarray, markup: Markup) -> tuple[Box, float]:
    """The frame a face's points put it in: the roll of the line through the markup's two NME points (iBUG:
    the outer eye corners; degrees, clockwise on screen), and the box the markup's relation gives the points
    turned level by it, as if the face were upright, its centre turned back into the picture. A markup
    without NME points, whose eye line is unknown, gets the upright box its points give and roll 0.
    Cropping this box turned by -roll (transforms.Augment's angle) shows the face level."""
    if markup.nme_points is None:
        return box_from_points(points, markup.box_relation), 0.0
    i, j = markup.nme_points
    (x0, y0), (x1, y1) = points[i], points[j]
    roll = float(np.degrees(np.arctan2(y1 - y0, x1 - x0)))
    mean = points.mean(0)
    box = box_from_points(turn(points, -roll, mean), markup.box_relation)
    # Points are pixel indices, boxes pixel edges (pixel i spans [i, i+1]): the box turns back about the
    # same place the points turned about, which in edge coordinates is half a pixel on.
    center = turn(box.center, roll, mean + 0.5)
    return Box(float(center[0] - box.width / 2), float(center[1] - box.height / 2), box.width, box.height), roll


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

# WFLW's 98 points (Wu et al., "Look at Boundary", CVPR 2018): jaw 0-32; brows 33-37 and 42-46 along their
# tops, 38-41 and 47-50 back along their bottoms; nose bridge 51-54, nostrils 55-59; eyes 60-67 and 68-75,
# each from its outer corner; outer lips 76-87, inner lips 88-95; pupils 96 and 97. NME is over the outer
# eye corners, 60 and 72. Checked against the WFLW definition mmpose ships (configs/_base_/datasets/wflw.py).
WFLW_POINTS = 98
WFLW_EYE_OUTER = (60, 72)
WFLW_FLIP_PAIRS = ([(i, 32 - i) for i in range(16)] + [(33 + i, 46 - i) for i in range(5)]
                   + [(38 + i, 50 - i) for i in range(4)] + [(55, 59), (56, 58)]
                   + [(60 + i, 68 + (4 - i) % 8) for i in range(8)]
                   + [(76, 82), (77, 81), (78, 80), (83, 87), (84, 86), (88, 92), (89, 91), (93, 95), (96, 97)])
WFLW = Markup(WFLW_POINTS, flip_permutation(WFLW_FLIP_PAIRS, WFLW_POINTS), WFLW_EYE_OUTER)


def markup_for(num_points: int, flip_pairs: list[tuple[int, int]] | None = None,
               nme_points: tuple[int, int] | None = None, box_relation: BoxRelation = DLIB_RELATION) -> Markup:
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


# The parts of a face each markup names, for NME by region; an outline is a part whose points run along one
# curve in order, whose error splits into across it and along it (outline_errors). The jaw's along-outline
# error is where the network trails dlib (docs/results.md, "The jaw line").
IBUG_REGIONS = {"jaw": range(0, 17), "brows": range(17, 27), "nose": range(27, 36), "eyes": range(36, 48),
                "mouth": range(48, 68)}
IBUG_OUTLINES = {"jaw": [range(0, 17)], "brows": [range(17, 22), range(22, 27)]}
WFLW_REGIONS = {"jaw": range(0, 33), "brows": range(33, 51), "nose": range(51, 60),
                "eyes": [*range(60, 76), 96, 97], "mouth": range(76, 96)}
WFLW_OUTLINES = {"jaw": [range(0, 33)], "brows": [range(33, 38), range(42, 47)]}
MARKUP_REGIONS = {NUM_LANDMARKS: (IBUG_REGIONS, IBUG_OUTLINES), WFLW_POINTS: (WFLW_REGIONS, WFLW_OUTLINES)}


def regions_of(markup: Markup) -> tuple[dict, dict] | None:
    """The regions and outlines of a markup that names them (iBUG's 68 points, WFLW's 98), else None."""
    return MARKUP_REGIONS.get(markup.num_points)


def nme_norm(true: np.ndarray, markup: Markup, diagonal: np.ndarray | None) -> np.ndarray:
    """(N,): what NME divides by: the distance of the markup's two NME points, or the box diagonal."""
    if markup.nme_points is None:
        if diagonal is None:
            raise ValueError("this markup normalises NME by the box diagonal: pass `diagonal`")
        return np.asarray(diagonal, np.float64)
    i, j = markup.nme_points
    return np.linalg.norm(true[:, i] - true[:, j], axis=-1)


def curve_chords(curve: range) -> tuple[list[int], list[int], list[int]]:
    """An outline's points, and for each the point before and after it along the outline (itself at an end):
    the chord between those two is the outline's direction there."""
    idx = list(curve)
    return (idx, [idx[max(k - 1, 0)] for k in range(len(idx))],
            [idx[min(k + 1, len(idx) - 1)] for k in range(len(idx))])


def outline_chords(markup: Markup) -> tuple[list[int], list[int], list[int]] | None:
    """curve_chords of every outline of the markup together; None for a markup without regions."""
    named = regions_of(markup)
    if named is None:
        return None
    chords = [curve_chords(curve) for curves in named[1].values() for curve in curves]
    return tuple(sum((list(c[i]) for c in chords), []) for i in range(3))


def outline_directions(true: np.ndarray, curve: range) -> np.ndarray:
    """(N, len(curve), 2) unit vectors along an outline at each of its points, from the true neighbouring
    points (curve_chords)."""
    _, before, after = curve_chords(curve)
    chord = true[:, after] - true[:, before]
    return chord / np.maximum(np.linalg.norm(chord, axis=-1, keepdims=True), 1e-9)


def region_errors(pred: np.ndarray, true: np.ndarray, markup: Markup = IBUG,
                  diagonal: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """Per-face NME of each region the markup names ({"jaw": (N,), ...}), and for each outline region its error
    split across the outline and along it ("jaw_across", "jaw_along": the mean absolute component, normalised
    as NME is); None for a markup without regions."""
    named = regions_of(markup)
    if named is None:
        return None
    regions, outlines = named
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    norm = nme_norm(true, markup, diagonal)[:, None]
    error = np.linalg.norm(pred - true, axis=-1) / norm
    result = {name: 100 * error[:, list(points)].mean(-1) for name, points in regions.items()}
    for name, curves in outlines.items():
        along, across = [], []
        for curve in curves:
            tangent = outline_directions(true, curve)
            delta = (pred[:, list(curve)] - true[:, list(curve)]) / norm[..., None]
            along.append(np.abs((delta * tangent).sum(-1)))
            across.append(np.abs(delta[..., 0] * tangent[..., 1] - delta[..., 1] * tangent[..., 0]))
        result[f"{name}_across"] = 100 * np.concatenate(across, -1).mean(-1)
        result[f"{name}_along"] = 100 * np.concatenate(along, -1).mean(-1)
    return result


def nme(pred: np.ndarray, true: np.ndarray, markup: Markup = IBUG, diagonal: np.ndarray | None = None) -> np.ndarray:
    """Per-face mean point-to-point error in % of the distance between the markup's two NME points (iBUG:
    the outer eye corners), or, for a markup without them, of the box diagonal `diagonal` (N,), in the
    points' units. Inputs (N, K, 2)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    error = np.linalg.norm(pred - true, axis=-1).mean(axis=-1)
    return 100 * error / nme_norm(true, markup, diagonal)
