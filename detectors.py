"""Finding faces in a picture: OpenCV's YuNet (fast, any roll with four quarter turns) or dlib's HOG, whose boxes the 300-W labels use; both give boxes in dlib's convention."""
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from errors import UsageError, WeightsError
from landmarks import Box, BoxRelation, box_iou, point_spread

# FFmpeg and OpenCV otherwise print their own warnings (a missing moov atom, a camera that is not there, the
# DNN engine's notes) beside the one line the project gives for a bad input. Set before cv2 is first
# imported, which is here, the lowest file that uses it; a user's own settings win.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
import cv2  # noqa: E402

DETECTORS = ("yunet", "hog")
# dlib's HOG doubles the image once before scanning by default: it then finds faces down to about 40 px.
HOG_UPSAMPLE = 1
# YuNet, shipped in weights/ with its licences (weights/README.md says where the bytes come from).
YUNET_FILE = Path(__file__).resolve().parent / "weights" / "face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
# YuNet finds faces of about 10 to 300 px: it looks at a copy whose long side is this many pixels.
YUNET_SIZE = 640
# OpenCV Zoo's defaults: the score a face needs, and the overlap above which two boxes are one face.
YUNET_SCORE, YUNET_NMS = 0.6, 0.3
# Faces at 45 degrees to every quarter turn score lower: with any_roll YuNet keeps faces from this score.
# On the validation photos turned by 135 degrees it misses 6 of the 201 faces, against 11 at 0.6
# (docs/results.md, "Detection").
YUNET_ANY_ROLL_SCORE = 0.45
# dlib's box from YuNet's five points (eye centres, nose tip, mouth corners), in units of their spread and
# turned with the face's roll: measured on the 1,811 training faces of ../shared/data/300w_subset by
# `python evaluate.py --fit-box --data-dir ../shared/data/300w_subset --xml labels_ibug_300W_train.xml`: all
# 1,811 found; the RMS misfit is 8.9% of dlib's box side in side and 4.8% (x), 5.0% (y) in centre, about
# as close as dlib's own box comes to the box from all 68 labelled points (landmarks.DLIB_RELATION).
YUNET_RELATION = BoxRelation(side=3.7609, dx=-0.0167, dy=-0.0680)
# Two detections from different quarter turns are one face when their boxes overlap this much.
SAME_FACE_IOU = 0.3
# With any_roll, each face is looked at again in a crop levelled by its roll (and in that crop turned
# upside down): LEVEL_CROP pixels a side, LEVEL_EXTENT of the face's dlib box side across.
LEVEL_CROP, LEVEL_EXTENT = 192, 2.2


@dataclass(frozen=True)
class Detection:
    box: Box                    # dlib's convention in the picture's pixels, square, as if the face were upright
    score: float                # the detector's confidence; 1 for HOG, which gives none
    roll: float = 0.0           # degrees the eye line is turned, clockwise on screen; 0 for HOG (upright only)
    five: np.ndarray | None = None  # YuNet's (5, 2) points: right eye, left eye, nose, mouth corners
    own_box: Box | None = None  # the detector's own box, before mapping to dlib's convention


def load_hog():
    """dlib's HOG frontal face detector: the one whose boxes the 300-W training labels use."""
    try:
        import dlib
    except ImportError:
        raise UsageError("finding faces needs dlib's face detector: pip install dlib-bin "
                         "(or, with --image, pass --box left,top,width,height)") from None
    return dlib.get_frontal_face_detector()


def detect_faces(detector, gray: Image.Image, upsample: int = HOG_UPSAMPLE) -> list[Box]:
    """HOG's face boxes in dlib's XML convention (rect.width() counts both edge pixels, as the labels do).

    The detector sees the grayscale the network sees: on the colour original it also took the mission
    patch on the astronaut's suit, in the tests' photo, for a face.
    """
    rects = detector(np.asarray(gray, np.uint8), upsample)
    return [Box(r.left(), r.top(), r.width(), r.height()) for r in rects]


