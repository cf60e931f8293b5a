"""Landmarks on video: frames from a file or a camera, faces tracked between detections, points smoothed by a One Euro filter, the annotated video and its JSON written."""
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from checkpoints import NetworkConfig
from detectors import Detection
from errors import DataError, OutputError
from files import read_json_lines
from landmarks import IBUG, Box, Markup, box_cover, box_from_points, box_iou
from looks import Looker, face_fields, level_crop
from pose import head_pose

import cv2  # noqa: E402  (after detectors, which sets OpenCV's log levels before cv2 first loads)

# The detector runs on the first frame, on every DETECT_EVERY-th frame after it and on any frame where a
# tracked face is lost: it finds faces that walk in within a third of a second at 30 frames/s, and costs
# YuNet's 640x480 look (about 12 ms on this 2-core CPU) spread over 10 frames. Lost faces do not wait for it.
DETECT_EVERY = 10
# OpenCV takes a camera's number as a C int; no machine has anywhere near this many.
MAX_CAMERA = 9999
# How a tracked face that went (covered, turned away, or a crop left on the background) is noticed on each
# frame (predict.py's --lost-by; docs/video.md has what video_bench.py measured of both):
# - "score": one crop per face; lost when the mean of its point scores falls below LOST_SCORE;
# - "drift": two crops, shifted by +-CHECK_SHIFT of the box side along both axes. Points on a face stay on
#   the face, so they barely move between the crops; on a background they move with the crop (the network
#   draws a face where it is told one is). Lost when they follow more than LOST_DRIFT of the shift. The only
#   check for a regression head, which gives no scores; it runs the network twice per face.
LOST_CHECKS = ("score", "drift")
LOST_BY = "score"
LOST_SCORE = 0.6
CHECK_SHIFT = 0.05
LOST_DRIFT = 0.5
# A face whose box (from this frame's points) is less than half inside the frame is lost too: the next crop
# would be mostly padding.
MIN_VISIBLE = 0.5
# A detection continues the track whose box it overlaps most, above this IoU (the fitted box meets dlib's
# with a median IoU of 0.83, landmarks.DLIB_RELATION); two tracks overlapping above DUPLICATE_IOU are one face.
MATCH_IOU = 0.3
DUPLICATE_IOU = 0.5
# So are two whose smaller box lies mostly inside the other (landmarks.box_cover): YuNet once found a box of
# half the side inside a tilting face, whose IoU with it was 0.25, and its new track (mean point score 0.2)
# stood beside the face for 4 frames of video_bench.py's tilting clip. Two real faces never nest so.
DUPLICATE_COVER = 0.8
# The One Euro filter's defaults (predict.py's --smooth-* flags); speeds are in face box sides per second.
# min_cutoff 0.3 and beta 30 rather than 0.5 and 20 since the 176-epoch release: its sharper raw points rose
# 11.8% in moving NME with the old values and 6.4% with these, for jitter cut 6.4x and 6.5x; on two earlier
# weights' clips these were better on both counts too (video_bench.py --rescore, docs/video.md).
MIN_CUTOFF, BETA, D_CUTOFF = 0.3, 30.0, 1.0
SMOOTHING = dict(min_cutoff=MIN_CUTOFF, beta=BETA, d_cutoff=D_CUTOFF)
# Frames decoded ahead of the network, and frames drawn, encoded and written behind it, each on a thread of its
# own (OpenCV's decoder and encoder and onnxruntime release the GIL): a few, so memory stays flat.
READ_AHEAD, WRITE_BEHIND = 4, 4


