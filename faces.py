"""Landmarks on faces from Python: the Landmarker and its options, for one picture, a batch of them or a video; a detector finds the faces (YuNet, dlib's HOG or your own), each is cropped level with its roll, and the network puts the points. Photos, video, evaluation and torch.hub all go through here."""
import copy
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
from PIL import Image

import tracking
import video
from checkpoints import PRECISIONS, RELEASED_WEIGHTS, load_for_inference
from detectors import DETECTORS, HOG_UPSAMPLE, YUNET_SIZE, Detection, any_roll_problem, make_detector
from errors import DataError, UsageError
from images import array_picture, open_photo, readable_mode, rgb_is_faithful, to_gray
from landmarks import Box, rescale
from looks import FaceLandmarks, Looker, look_again, surest_turns
from runtime import autocast, pick_device
from transforms import Transforms

# A photo given by its path decodes at 1/2, 1/4 or 1/8 scale while its long side stays at least this: twice
# what the detector looks at, and enough for the crop of any face the detector can find in it.
DECODE_AT_LEAST = 2 * YUNET_SIZE
# Pictures Landmarker.batch decodes and looks at together: enough to fill the network's calls, few enough that a
# long list of photos is never all in memory at once.
BATCH_PICTURES = 32
# What LandmarkerOptions.dtype takes: the precision of the network's call on CUDA (autocast). On the CPU the
# fast network sets it (int8, or bf16/fp32 frozen: checkpoints.load_for_inference).
DTYPES = {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LandmarkerOptions:
    """Every setting of a Landmarker, written once: the Python API, photos.py's workers, video.py, torch.hub and
    the scripts (from their flags of the same names, from_flags) all pass one of these (MediaPipe's
    FaceLandmarkerOptions). Checked when made: a value a setting does not take raises UsageError naming it."""
    weights: str | Path | None = None   # a file of train.py or export.py --release; None: the released weights
    device: str = "auto"                # cpu, cuda, cuda:N; auto: the GPU where there is one
    detector: str | Callable = "yunet"  # "yunet", "hog", or a function: RGB picture -> (left, top, width, height)
    any_roll: bool = False              # also find faces turned sideways or upside down (YuNet)
    upsample: int = HOG_UPSAMPLE        # with "hog": times it doubles the picture first
    passes: int | None = None           # looks per face; None: default_passes
    flip: bool = False                  # average each face with its mirror image (twice the network's time)
    max_faces: int | None = None        # keep the surest this many faces of each picture
    min_score: float | None = None      # the detector's score a face needs; None: the detector's own default
    eager: bool = False                 # run the network as loaded, not made fast for the CPU
    int8: bool = True                   # int8 among the CPU's candidates where the weights and the CPU allow it
    precision: str = "auto"             # the CPU path: the fastest on this CPU (auto), or int8, bf16, fp32
    dtype: str = "auto"                 # on CUDA: fp32, bf16 or fp16 autocast; auto: bf16 where the GPU has it

    def __post_init__(self):
        problems = [
            ("detector", callable(self.detector) or self.detector in DETECTORS,
             f"expected one of {', '.join(DETECTORS)}, or a function from an RGB picture to boxes"),
            ("passes", self.passes is None or (isinstance(self.passes, int) and 1 <= self.passes <= 4),
             "expected 1 to 4 looks, or None"),
            ("max_faces", self.max_faces is None or (isinstance(self.max_faces, int) and self.max_faces >= 1),
             "expected a whole number of at least 1, or None"),
            ("min_score", self.min_score is None or (self.detector != "hog" and 0 <= self.min_score <= 1),
             "expected a score in [0, 1] from YuNet or your own detector (dlib's HOG gives none), or None"),
            ("upsample", isinstance(self.upsample, int) and 0 <= self.upsample <= 4, "expected 0 to 4"),
            ("dtype", self.dtype in DTYPES, f"expected one of {', '.join(DTYPES)}"),
            ("precision", self.precision in PRECISIONS, f"expected one of {', '.join(PRECISIONS)}"),
        ]
        for name, fine, expected in problems:
            if not fine:
                raise UsageError(f"{name}={getattr(self, name)!r}: {expected}", name)
        if problem := any_roll_problem(self.detector, self.any_roll):
            raise UsageError(problem, "any_roll")

    @staticmethod
    def add_network_flags(parser) -> None:
        """The flags of the network's own settings, as predict.py, evaluate.py and video_bench.py all take them."""
        parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (default: auto)")
        parser.add_argument("--eager", action="store_true",
                            help="run the network as loaded, not made fast for the CPU (same points, slower)")
        parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                            help="the CPU path: auto, the fastest of the int8, bf16 and fp32 paths on this CPU (timed on the "
                                 "first start with these weights, and kept); or the one named (docs/scripts.md)")
        parser.add_argument("--no-int8", action="store_true",
                            help="leave int8 out of the CPU paths auto chooses from (it needs weights with "
                                 "calibration crops: OpenVINO, or onnxruntime on a CPU with VNNI)")

    @classmethod
    def from_flags(cls, args, **overrides) -> "LandmarkerOptions":
        """The options a script's flags set: each flag of an option's name, and --no-int8."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        if getattr(args, "no_int8", False):
            given["int8"] = False
        return cls(**(given | overrides))


def default_passes(detector, any_roll: bool, boxes_given: bool) -> int:
    """Looks per face when none is asked for: a second one, levelled and framed by the first look's points,
    wherever the first crop is framed by anything but YuNet's five points on an upright photo. It pays there (on
    the validation faces: the 300-W protocol's HOG boxes 3.71% -> 3.60%; at any roll the worst angle 1.31x ->
    1.12x the upright NME; another detector's boxes are framed as it frames them) and not on YuNet's upright
    crops (3.61% either way; docs/results.md, "Detection: YuNet and any roll")."""
    return 1 if detector == "yunet" and not any_roll and not boxes_given else 2


def as_picture(image) -> tuple[Image.Image, int]:
    """A path, a PIL image, a numpy array (images.array_picture says which) or a tensor -> a PIL image, and the
    factor a path's JPEG was shrunk by while decoding."""
    if isinstance(image, (str, Path)):
        return open_photo(Path(image), DECODE_AT_LEAST)
    if isinstance(image, Image.Image):
        if 0 in image.size:
            raise DataError(f"a PIL image of size {image.width}x{image.height}: an empty picture", "unreadable image")
        try:
            return readable_mode(image), 1
        except (ValueError, OSError) as e:
            raise DataError(f"a PIL image in mode {image.mode}: cannot read it ({e})", "unreadable image") from None
    if isinstance(image, torch.Tensor):  # a picture as torchvision's transforms leave it: C x H x W
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return array_picture(image), 1
    raise UsageError(f"image={type(image).__name__}: expected a path, a PIL image, a numpy array or a tensor", "image")


