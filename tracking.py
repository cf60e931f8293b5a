"""Faces tracked across the frames of a video: the detector every few frames, each face followed between with a crop that turns with it, lost faces noticed by point score or drift, points smoothed by a One Euro filter; no frames are read or written here (video.py does that)."""
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from checkpoints import NetworkConfig
from detectors import Detection
from landmarks import IBUG, Box, Markup, box_cover, box_from_points, box_iou
from looks import Looker, level_crop
from pose import head_pose

# The detector runs on the first frame, on every DETECT_EVERY-th frame after it and on any frame where a
# tracked face is lost: it finds faces that walk in within a third of a second at 30 frames/s, and costs
# YuNet's 640x480 look (about 12 ms on this 2-core CPU) spread over 10 frames. Lost faces do not wait for it.
DETECT_EVERY = 10
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
    framed by its previous points (looks.level_crop), so a head that tilts all the way round stays upright
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


def video_tracker(looker: Looker, config: NetworkConfig, detector: Callable[[np.ndarray], list[Detection]],
                  detect_every: int = DETECT_EVERY, smoothing: dict | None = SMOOTHING,
                  lost_by: str = LOST_BY) -> FaceTracker:
    """The tracker predict.py and Landmarker.video run: `detector` (detectors.make_detector, which takes RGB)
    on the BGR frames it is given, and the network of `looker`."""
    lost_by = lost_by if config.head == "pip" else "drift"  # only PIPNet's maps give scores
    return FaceTracker(network_locator(looker, lost_by),
                       lambda bgr: detector(np.ascontiguousarray(bgr[..., ::-1])), detect_every, smoothing,
                       config.markup)
