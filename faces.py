"""Landmarks on the faces of one picture, from Python: a detector finds them, each is cropped level with its roll, and the network puts the points; photos, video and evaluation all go through here."""
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
from PIL import Image

from checkpoints import RELEASED_WEIGHTS, load_for_inference
from detectors import HOG_UPSAMPLE, YUNET_SIZE, Detection, make_detector
from errors import DataError, UsageError
from images import open_photo, readable_mode, to_gray
from landmarks import Box, Markup, level_frame, rescale
from pose import head_pose
from runtime import Network, pick_device, points_and_scores
from transforms import Augment, Transforms

# A photo given by its path decodes at 1/2, 1/4 or 1/8 scale while its long side stays at least this: twice
# what the detector looks at, and enough for the crop of any face the detector can find in it.
DECODE_AT_LEAST = 2 * YUNET_SIZE
# With --any-roll, a first look whose points score below this on average is doubtful: the detector may have
# taken the face sideways or the wrong way up, so it is looked at turned the other ways too, and the surest
# look kept. On the validation faces the faces whose look failed (NME above 10%) scored 0.32-0.59, and 95% of
# the rest above 0.68 even in photos turned 60-135 degrees (docs/results.md, "Detection: YuNet and any roll").
DOUBTFUL_SCORE = 0.7
# Each eighth of the way round, where a second look levels each turn's points (docs/results.md has eighths
# against quarters); each quarter, for a markup without eye corners to level by.
EIGHTH_TURNS = (45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0)
QUARTER_TURNS = (90.0, 180.0, 270.0)


def default_passes(detector: str, any_roll: bool, boxes_given: bool) -> int:
    """Looks per face when none is asked for: a second one, levelled and framed by the first look's points,
    wherever the first crop is framed by anything but YuNet's five points on an upright photo. It pays there (on
    the validation faces: the 300-W protocol's HOG boxes 3.71% -> 3.60%; at any roll the worst angle 1.31x ->
    1.12x the upright NME) and not on YuNet's upright crops (3.61% either way; docs/results.md, "Detection:
    YuNet and any roll")."""
    return 1 if detector == "yunet" and not any_roll and not boxes_given else 2


@dataclass(frozen=True)
class FaceLandmarks:
    box: Box                 # the crop's box in dlib's convention, in the picture's pixels (upright frame)
    points: np.ndarray       # (K, 2) in the picture's pixels
    roll: float = 0.0        # degrees the crop was turned to level the face, clockwise on screen
    detector_score: float = 1.0
    scores: np.ndarray | None = None  # (K,) in [0, 1]: how sure the network is of each point; None: regression head
    pose: tuple[float, float, float] | None = None  # yaw, pitch, roll in degrees (pose.py); None: not iBUG's 68

    def to_dict(self) -> dict:
        return {**face_fields(self.box, self.points, self.scores, self.pose),
                "roll": round(float(self.roll), 1), "detector_score": round(float(self.detector_score), 3)}


def face_fields(box: Box, points: np.ndarray, scores: np.ndarray | None,
                pose: tuple[float, float, float] | None) -> dict:
    """A face's box, points, point scores and pose as the JSON of photos and of video frames holds them."""
    return {"box": [round(float(v), 2) for v in box], "points": np.round(points.astype(np.float64), 2).tolist(),
            "scores": None if scores is None else np.round(scores.astype(np.float64), 3).tolist(),
            "pose": None if pose is None else [round(float(v), 1) for v in pose]}


def level(detection: Detection) -> Augment:
    """The crop that turns the face upright: rotated against its roll."""
    return Augment(angle=-detection.roll)


def predict_faces(model: Network, transform: Transforms, gray: Image.Image, detections: list[Detection],
                  device: torch.device, with_pose: bool = True) -> list[FaceLandmarks]:
    """All faces of one picture as one batch, each cropped level with its roll; with_pose=False leaves out
    the head pose (the video tracker takes it of the smoothed points instead)."""
    if not detections:
        return []
    no_points = np.zeros((1, 2))  # the transform moves points too; here there are none to move
    batch = torch.stack([transform(gray, d.box, no_points, level(d))[0] for d in detections])
    with torch.inference_mode():
        pred, scores = points_and_scores(model, batch.to(device))
    pred = pred.float().cpu().numpy()
    scores = [None] * len(detections) if scores is None else scores.float().cpu().numpy()
    faces = []
    for p, s, d in zip(pred, scores, detections):
        points = transform.to_image(p, d.box, level(d))
        pose = head_pose(points, *gray.size) if with_pose else None
        faces.append(FaceLandmarks(d.box, points, d.roll, d.score, s, pose))
    return faces