def check_sha256(path: Path, expected: str) -> bytes:
    """The file's bytes, or WeightsError in one line when it is missing or not the file it claims to be."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the face detector model ({e.strerror or e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise WeightsError(f"{path}: sha256 {digest[:16]}..., expected {expected[:16]}...: not the model the "
                           f"project ships; restore it with `git checkout -- {Path(path).name}`")
    return data


def eye_roll(five: np.ndarray) -> float:
    """Degrees from the right eye (on the left of an upright face's picture) to the left eye."""
    (x0, y0), (x1, y1) = five[0], five[1]
    return math.degrees(math.atan2(y1 - y0, x1 - x0))


def box_from_five(five: np.ndarray, relation: BoxRelation = YUNET_RELATION,
                  roll: float | None = None) -> tuple[Box, float]:
    """dlib's box for the face whose YuNet points these are, in the face's own upright frame, and its roll
    (the eye line's, unless given)."""
    roll = eye_roll(five) if roll is None else roll
    mean, spread = point_spread(five)
    c, s = math.cos(math.radians(roll)), math.sin(math.radians(roll))
    offset = np.array([[c, -s], [s, c]]) @ np.array([relation.dx, relation.dy]) * spread
    side = relation.side * spread
    center = mean + offset
    return Box(float(center[0] - side / 2), float(center[1] - side / 2), float(side), float(side)), roll


def fit_five_relation(fives: np.ndarray, boxes: list[Box]) -> tuple[BoxRelation, dict[str, float]]:
    """Least squares of dlib's box side and centre offset on the five points' spread, the offset measured in
    the face's own frame (turned back by its roll); with the RMS misfits in units of the box side."""
    mean, spread = point_spread(fives)
    rolls = np.radians([eye_roll(f) for f in fives])
    b = np.array([tuple(x) for x in boxes], np.float64)
    side = (b[:, 2] + b[:, 3]) / 2
    d = b[:, :2] + b[:, 2:] / 2 - mean
    c, s = np.cos(rolls), np.sin(rolls)
    targets = {"side": side, "dx": c * d[:, 0] + s * d[:, 1], "dy": -s * d[:, 0] + c * d[:, 1]}
    coefficients = {k: float(spread @ y / (spread @ spread)) for k, y in targets.items()}
    misfit = {k: float(np.sqrt((((y - coefficients[k] * spread) / side) ** 2).mean())) for k, y in targets.items()}
    return BoxRelation(**coefficients), misfit


def quarter_turn_points(points: np.ndarray, turns: int, size: tuple[int, int]) -> np.ndarray:
    """Points found in np.rot90(image, turns) -> the image's own pixels (`size`: its width, height)."""
    x, y = points[..., 0], points[..., 1]
    for done in reversed(range(turns % 4)):  # undo the last quarter turn first
        width = size[0] if done % 2 == 0 else size[1]  # of the image that turn was applied to
        x, y = (width - 1) - y, x
    return np.stack([x, y], -1)


class YuNet:
    """YuNet on a picture of any size: it looks at a copy YUNET_SIZE pixels on its long side, and with
    `any_roll` also at that copy turned by a quarter, a half and three quarters (exact turns, nothing
    resampled), keeping each face's best detection. Its sha256 is checked before OpenCV reads it."""

    def __init__(self, any_roll: bool = False, size: int = YUNET_SIZE, path: Path = YUNET_FILE,
                 relation: BoxRelation = YUNET_RELATION, score: float | None = None):
        data = check_sha256(path, YUNET_SHA256)
        score = (YUNET_ANY_ROLL_SCORE if any_roll else YUNET_SCORE) if score is None else score
        # From the bytes just checked, not the path again: the file cannot change in between.
        self.net = cv2.FaceDetectorYN.create("onnx", np.frombuffer(data, np.uint8), np.zeros(0, np.uint8),
                                             (size, size), score, YUNET_NMS, 5000)
        self.any_roll, self.size, self.relation = any_roll, size, relation

    def raw(self, bgr: np.ndarray) -> np.ndarray:
        """(N, 15) rows as OpenCV gives them: box (4), five points (10), score."""
        self.net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, found = self.net.detect(np.ascontiguousarray(bgr))
        return np.zeros((0, 15), np.float32) if found is None else found

    def __call__(self, picture: np.ndarray) -> list[Detection]:
        """Faces in an (H, W) gray or (H, W, 3) RGB uint8 picture, in its pixels, best first."""
        rgb = np.repeat(picture[..., None], 3, -1) if picture.ndim == 2 else picture
        height, width = rgb.shape[:2]
        scale = min(1.0, self.size / max(height, width))
        # Bilinear, not area-averaged: 0.5 against 3.3 ms a 1024 px photo, and on the validation photos the same
        # faces found (99.5%) at the same NME (3.38% against 3.39%).
        small = cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                           interpolation=cv2.INTER_LINEAR) if scale < 1 else rgb
        bgr = np.ascontiguousarray(small[..., ::-1])
        found = []
        for turns in range(4 if self.any_roll else 1):
            for row in self.raw(np.rot90(bgr, turns)):
                corners = quarter_turn_points(np.array([row[:2], row[:2] + row[2:4]]), turns, small.shape[1::-1])
                five = quarter_turn_points(row[4:14].reshape(5, 2), turns, small.shape[1::-1])
                five, corners = ((p + 0.5) / scale - 0.5 for p in (five, corners))  # back in the picture's pixels
                (x0, y0), (x1, y1) = corners.min(0), corners.max(0)
                box, roll = box_from_five(five, self.relation)
                found.append(Detection(box, float(row[14]), roll, five, Box(x0, y0, x1 - x0, y1 - y0)))
        found = distinct(found)
        return [self.level(rgb, d) for d in found] if self.any_roll else found

    def level(self, rgb: np.ndarray, detection: Detection) -> Detection:
        """The face looked at again, in a crop levelled by its roll and in the same crop upside down: YuNet
        sees a face best upright, so the better-scored look says which way up it is. (Its eye points lean
        strongly towards the level of whatever it looks at, so looking again does not sharpen the roll
        much: the landmark network's later looks do that, faces.Landmarker's passes.)"""
        looks = [look for look in (self.look_levelled(rgb, detection, extra) for extra in (0.0, 180.0)) if look]
        return max(looks, key=lambda d: d.score) if looks else detection

    def look_levelled(self, rgb: np.ndarray, detection: Detection, extra: float) -> Detection | None:
        roll = detection.roll + extra
        scale = LEVEL_CROP / (LEVEL_EXTENT * detection.box.side)
        # Picture -> crop: about the face's centre, turned back by its roll, to LEVEL_CROP pixels.
        matrix = cv2.getRotationMatrix2D(tuple(map(float, detection.box.center)), roll, scale)
        matrix[:, 2] += LEVEL_CROP / 2 - detection.box.center
        crop = cv2.warpAffine(rgb, matrix, (LEVEL_CROP, LEVEL_CROP), flags=cv2.INTER_LINEAR)
        rows = self.raw(np.ascontiguousarray(crop[..., ::-1]))
        if not len(rows):
            return None
        row = rows[np.argmin(np.linalg.norm(rows[:, :2] + rows[:, 2:4] / 2 - LEVEL_CROP / 2, axis=1))]
        inverse = cv2.invertAffineTransform(matrix)
        roll = eye_roll(row[4:14].reshape(5, 2) @ inverse[:, :2].T + inverse[:, 2])
        # The box from the first look's points (the picture itself, not a resampled crop), turned by this roll.
        box, _ = box_from_five(detection.five, self.relation, roll)
        return Detection(box, float(row[14]), roll, detection.five, detection.own_box)


