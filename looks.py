"""The network's look at faces in pictures: each detection cropped level with its roll, crops of many pictures in shared network calls, the points, scores and pose that come back; further looks on the crop the last one's points level, and a doubtful face looked at turned each eighth of the way round."""
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from detectors import Detection
from landmarks import Box, Markup, level_frame
from pose import head_pose
from runtime import Network, points_and_scores
from transforms import Augment, Transforms, unflip

# Crops per network call: a crowd of hundreds of faces goes in a few calls of this many, so its memory stays
# bounded (a batch of 64 at 160 px holds about 200 MB of activations in the stride-16 network).
MAX_CROPS = 64
# With any_roll, a first look whose points score below this on average is doubtful: the detector may have
# taken the face sideways or the wrong way up, so it is looked at turned the other ways too, and the surest
# look kept. On the validation faces the faces whose look failed (NME above 10%) scored 0.32-0.59, and 95% of
# the rest above 0.68 even in photos turned 60-135 degrees (docs/results.md, "Detection: YuNet and any roll").
DOUBTFUL_SCORE = 0.7
# Each eighth of the way round, where a second look levels each turn's points (docs/results.md has eighths
# against quarters); each quarter, for a markup without eye corners to level by.
EIGHTH_TURNS = (45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0)
QUARTER_TURNS = (90.0, 180.0, 270.0)


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


@dataclass(frozen=True)
class Looker:
    """What a look needs: the network, its crop, the device, and what to do around the network call (a mirror
    look averaged in; autocast on CUDA)."""
    model: Network
    transform: Transforms
    device: torch.device
    flip: tuple[int, ...] | None = None   # the markup's mirror permutation: average each face with its mirror
    precision: object = None              # a context manager factory around the call (runtime.autocast), or None

    def network(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Points and scores of the crops, averaged with those of the crops mirrored (each point read from
        its mirror twin) where `flip` is set."""
        pred, scores = self.call(batch)
        if self.flip is None:
            return pred, scores
        mirror_pred, mirror_scores = self.call(batch.flip(-1))
        pred = (pred.float() + unflip(mirror_pred.float(), self.flip)) / 2
        if scores is not None:
            scores = (scores.float() + mirror_scores.float()[:, list(self.flip)]) / 2
        return pred, scores

    def call(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.precision is None:
            return points_and_scores(self.model, batch)
        with self.precision():
            return points_and_scores(self.model, batch)

    def at(self, crops: list[tuple[Image.Image, Detection]], with_pose: bool = True) -> list[FaceLandmarks]:
        """Each (picture, detection)'s face, cropped level with its roll; the crops of all pictures share
        network calls of up to MAX_CROPS. with_pose=False leaves out the head pose (the video tracker takes it
        of the smoothed points instead)."""
        if not crops:
            return []
        no_points = np.zeros((1, 2))  # the transform moves points too; here there are none to move
        batch = torch.stack([self.transform(gray, d.box, no_points, level(d))[0] for gray, d in crops])
        with torch.inference_mode():
            parts = [self.network(batch[i:i + MAX_CROPS].to(self.device)) for i in range(0, len(batch), MAX_CROPS)]
        pred = torch.cat([p.float() for p, _ in parts]).cpu().numpy()
        scores = [None] * len(crops) if parts[0][1] is None else \
            torch.cat([s.float() for _, s in parts]).cpu().numpy()
        faces = []
        for p, s, (gray, d) in zip(pred, scores, crops):
            points = self.transform.to_image(p, d.box, level(d))
            pose = head_pose(points, *gray.size) if with_pose else None
            faces.append(FaceLandmarks(d.box, points, d.roll, d.score, s, pose))
        return faces

    def faces(self, gray: Image.Image, detections: list[Detection], with_pose: bool = True) -> list[FaceLandmarks]:
        """The faces of one picture, at its detections."""
        return self.at([(gray, d) for d in detections], with_pose)


def turned(detection: Detection, degrees: float) -> Detection:
    """The same detection with its roll turned by `degrees`, kept in (-180, 180]."""
    return replace(detection, roll=180.0 - (180.0 - detection.roll - degrees) % 360.0)


def level_crop(points: np.ndarray, markup: Markup, score: float = 1.0) -> Detection:
    """The crop that a face's points put it in (landmarks.level_frame), as a detection."""
    box, roll = level_frame(points, markup)
    return Detection(box, score, roll)


def look_again(looker: Looker, crops: list[tuple[Image.Image, FaceLandmarks]], markup: Markup) -> list[FaceLandmarks]:
    """Each face looked at again, on the crop levelled and framed by its points (level_crop)."""
    return looker.at([(gray, level_crop(f.points, markup, f.detector_score)) for gray, f in crops])


def surest_turns(looker: Looker, gray: Image.Image, detections: list[Detection], faces: list[FaceLandmarks],
                 markup: Markup) -> list[FaceLandmarks]:
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
    looks = looker.faces(gray, [turned(detections[i], q) for i in doubtful for q in steps])
    candidates = [look for j, i in enumerate(doubtful) for look in (faces[i], *looks[j * k:(j + 1) * k])]
    if levels:
        candidates = look_again(looker, [(gray, f) for f in candidates], markup)
    surest = list(faces)
    for j, i in enumerate(doubtful):
        surest[i] = max(candidates[j * (k + 1):(j + 1) * (k + 1)], key=lambda f: f.scores.mean())
    return surest