def turned(detection: Detection, degrees: float) -> Detection:
    """The same detection with its roll turned by `degrees`, kept in (-180, 180]."""
    return replace(detection, roll=180.0 - (180.0 - detection.roll - degrees) % 360.0)


def surest_turns(model: Network, transform: Transforms, gray: Image.Image, detections: list[Detection],
                 faces: list[FaceLandmarks], device: torch.device, markup: Markup) -> list[FaceLandmarks]:
    """Each face whose points score below DOUBTFUL_SCORE looked at again turned each eighth of the way round,
    each turn's look followed by a second one on the crop its points level and frame; of those second looks,
    the one whose points score highest on average is kept. Judged after levelling, a turn that was off by
    45 degrees competes as a level face, not as a tilted one that may happen to score high.

    A markup without eye corners to level by gets no second looks: its doubtful faces are looked at each
    quarter turn, and the first look that scores highest is kept. Faces without scores stay as they are."""
    doubtful = [i for i, f in enumerate(faces) if f.scores is not None and f.scores.mean() < DOUBTFUL_SCORE]
    if not doubtful:
        return faces
    levels = markup.nme_points is not None
    steps = EIGHTH_TURNS if levels else QUARTER_TURNS
    k = len(steps)
    looks = predict_faces(model, transform, gray, [turned(detections[i], q) for i in doubtful for q in steps], device)
    candidates = [look for j, i in enumerate(doubtful) for look in (faces[i], *looks[j * k:(j + 1) * k])]
    if levels:
        candidates = predict_faces(model, transform, gray,
                                   [level_crop(f.points, markup, f.detector_score) for f in candidates], device)
    surest = list(faces)
    for j, i in enumerate(doubtful):
        surest[i] = max(candidates[j * (k + 1):(j + 1) * (k + 1)], key=lambda f: f.scores.mean())
    return surest


def level_crop(points: np.ndarray, markup: Markup, score: float = 1.0) -> Detection:
    """The crop that a face's points put it in (landmarks.level_frame), as a detection."""
    box, roll = level_frame(points, markup)
    return Detection(box, score, roll)


def as_picture(image) -> tuple[Image.Image, int]:
    """A path, a PIL image or a numpy array (H x W gray, H x W x 3 RGB, uint8) -> a PIL image, and the
    factor a path's JPEG was shrunk by while decoding."""
    if isinstance(image, (str, Path)):
        return open_photo(Path(image), DECODE_AT_LEAST)
    if isinstance(image, Image.Image):
        try:
            return readable_mode(image), 1
        except ValueError as e:
            raise DataError(f"a PIL image in mode {image.mode}: cannot read it ({e})", "unreadable image") from None
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise UsageError(f"expected an H x W or H x W x 3 uint8 array, got {image.dtype} of shape {image.shape}")
        return Image.fromarray(image), 1
    raise UsageError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")


def detector_view(photo: Image.Image, gray: Image.Image) -> np.ndarray:
    """What the detector looks at: the photo in RGB where converting keeps it faithful, else its grayscale."""
    faithful = photo.mode in ("RGB", "L", "CMYK", "YCbCr", "P") and "transparency" not in photo.info
    return np.asarray(photo.convert("RGB") if faithful and photo.mode != "L" else gray)


@dataclass
class Timings:
    """Seconds spent in each step, summed over calls: where a folder's time goes."""
    decode: float = 0.0
    detect: float = 0.0
    landmarks: float = 0.0
    calls: int = field(default=0)