class OneEuroFilter:
    """Casiez, Roussel and Vogel's One Euro filter (CHI 2012): a causal low-pass whose cutoff rises with
    the speed, so a still face stops shaking and a moving one does not lag.

    cutoff = min_cutoff + beta * speed, in Hz, where speed is the filtered speed in units of `scale` per
    second (the face box side): faces of any size are smoothed alike. For (K, 2) points the speed is the
    mean of the points' speeds, so the whole face speeds up together rather than point by point.
    """

    def __init__(self, min_cutoff: float = MIN_CUTOFF, beta: float = BETA, d_cutoff: float = D_CUTOFF):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.reset()

    def reset(self) -> None:
        self.x: np.ndarray | None = None
        self.dx: np.ndarray | None = None
        self.t = 0.0

    @staticmethod
    def alpha(cutoff: float, dt: float) -> float:
        tau = 1 / (2 * math.pi * cutoff)
        return 1 / (1 + tau / dt)

    def update(self, x: np.ndarray, t: float, scale: float = 1.0) -> np.ndarray:
        """The filtered value of x, seen at time t seconds; the first value after reset() passes unchanged."""
        x = np.asarray(x, np.float64)
        if self.x is None:
            self.x, self.dx, self.t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self.t
        if dt <= 0:  # a repeated timestamp carries no speed
            return self.x.copy()
        self.dx += self.alpha(self.d_cutoff, dt) * ((x - self.x) / dt - self.dx)
        speed = np.linalg.norm(self.dx, axis=-1).mean() if x.ndim > 1 else np.abs(self.dx).mean()
        cutoff = self.min_cutoff + self.beta * speed / scale
        self.x += self.alpha(cutoff, dt) * (x - self.x)
        self.t = t
        return self.x.copy()


# ---------------------------------------------------------------- tracking

def same_face(a: Box, b: Box) -> bool:
    """Are two boxes one face: overlapping above DUPLICATE_IOU, or one mostly inside the other?"""
    return box_iou(a, b) > DUPLICATE_IOU or box_cover(a, b) > DUPLICATE_COVER


def match_boxes(tracked: list[Box], detected: list[Box], min_iou: float = MATCH_IOU) -> dict[int, int]:
    """Tracked index -> detected index, greedily by the largest overlap, each box used once."""
    pairs = sorted(((box_iou(a, b), i, j) for i, a in enumerate(tracked) for j, b in enumerate(detected)), reverse=True)
    matched: dict[int, int] = {}
    for overlap, i, j in pairs:
        if overlap >= min_iou and i not in matched and j not in matched.values():
            matched[i] = j
    return matched


def visible_share(box: Box, width: int, height: int) -> float:
    """How much of the box lies inside the frame."""
    w = min(box.left + box.width, width) - max(box.left, 0)
    h = min(box.top + box.height, height) - max(box.top, 0)
    return max(w, 0) * max(h, 0) / (box.width * box.height)