def distinct(found: list[Detection]) -> list[Detection]:
    """One detection per face. A face seen in several quarter turns is seen at its roll in each, and YuNet's
    eye points lean towards the upright of the turn it looked at, the other way in the next turn: the
    rolls that agree (within 45 degrees) outvote one turn that took an upside-down face for an upright one,
    and their score-weighted mean cancels the lean."""
    kept: list[Detection] = []
    for group in same_faces(found):
        support = [sum(o.score for o in group if abs(angle_between(o.roll, d.roll)) < 45) for d in group]
        best = group[int(np.argmax(support))]
        agree = [o for o in group if abs(angle_between(o.roll, best.roll)) < 45]
        roll = best.roll + sum(o.score * angle_between(o.roll, best.roll) for o in agree) / sum(o.score for o in agree)
        box, _ = box_from_five(best.five, YUNET_RELATION, roll) if best.five is not None else (best.box, roll)
        kept.append(Detection(box, best.score, (roll + 180) % 360 - 180, best.five, best.own_box))
    return kept


def same_faces(found: list[Detection]) -> list[list[Detection]]:
    """Detections grouped by face: each joins the group of the best-scored one its box overlaps."""
    groups: list[list[Detection]] = []
    for d in sorted(found, key=lambda d: -d.score):
        home = next((g for g in groups if box_iou(d.box, g[0].box) >= SAME_FACE_IOU), None)
        if home is None:
            groups.append([d])
        else:
            home.append(d)
    return groups