def detector_view(photo: Image.Image, gray: Image.Image) -> np.ndarray:
    """What the detector looks at: the photo in RGB where converting keeps it faithful, else its grayscale."""
    return np.asarray(photo.convert("RGB") if rgb_is_faithful(photo) and photo.mode != "L" else gray)


@dataclass
class Timings:
    """Seconds spent in each step, summed over calls: where a folder's time goes. `start`: building the
    Landmarker (reading the weights, building or loading the fast network, the detector)."""
    start: float = 0.0
    decode: float = 0.0
    detect: float = 0.0
    landmarks: float = 0.0
    draw: float = 0.0        # photos.py's annotated pictures, counted here beside the rest
    calls: int = field(default=0)


class Landmarker:
    """Faces and their landmarks in pictures, three lines from import to points:

        from faces import Landmarker
        landmarker = Landmarker()              # the released weights, YuNet, the CPU's fastest path
        faces = landmarker("photo.jpg")        # or a PIL image, a numpy array (RGB), a tensor

    Each face has .box, .points (K, 2) in the picture's pixels, .scores (K,) in [0, 1], .pose (yaw, pitch,
    roll in degrees), .roll (of its crop), .detector_score and .to_dict(). Settings come as LandmarkerOptions,
    or as its keywords (Landmarker(passes=2, max_faces=1)), which win over the options given. batch() takes
    many pictures at once, video() a file or a camera.
    """

    def __init__(self, options: "LandmarkerOptions | str | Path | None" = None, **keywords):
        started = perf_counter()
        if isinstance(options, (str, Path)):  # Landmarker("my_weights.pt"), as the weights file alone
            options = LandmarkerOptions(weights=options)
        self.options = options = replace(options or LandmarkerOptions(), **keywords)
        weights = Path(options.weights) if options.weights else RELEASED_WEIGHTS
        if not weights.is_file() and weights == RELEASED_WEIGHTS:
            raise UsageError(f"weights={RELEASED_WEIGHTS}: the project's weights are not in this checkout yet; train "
                             f"with `python train.py --recipe best --out runs/best` and pass runs/best/best.pt",
                             "weights")
        self.device = pick_device(options.device)
        if options.dtype not in ("auto", "fp32") and self.device.type != "cuda":
            raise UsageError(f"dtype={options.dtype!r}: sets the precision on CUDA; on the CPU precision= sets it",
                             "dtype")
        if options.precision != "auto" and (self.device.type != "cpu" or options.eager):
            raise UsageError(f"precision={options.precision!r}: picks the fast CPU network's path; "
                             + ("eager=True runs the network as loaded" if options.eager else
                                "on CUDA dtype= sets the precision"), "precision")
        self.weights = weights
        self.model, self.config = load_for_inference(weights, self.device, options.eager, options.int8,
                                                     options.precision)
        self.markup = self.config.markup
        if options.flip and self.markup.flip is None:
            raise UsageError(f"flip=True: {weights} puts {self.markup.num_points} points with no mirror pairs, so "
                             f"which point mirrors which is unknown", "flip")
        self.looker = Looker(self.model, Transforms(self.config.img_size, train=False), self.device,
                             self.markup.flip if options.flip else None, self.precision())
        self.detect = make_detector(options.detector, options.any_roll, options.upsample, options.min_score,
                                    options.max_faces)
        self.timings = Timings(start=perf_counter() - started)

    def with_options(self, **changes) -> "Landmarker":
        """This Landmarker under other detector or look settings, sharing its network (evaluate.py scores one
        weights file several ways without building it again). The network's own settings stay."""
        options = replace(self.options, **changes)
        fixed = [k for k in ("weights", "device", "eager", "int8", "precision", "dtype", "flip")
                 if getattr(options, k) != getattr(self.options, k)]
        if fixed:
            raise UsageError(f"{fixed[0]}={getattr(options, fixed[0])!r}: set when the network is built; make "
                             f"another Landmarker", fixed[0])
        other = copy.copy(self)
        other.options, other.timings = options, Timings()
        other.detect = make_detector(options.detector, options.any_roll, options.upsample, options.min_score,
                                     options.max_faces)
        return other

    def precision(self) -> Callable | None:
        """The autocast around the network's call: on CUDA as dtype says; None on the CPU."""
        if self.device.type != "cuda" or self.options.dtype == "fp32":
            return None
        if self.options.dtype == "auto":
            return lambda: autocast(self.device)
        return lambda: torch.autocast("cuda", dtype=DTYPES[self.options.dtype])

    def __call__(self, image, boxes: list[Box] | None = None) -> list[FaceLandmarks]:
        """The faces of `image`, or with `boxes` (dlib's convention, upright) the faces in those boxes."""
        return self.batch([image], None if boxes is None else [boxes])[0]

    def batch(self, pictures: list, boxes: list[list[Box] | None] | None = None) -> list[list[FaceLandmarks]]:
        """The faces of each picture, as a list per picture: the crops of up to BATCH_PICTURES pictures at a time
        go through the network together, in calls of up to looks.MAX_CROPS crops (so a long list is never all
        decoded at once). `boxes`: for each picture its boxes, or None to detect. A picture that cannot be read
        raises DataError naming it (and its place in the list)."""
        pictures = list(pictures)
        if boxes is not None and len(boxes) != len(pictures):
            raise UsageError(f"boxes=: {len(boxes)} lists of boxes for {len(pictures)} pictures; give one per "
                             f"picture (None to detect its faces)", "boxes")
        found = []
        # Several pictures are decoded on as many threads as cores (PIL lets go of the GIL): 1.24-1.31x a loop
        # of calls for 8 photos in two sessions, against 1.16x decoded one after the other.
        with ThreadPoolExecutor(min(os.cpu_count() or 1, len(pictures)) or 1) as threads:
            for start in range(0, len(pictures), BATCH_PICTURES):
                began = perf_counter()
                numbered = enumerate(pictures[start:start + BATCH_PICTURES], start)
                opened = list(threads.map(self.decode_numbered, numbered, [len(pictures)] * BATCH_PICTURES)
                              if len(pictures) > 1 else map(self.decode_numbered, numbered, [1]))
                self.timings.decode += perf_counter() - began
                chunk = None if boxes is None else boxes[start:start + BATCH_PICTURES]
                found += [faces for faces, _ in self.in_photos([o[:2] for o in opened], chunk, [o[2] for o in opened])]
        return found

    @staticmethod
    def decode_numbered(numbered: tuple[int, object], count: int) -> tuple[Image.Image, int, Image.Image]:
        """A picture of a batch decoded, with its grayscale; DataError naming its place in the batch."""
        i, picture = numbered
        try:
            photo, factor = as_picture(picture)
        except DataError as e:
            raise DataError(f"picture {i}: {e}" if count > 1 else str(e), e.reason) from None
        return photo, factor, to_gray(photo)

    def tracker(self, detect_every: int = tracking.DETECT_EVERY, smoothing: dict | None = tracking.SMOOTHING,
                lost_by: str = tracking.LOST_BY) -> tracking.FaceTracker:
        """video.py's tracker on this Landmarker's network and detector (predict.py --video runs it)."""
        return tracking.video_tracker(self.looker, self.config, self.detect, detect_every, smoothing, lost_by)

    def video(self, source: str | int, detect_every: int = tracking.DETECT_EVERY, smoothing: dict | None = tracking.SMOOTHING,
              lost_by: str = tracking.LOST_BY) -> Iterator[video.VideoFrame]:
        """One result per frame of a video file or camera N (an int, or its number as text): .index, .time
        (seconds), .faces (each with a stable .id, tracked and smoothed as predict.py --video does: `smoothing`
        holds the One Euro filter's settings, None for raw points) and .frame, the BGR picture as OpenCV
        decoded it. video.py owns the tracking; nothing is written."""
        return video.track(str(source), self.tracker(detect_every, smoothing, lost_by))

    def open(self, image) -> tuple[Image.Image, int]:
        start = perf_counter()
        photo, factor = as_picture(image)
        self.timings.decode += perf_counter() - start
        return photo, factor

    def in_photo(self, photo: Image.Image, factor: int = 1,
                 boxes: list[Box] | None = None) -> tuple[list[FaceLandmarks], Image.Image]:
        """The faces of a decoded photo shrunk by `factor`, in the full photo's pixels; and its grayscale."""
        return self.in_photos([(photo, factor)], None if boxes is None else [boxes])[0]

    def in_photos(self, decoded: list[tuple[Image.Image, int]], boxes: list[list[Box] | None] | None = None,
                  grays: list[Image.Image] | None = None) -> list[tuple[list[FaceLandmarks], Image.Image]]:
        """The faces of decoded photos (each with the factor it was shrunk by), in each one's full pixels, and
        their grayscales (made here unless given); one network call for the crops of all of them at each look."""
        boxes = boxes or [None] * len(decoded)
        start = perf_counter()
        grays = grays or [to_gray(photo) for photo, _ in decoded]
        detections = [self.find(photo, gray, factor, given) for (photo, factor), gray, given in
                      zip(decoded, grays, boxes)]
        middle = perf_counter()
        faces = self.look(grays, detections, [self.passes_for(given is not None) for given in boxes])
        self.timings.detect += middle - start
        self.timings.landmarks += perf_counter() - middle
        self.timings.calls += len(decoded)
        return [([full_size(f, factor) for f in found], gray) for found, (_, factor), gray in
                zip(faces, decoded, grays)]

    def find(self, photo: Image.Image, gray: Image.Image, factor: int, boxes: list[Box] | None) -> list[Detection]:
        """The detector's faces, or the boxes given (in the full photo's pixels) where the photo holds them."""
        if boxes is None:
            return self.detect(detector_view(photo, gray))
        return [Detection(rescale(inside(b, photo, factor), np.zeros((1, 2)), 1 / factor, np.zeros(2))[0], 1.0)
                for b in boxes]

    def passes_for(self, boxes_given: bool) -> int:
        """The looks each face gets: those asked for, else default_passes'."""
        o = self.options
        return default_passes(o.detector, o.any_roll, boxes_given) if o.passes is None else o.passes

    def look(self, grays: list[Image.Image], detections: list[list[Detection]],
             passes: list[int]) -> list[list[FaceLandmarks]]:
        """The network on each detection's crop of each picture (with any_roll, a doubtful one also turned each
        eighth of the way); each further pass again, on the crop the last one's points level and frame, for
        the pictures that take that many."""
        flat = self.looker.at([(gray, d) for gray, found in zip(grays, detections) for d in found])
        faces, at = [], 0
        for found in detections:
            faces.append(flat[at:at + len(found)])
            at += len(found)
        if self.options.any_roll:
            faces = [surest_turns(self.looker, gray, found, f, self.markup)
                     for gray, found, f in zip(grays, detections, faces)]
        for k in range(1, max(passes, default=1) if self.markup.nme_points is not None else 1):
            again = [i for i, n in enumerate(passes) if n > k]
            seen = look_again(self.looker, [(grays[i], f) for i in again for f in faces[i]], self.markup)
            for i in again:
                faces[i], seen = seen[:len(faces[i])], seen[len(faces[i]):]
        return faces


def inside(box: Box, photo: Image.Image, factor: int) -> Box:
    """A given box, or UsageError in one line when it lies wholly outside the photo (its points would too)."""
    width, height = photo.width * factor, photo.height * factor
    if box.left >= width or box.top >= height or box.left + box.width <= 0 or box.top + box.height <= 0:
        raise UsageError(f"box={','.join(f'{v:g}' for v in box)}: lies wholly outside the {width}x{height} photo",
                         "box")
    return box


def full_size(face: FaceLandmarks, factor: int) -> FaceLandmarks:
    """A face found on a photo decoded at 1/factor scale, in the full photo's pixels."""
    if factor == 1:
        return face
    box, points = rescale(face.box, face.points, factor, np.zeros(2))
    return FaceLandmarks(box, points, face.roll, face.detector_score, face.scores, face.pose)