# (gray frame, crops) -> (points (N, K, 2) in frame pixels, drift (N,) or None where one crop was taken,
# point scores (N, K) or None for a network without them): what the tracker asks of the network.
Locate = Callable[[Image.Image, list[Detection]], tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


def shifted(crop: Detection, by: float) -> Detection:
    box = crop.box
    return replace(crop, box=Box(box.left + by, box.top + by, box.width, box.height))


def network_locator(looker: Looker, lost_by: str = LOST_BY, shift: float = CHECK_SHIFT) -> Locate:
    """Points for each crop. With lost_by="score", from one crop, with no drift. With "drift", from two
    crops shifted by +-shift of the box side, their mean, and their drift: the share of the crops' shift
    that the points followed (0 on a face, 1 where the network sees none)."""
    def locate(gray: Image.Image, crops: list[Detection]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        if not crops:
            return np.zeros((0, 0, 2)), None, None
        if lost_by == "score":
            found = looker.faces(gray, crops, with_pose=False)
            scores = None if found[0].scores is None else np.stack([f.scores for f in found])
            return np.stack([f.points for f in found]), None, scores
        pairs = [shifted(crop, sign * shift * crop.box.side) for crop in crops for sign in (1, -1)]
        found = looker.faces(gray, pairs, with_pose=False)
        points = np.stack([f.points for f in found])
        points = points.reshape(len(crops), 2, *points.shape[1:])
        moved = (points[:, 0] - points[:, 1]).mean(axis=1)  # (N, 2): mean displacement between the crops
        offset = np.array([[2 * shift * crop.box.side] * 2 for crop in crops])
        drift = (moved * offset).sum(1) / (offset ** 2).sum(1)
        scores = None if found[0].scores is None else np.stack([f.scores for f in found]).reshape(
            len(crops), 2, -1).mean(axis=1)
        return points.mean(axis=1), drift, scores
    return locate


@dataclass
class Track:
    id: int
    points: np.ndarray  # the network's points in the last frame, unsmoothed: the next frame's crop comes from them
    smoother: OneEuroFilter | None


@dataclass(frozen=True)
class TrackedFace:
    id: int
    box: Box             # the crop's box (dlib's convention, as if the face were upright), turned by `roll`
    points: np.ndarray   # (K, 2) frame pixels, smoothed unless smoothing is off
    detected: bool       # the detector found the face on this frame
    drift: float | None  # see network_locator; None where one crop was taken (lost_by="score")
    scores: np.ndarray | None = None  # (K,) the network's sureness of each point (faces.FaceLandmarks)
    pose: tuple[float, float, float] | None = None  # yaw, pitch, roll of the points shown (pose.head_pose)
    roll: float = 0.0    # degrees the crop was turned to level the face, clockwise on screen


class FaceTracker:
    """Faces across the frames of one video, each with a stable id: the detector on the first frame, every
    `detect_every` frames and when a face is lost; between them each face is cropped level with its roll and
    framed by its previous points (faces.level_crop), so a head that tilts all the way round stays upright
    in its crop. `smoothing` holds OneEuroFilter's arguments, or None for raw points. `locate` decides how a
    face that went is noticed (network_locator's lost_by). reset() starts a new video; update(gray, t,
    picture) takes one frame, its time in seconds, and the picture the detector looks at (the gray frame
    itself where None)."""

    def __init__(self, locate: Locate, detect: Callable[[np.ndarray], list[Detection]],
                 detect_every: int = DETECT_EVERY, smoothing: dict | None = None, markup: Markup = IBUG,
                 lost_drift: float = LOST_DRIFT, lost_score: float = LOST_SCORE):
        self.locate, self.detect, self.detect_every, self.markup = locate, detect, detect_every, markup
        self.smoothing, self.lost_drift, self.lost_score = smoothing, lost_drift, lost_score
        self.reset()

    def reset(self) -> None:
        self.tracks: list[Track] = []
        self.frame = 0
        self.next_id = 0
        self.detector_runs = 0

    def update(self, gray: Image.Image, t: float, picture: np.ndarray | None = None) -> list[TrackedFace]:
        scheduled = self.frame % self.detect_every == 0 or not self.tracks
        self.frame += 1
        picture = np.asarray(gray) if picture is None else picture
        detections = self.run_detector(picture) if scheduled else []
        sightings = self.look(gray, detections)
        lost = {i for i, s in enumerate(sightings) if s.lost}
        if lost:  # the same frame again, with the detector's faces
            detections = detections if scheduled else self.run_detector(picture)
            sightings = self.look(gray, detections, lost, sightings)
        return self.commit(sightings, t, gray.size)

    def run_detector(self, picture: np.ndarray) -> list[Detection]:
        self.detector_runs += 1
        return self.detect(picture)

    def look(self, gray: Image.Image, detections: list[Detection], lost: set[int] = frozenset(),
             before: list["Sighting"] | None = None) -> list["Sighting"]:
        """Each tracked face, then each new one the detector found, on this frame; changes no track.

        A tracked face is cropped as its own points say, level with their roll: framed as the network learnt,
        and turned by a roll that YuNet's leans off by several degrees. Only a face whose own crop lost it
        (`lost`, from the look `before` on this frame) takes the crop of a detection that overlaps it; without
        one it is lost. The detector's word beats the network's. The faces that look did not lose keep what
        it saw: their crops are the same."""
        crops = [level_crop(track.points, self.markup) for track in self.tracks]
        matched = match_boxes([crop.box for crop in crops], [d.box for d in detections])
        for i in lost & matched.keys():
            crops[i] = detections[matched[i]]
        crops += [d for j, d in enumerate(detections) if j not in matched.values()]
        seen = set() if before is None else set(range(len(self.tracks))) - lost
        todo = [i for i in range(len(crops)) if i not in seen]
        points, drift, scores = self.locate(gray, [crops[i] for i in todo])
        sightings = []
        for i, crop in enumerate(crops):
            track = self.tracks[i] if i < len(self.tracks) else None
            if i in seen:
                sightings.append(replace(before[i], detected=i in matched))
                continue
            n = todo.index(i)
            if track is not None and i in lost and i not in matched:
                gone = True  # lost, and no detection to take it up again
            elif track is None or i in lost:  # a detection's crop: no face where the network is unsure of its
                # points, whether it is new or takes up a lost one (YuNet's 20 px false faces scored about 0.24)
                gone = scores is not None and bool(scores[n].mean() < self.lost_score)
            else:  # a face that went is lost if the network no longer sees it or its points are mostly outside
                gone = self.unseen(drift, scores, n) or visible_share(
                    box_from_points(points[n], self.markup.box_relation), *gray.size) < MIN_VISIBLE
            sightings.append(Sighting(track, crop, points[n], None if drift is None else float(drift[n]),
                                      track is None or i in matched, gone, None if scores is None else scores[n]))
        return sightings

    def unseen(self, drift: np.ndarray | None, scores: np.ndarray | None, i: int) -> bool:
        """The network no longer sees a face in crop i: its points followed the crop, or it is unsure of them."""
        if drift is not None:
            return bool(drift[i] > self.lost_drift)
        return scores is not None and bool(scores[i].mean() < self.lost_score)

    def commit(self, sightings: list["Sighting"], t: float, size: tuple[int, int]) -> list[TrackedFace]:
        kept: list[Sighting] = []
        for s in sightings:
            # A face found twice (a detection beside a track that drifted, or a part of it) keeps its older id.
            if s.lost or any(same_face(s.crop.box, other.crop.box) for other in kept):
                continue
            if s.track is None:
                smoother = None if self.smoothing is None else OneEuroFilter(**self.smoothing)
                s.track = Track(self.next_id, s.points, smoother)
                self.next_id += 1
            s.track.points = s.points
            kept.append(s)
        self.tracks = [s.track for s in kept]
        faces = []
        for s in kept:
            points = s.points
            if s.track.smoother is not None:
                side = box_from_points(points, self.markup.box_relation).side
                points = s.track.smoother.update(points, t, scale=side)
            faces.append(TrackedFace(s.track.id, s.crop.box, points, s.detected, s.drift, s.scores,
                                     head_pose(points, *size), s.crop.roll))
        return faces


@dataclass
class Sighting:
    """One face on one frame, before the tracker commits to it."""
    track: Track | None  # None: a face the detector found that no track follows
    crop: Detection
    points: np.ndarray
    drift: float | None
    detected: bool
    lost: bool
    scores: np.ndarray | None = None


# ---------------------------------------------------------------- reading, drawing, writing

def open_video(source: str) -> cv2.VideoCapture:
    """A file, or camera N for a number; one line if it cannot be opened."""
    if source.isdigit():
        if int(source) > MAX_CAMERA:
            raise DataError(f"source={source}: camera numbers go from 0 to {MAX_CAMERA}", parameter="source")
        capture = cv2.VideoCapture(int(source))
        if not capture.isOpened():
            raise DataError(f"source={source}: cannot open camera {source}", parameter="source")
        return capture
    if Path(source).is_dir():
        raise DataError(f"{source}: a folder, not a video (photos are for --image, or Landmarker.batch)")
    if not Path(source).is_file():
        raise DataError(f"source={source}: video not found", parameter="source")
    if Path(source).stat().st_size == 0:
        raise DataError(f"{source}: an empty file, not a video")
    if is_still_photo(Path(source)):
        raise DataError(f"{source}: a photo, not a video; pass it with --image (or call the Landmarker on it)")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise DataError(f"{source}: cannot read video (not a video file, or truncated)")
    return capture


def is_still_photo(path: Path) -> bool:
    """Whether PIL reads the file as a picture of one frame (FFmpeg would make a one-frame video of it); an
    animated GIF or WebP stays a video."""
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) == 1
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def read_ahead(capture: cv2.VideoCapture, depth: int = READ_AHEAD) -> Iterator[np.ndarray]:
    """BGR frames, upright (OpenCV applies the rotation in the file's metadata), decoded by a thread of their
    own up to `depth` frames ahead of the one being looked at. Leaving the loop early stops the thread."""
    frames: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def decode() -> None:
        while not stop.is_set():
            ok, frame = capture.read()
            frames.put(frame if ok else None)
            if not ok:
                return

    thread = threading.Thread(target=decode, name="decode", daemon=True)
    thread.start()
    try:
        while (frame := frames.get()) is not None:
            yield frame
    finally:
        stop.set()
        while thread.is_alive():  # a decoder blocked on a full queue takes one more frame and sees the stop
            try:
                frames.get(timeout=0.05)
            except queue.Empty:
                pass


@dataclass(frozen=True)
class VideoFrame:
    """One frame's result, as Landmarker.video yields it and run_video writes it."""
    index: int
    time: float                  # seconds: from the file's frame rate, or the camera's clock
    faces: list[TrackedFace]
    frame: np.ndarray            # the BGR picture as OpenCV decoded it

    def to_dict(self) -> dict:
        return {"frame": self.index, "time": round(self.time, 4), "faces": [tracked_record(f) for f in self.faces]}


@dataclass(frozen=True)
class Opened:
    """A video opened for tracking: what its header says, and its frames."""
    name: str
    fps: float
    expected: int                # frames the header promises; 0 for a camera
    size: tuple[int, int]        # width, height of its first frame
    frames: Iterator[np.ndarray]
    capture: cv2.VideoCapture


def open_frames(source: str) -> Opened:
    """A file or camera N opened, its first frame decoded (DataError where there is none), and its frames
    read ahead."""
    capture = open_video(source)
    camera = source.isdigit()
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if 0 < fps < 1000 else 30.0  # some cameras and containers report 0
    expected = 0 if camera else int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = read_ahead(capture)
    first = next(frames, None)
    if first is None:
        capture.release()
        raise DataError(f"{source}: cannot read video (no frame could be decoded)")
    name = f"camera{source}" if camera else Path(source).stem

    def all_frames() -> Iterator[np.ndarray]:
        yield first
        yield from frames

    return Opened(name, fps, expected, (first.shape[1], first.shape[0]), all_frames(), capture)


def track_frames(opened: Opened, tracker: "FaceTracker", camera: bool) -> Iterator[VideoFrame]:
    """Each frame's faces, tracked: gray once per frame for the network, the BGR frame for the detector."""
    tracker.reset()
    start = time.perf_counter()
    width, height = opened.size
    for i, frame in enumerate(opened.frames):
        t = time.perf_counter() - start if camera else i / opened.fps
        if frame.shape[:2] != (height, width):  # a camera that changes resolution mid-stream
            frame = cv2.resize(frame, (width, height))
        gray = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
        yield VideoFrame(i, t, tracker.update(gray, t, frame), frame)


def track(source: str, tracker: "FaceTracker") -> Iterator[VideoFrame]:
    """Landmarker.video's door: every frame of a file or camera with its tracked faces; nothing written. The
    capture is released when the iterator ends or is dropped."""
    opened = open_frames(source)
    try:
        yield from track_frames(opened, tracker, source.isdigit())
    finally:
        opened.frames.close()
        opened.capture.release()


def draw_faces(frame: np.ndarray, faces: list[TrackedFace]) -> None:
    """As predict.py draws photos: crops yellow (turned by the face's roll), points red, and each face's id."""
    for face in faces:
        box = face.box
        thick = max(1, round(box.side / 150))
        corners = cv2.boxPoints((tuple(map(float, box.center)), (box.width, box.height), face.roll))
        cv2.polylines(frame, [np.round(corners).astype(np.int32)], True, (0, 220, 255), thick)
        top_left = corners[np.argmin(corners.sum(1))]
        cv2.putText(frame, str(face.id), (round(top_left[0]), round(top_left[1]) - 4), cv2.FONT_HERSHEY_SIMPLEX,
                    max(0.4, box.side / 250), (0, 220, 255), thick)
        radius = round(max(1.5, box.side / 90) * 16)
        for x, y in np.round(face.points * 16).astype(int).tolist():  # 4 fractional bits: points sit between pixels
            cv2.circle(frame, (x, y), radius, (40, 40, 255), -1, cv2.LINE_AA, 4)


def even(frame: np.ndarray) -> np.ndarray:
    """mp4v drops an odd last row or column: pad one black line instead, so no pixel is lost."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return cv2.copyMakeBorder(frame, 0, h % 2, 0, w % 2, cv2.BORDER_CONSTANT)


def tracked_record(face: TrackedFace) -> dict:
    return {"id": face.id, **face_fields(face.box, face.points, face.scores, face.pose),
            "roll": round(float(face.roll), 1), "detected": face.detected}


class LiveView:
    """The annotated frames in a matplotlib window (opencv-python-headless has none); closing it stops."""

    def __init__(self, title: str):
        import matplotlib.pyplot as plt
        self.plt = plt
        plt.ion()
        self.figure, ax = plt.subplots(num=title)
        ax.axis("off")
        self.image = None

    def show(self, frame: np.ndarray) -> bool:
        """False once the window is closed."""
        if not self.plt.fignum_exists(self.figure.number):
            return False
        rgb = frame[..., ::-1]
        if self.image is None:
            self.image = self.figure.axes[0].imshow(rgb)
        else:
            self.image.set_data(rgb)
        self.plt.pause(0.001)
        return True


@dataclass
class VideoRun:
    results: Path         # the JSON Lines file: a header line, then one line per frame (read_video_results)
    frames: int           # frames done
    faces: int            # distinct face ids tracked
    detector_runs: int
    seconds: float        # wall clock from the first frame read to the files written
    interrupted: bool
    missing: int          # frames the file's header promised but that could not be read
    spent: dict = None    # seconds by step: the main thread's (decoding waited for, tracking, waiting for the
                          # writer) and the writer thread's (JSON, drawing, encoding), which overlap


def read_video_results(path: Path) -> dict:
    """A video's JSON Lines file as one dict: its header's keys, and "frames", the list of frame records
    (a line torn by a crash, the last, is left out)."""
    records, _ = read_json_lines(path)
    if not records:
        raise DataError(f"{path}: not a video's results (no header line)")
    return {**records[0], "frames": records[1:]}


class FrameWriter:
    """Each frame's JSON line, drawing and MP4 encoding on a thread of its own, in order, up to WRITE_BEHIND
    frames behind the network: the line is written and flushed as it comes (a crash keeps every frame written),
    the drawn frame encoded unless there is no MP4 to write. Seconds spent in each step are kept."""

    def __init__(self, lines, mp4: cv2.VideoWriter | None, view: "LiveView | None"):
        self.lines, self.mp4, self.view = lines, mp4, view
        self.spent = {"json": 0.0, "draw": 0.0, "encode": 0.0}
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(WRITE_BEHIND)
        self.thread = None if view else threading.Thread(target=self.work, name="write", daemon=True)
        if self.thread:
            self.thread.start()

    def put(self, result: VideoFrame) -> bool:
        """Hand one frame over; False once the live window was closed. Raises what the thread met (a full disk)."""
        if self.error is not None:
            raise self.error
        if self.thread is None:  # a live window: matplotlib draws on the main thread only
            self.write(result)
            return self.view.show(result.frame)
        self.queue.put(result)
        return True

    def work(self) -> None:
        while (result := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(result)
                except BaseException as e:  # said by the main thread at its next frame
                    self.error = e

    def write(self, result: VideoFrame) -> None:
        start = time.perf_counter()
        try:
            self.lines.write(json.dumps(result.to_dict()) + "\n")
            self.lines.flush()
        except OSError as e:
            raise OutputError(f"{Path(self.lines.name).parent}: cannot write {Path(self.lines.name).name} "
                              f"({e.strerror or e}); the frames before are kept") from None
        middle = time.perf_counter()
        self.spent["json"] += middle - start
        if self.mp4 is not None:
            draw_faces(result.frame, result.faces)
            drawn = time.perf_counter()
            self.mp4.write(even(result.frame))
            self.spent["draw"] += drawn - middle
            self.spent["encode"] += time.perf_counter() - drawn

    def close(self) -> None:
        """Every frame handed over written; raises what the thread met."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error


def run_video(source: str, tracker: FaceTracker, out_dir: Path, weights: str, show: bool = False,
              draw: bool = True) -> VideoRun:
    """Landmarks on every frame of `source` (a file or a camera number): OUT/<name>.jsonl and, unless not
    `draw`, OUT/<name>_landmarks.mp4. Decoding the next frames, the network on this one, and drawing,
    encoding and writing the last ones run at the same time, on three threads. Each frame's line is written
    and flushed as it comes, so memory stays flat over any length of video and a crash keeps every frame
    written (in <name>.jsonl.part); the file takes its name when the run ends, by Ctrl-C or closing the live
    window too, replacing an earlier run's only then."""
    from tqdm import tqdm
    camera = source.isdigit()
    opened = open_frames(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    video_path, results = out_dir / f"{opened.name}_landmarks.mp4", out_dir / f"{opened.name}.jsonl"
    mp4 = None
    if draw:
        mp4 = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), opened.fps,
                              (opened.size[0] + opened.size[0] % 2, opened.size[1] + opened.size[1] % 2))
        if not mp4.isOpened():
            opened.capture.release()
            raise DataError(f"{video_path}: cannot write video")
    part = results.with_name(results.name + ".part")
    lines = open(part, "w", encoding="utf-8")
    lines.write(json.dumps({"weights": weights, "video": source, "fps": opened.fps, "width": opened.size[0],
                            "height": opened.size[1]}) + "\n")
    writer = FrameWriter(lines, mp4, LiveView(opened.name) if show else None)
    done, ids, interrupted, start = 0, set(), False, time.perf_counter()
    spent = {"decode_and_track": 0.0, "waiting_for_writer": 0.0}
    bar = tqdm(total=opened.expected or None, unit="frame", desc=opened.name, disable=None)
    try:
        frames, before = track_frames(opened, tracker, camera), time.perf_counter()
        for result in frames:
            middle = time.perf_counter()
            going = writer.put(result)
            spent["decode_and_track"] += middle - before
            before = time.perf_counter()
            spent["waiting_for_writer"] += before - middle
            done, ids = done + 1, ids | {f.id for f in result.faces}
            bar.update()
            if not going:
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        opened.frames.close()
        opened.capture.release()
        try:
            writer.close()
        finally:
            lines.close()
            if mp4 is not None:
                mp4.release()
    os.replace(part, results)
    seconds = time.perf_counter() - start
    print(f"{'stopped: ' if interrupted else ''}wrote {results}" + (f" and {video_path}" if draw else "") +
          f": {done} frames ({done / seconds:.1f}/s), {len(ids)} face{'s' * (len(ids) != 1)} tracked, "
          f"detector ran on {tracker.detector_runs}")
    # Frame counts in headers can be estimates: only a clear shortfall means the file ends early.
    expected = opened.expected
    missing = expected - done if not interrupted and expected - done > max(1, expected // 100) else 0
    return VideoRun(results, done, len(ids), tracker.detector_runs, seconds, interrupted, missing,
                    spent | writer.spent)


def video_tracker(looker: Looker, config: NetworkConfig, detector: Callable[[np.ndarray], list[Detection]],
                  detect_every: int = DETECT_EVERY, smoothing: dict | None = SMOOTHING,
                  lost_by: str = LOST_BY) -> FaceTracker:
    """The tracker predict.py and Landmarker.video run: `detector` (detectors.make_detector, which takes RGB)
    on the BGR frames it is given, and the network of `looker`."""
    lost_by = lost_by if config.head == "pip" else "drift"  # only PIPNet's maps give scores
    return FaceTracker(network_locator(looker, lost_by),
                       lambda bgr: detector(np.ascontiguousarray(bgr[..., ::-1])), detect_every, smoothing,
                       config.markup)