def angle_between(a: float, b: float) -> float:
    """a - b in degrees, in [-180, 180)."""
    return (a - b + 180) % 360 - 180


def any_roll_problem(name, any_roll: bool, flags: bool = False) -> str | None:
    """Why any_roll cannot go with this detector (None: YuNet's default), or None: only YuNet looks at the
    photo's quarter turns. Said with the scripts' flags, or the Landmarker's parameters."""
    if not any_roll or name in (None, "yunet"):
        return None
    said = "--any-roll goes with --detector yunet" if flags else 'any_roll=True: goes with detector="yunet"'
    return said + (": dlib's HOG finds upright faces only" if name == "hog" else
                   ": only YuNet looks at the picture turned; your own detector finds what it finds")


# A detector handed in: RGB picture (H, W, 3) uint8 -> boxes (left, top, width, height), with a score each if
# it has them: a list of 4- or 5-tuples, an (N, 4) or (N, 5) array, or Detections (face-alignment's and
# MediaPipe's detectors give such boxes).
DetectorFunction = Callable[[np.ndarray], object]


def as_detections(found, name: str) -> list[Detection]:
    """What a user's detector returned, as Detections (its box taken as dlib's convention: the looks after the
    first level and frame the face by its own points), or UsageError naming the detector and what it gave."""
    if isinstance(found, list) and all(isinstance(d, Detection) for d in found):
        return found
    try:
        rows = np.asarray(found, np.float64).reshape(-1, np.shape(found)[-1] if len(found) else 4)
    except (TypeError, ValueError, IndexError):
        rows = None
    if rows is None or rows.shape[1] not in (4, 5) or not np.isfinite(rows).all() or (rows[:, 2:4] <= 0).any():
        raise UsageError(f"detector={name}: returned {str(found)[:80]!r}; expected (left, top, width, height) boxes "
                         f"of positive size, with a score after each if it has them", "detector")
    return [Detection(Box(*map(float, row[:4])), float(row[4]) if len(row) == 5 else 1.0) for row in rows]


def make_detector(spec: "str | DetectorFunction" = "yunet", any_roll: bool = False, upsample: int = HOG_UPSAMPLE,
                  min_score: float | None = None,
                  max_faces: int | None = None) -> Callable[[np.ndarray], list[Detection]]:
    """picture (H, W) gray or (H, W, 3) RGB uint8 -> [Detection], surest first: `yunet`, `hog` (upright faces
    only) or a function of the user's (DetectorFunction), each through the same door. `min_score` drops
    faces the detector is less sure of (YuNet looks for them down to it); `max_faces` keeps the surest."""
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        find = lambda picture: as_detections(spec(np.ascontiguousarray(  # noqa: E731
            np.repeat(picture[..., None], 3, -1) if picture.ndim == 2 else picture)), name)
    elif spec == "yunet":
        find = YuNet(any_roll, score=min_score)
    elif spec == "hog":
        find = hog_detector(upsample)
    else:
        raise UsageError(f"detector={spec}: expected one of {', '.join(DETECTORS)}, or a function from an RGB "
                         f"picture to boxes", "detector")

    def detect(picture: np.ndarray) -> list[Detection]:
        found = sorted(find(picture), key=lambda d: -d.score)
        found = [d for d in found if min_score is None or d.score >= min_score]
        return found[:max_faces]

    return detect


def hog_detector(upsample: int) -> Callable[[np.ndarray], list[Detection]]:
    hog = load_hog()

    def find(picture: np.ndarray) -> list[Detection]:
        gray = picture if picture.ndim == 2 else cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY)
        return [Detection(box, 1.0) for box in detect_faces(hog, Image.fromarray(gray), upsample)]

    return find