class Landmarker:
    """Faces and their landmarks in a picture, three lines from import to points:

        from faces import Landmarker
        landmarker = Landmarker()              # the released weights, YuNet, the CPU's fastest path
        faces = landmarker("photo.jpg")        # or a PIL image, or an H x W (x 3) uint8 numpy array

    Each face has .box, .points (K, 2) in the picture's pixels, .scores (K,) in [0, 1], .pose (yaw, pitch,
    roll in degrees), .roll (of its crop), .detector_score and .to_dict().
    passes=2 (or more) looks again at each face, on the crop levelled and framed by the last look's points;
    None: as default_passes says, where a second look pays.
    any_roll=True also finds faces turned sideways or upside down, and looks at a doubtful face turned each
    eighth of the way round (surest_turns).
    int8=False keeps the bf16/fp32 network where the int8 one would run (checkpoints.load_for_inference).
    """

    def __init__(self, weights: str | Path | None = None, device: str = "auto", detector: str = "yunet",
                 any_roll: bool = False, upsample: int = HOG_UPSAMPLE, eager: bool = False, passes: int | None = None,
                 int8: bool = True):
        weights = Path(weights) if weights else RELEASED_WEIGHTS
        if not weights.is_file() and weights == RELEASED_WEIGHTS:
            raise UsageError(f"{RELEASED_WEIGHTS}: the project's weights are not in this checkout yet; train with "
                             f"`python train.py --recipe best --out runs/best` and pass --weights runs/best/best.pt")
        self.device = pick_device(device)
        self.weights = weights
        self.model, self.config = load_for_inference(weights, self.device, eager, int8)
        self.markup = Markup.from_config(self.config)
        self.transform = Transforms(self.config.get("img_size", 224), train=False)
        self.detect = make_detector(detector, any_roll, upsample)
        self.any_roll = any_roll
        self.timings = Timings()
        self.detector, self.passes = detector, passes

    def __call__(self, image, boxes: list[Box] | None = None) -> list[FaceLandmarks]:
        """The faces of `image`, or with `boxes` (dlib's convention, upright) the faces in those boxes."""
        photo, factor = self.open(image)
        return self.in_photo(photo, factor, boxes)[0]

    def open(self, image) -> tuple[Image.Image, int]:
        start = perf_counter()
        photo, factor = as_picture(image)
        self.timings.decode += perf_counter() - start
        return photo, factor

    def in_photo(self, photo: Image.Image, factor: int = 1,
                 boxes: list[Box] | None = None) -> tuple[list[FaceLandmarks], Image.Image]:
        """The faces of a decoded photo shrunk by `factor`, in the full photo's pixels; and its grayscale."""
        start = perf_counter()
        gray = to_gray(photo)
        if boxes is None:
            detections = self.detect(detector_view(photo, gray))
        else:
            detections = [Detection(rescale(inside(b, photo, factor), np.zeros((1, 2)), 1 / factor, np.zeros(2))[0], 1.0)
                          for b in boxes]
        middle = perf_counter()
        faces = self.look(gray, detections, self.passes_for(boxes is not None))
        self.timings.detect += middle - start
        self.timings.landmarks += perf_counter() - middle
        self.timings.calls += 1
        return [full_size(f, factor) for f in faces], gray

    def passes_for(self, boxes_given: bool) -> int:
        """The looks each face gets: those asked for, else default_passes'."""
        return default_passes(self.detector, self.any_roll, boxes_given) if self.passes is None else self.passes

    def look(self, gray: Image.Image, detections: list[Detection], passes: int = 1) -> list[FaceLandmarks]:
        """The network on each detection's crop (with any_roll, a doubtful one also turned each eighth of the way);
        each further pass again, on the crop the last one's points level and frame."""
        faces = predict_faces(self.model, self.transform, gray, detections, self.device)
        if self.any_roll:
            faces = surest_turns(self.model, self.transform, gray, detections, faces, self.device, self.markup)
        for _ in range(passes - 1 if self.markup.nme_points is not None else 0):
            crops = [level_crop(f.points, self.markup, f.detector_score) for f in faces]
            faces = predict_faces(self.model, self.transform, gray, crops, self.device)
        return faces


def inside(box: Box, photo: Image.Image, factor: int) -> Box:
    """A given box, or UsageError in one line when it lies wholly outside the photo (its points would too)."""
    width, height = photo.width * factor, photo.height * factor
    if box.left >= width or box.top >= height or box.left + box.width <= 0 or box.top + box.height <= 0:
        raise UsageError(f"--box {','.join(f'{v:g}' for v in box)}: lies wholly outside the {width}x{height} photo")
    return box


def full_size(face: FaceLandmarks, factor: int) -> FaceLandmarks:
    """A face found on a photo decoded at 1/factor scale, in the full photo's pixels."""
    if factor == 1:
        return face
    box, points = rescale(face.box, face.points, factor, np.zeros(2))
    return FaceLandmarks(box, points, face.roll, face.detector_score, face.scores, face.pose)
