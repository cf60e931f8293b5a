"""Scoring what a user gets: the detector finds the faces of labelled photos (turned, if asked), each found face is matched to its labels, and the network's points on it are scored; how far each source of a crop frames a face off its own level frame; also fits the detector's box to dlib's."""
import math
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from detectors import Detection, YuNet, angle_between, fit_five_relation
from faces import Landmarker
from images import read_photo
from landmarks import Box, BoxRelation, Face, Markup, box_from_points, box_iou, level_frame, nme, turn

# A found face is a labelled one's when its box overlaps the labelled face's dlib box this much (the box
# dlib's relation puts around the labelled points, so that it holds for turned photos too).
MATCH_IOU = 0.3


def by_image(faces: list[Face]) -> dict[Path, list[Face]]:
    grouped: dict[Path, list[Face]] = {}
    for face in faces:
        grouped.setdefault(face.image, []).append(face)
    return grouped


def turn_photo(photo: Image.Image, points: list[np.ndarray], degrees: float) -> tuple[Image.Image, list[np.ndarray]]:
    """The photo turned `degrees` clockwise on screen about its centre, grown to hold all of it, and the
    labelled points turned with it (pixel centres)."""
    turned = photo.rotate(-degrees, resample=Image.BILINEAR, expand=True)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    before = np.array(photo.size) / 2
    after = np.array(turned.size) / 2
    rotation = np.array([[c, -s], [s, c]])
    return turned, [((p + 0.5 - before) @ rotation.T + after - 0.5) for p in points]


def match(found: list[Box], truths: list[np.ndarray], relation: BoxRelation) -> list[int | None]:
    """For each labelled face, the index of its found face (greedy by overlap, each used once), or None."""
    pairs = sorted(((box_iou(b, box_from_points(t, relation)), i, j) for i, t in enumerate(truths)
                    for j, b in enumerate(found)), reverse=True)
    matched: list[int | None] = [None] * len(truths)
    for overlap, i, j in pairs:
        if overlap >= MATCH_IOU and matched[i] is None and j not in matched:
            matched[i] = j
    return matched


def score_found(landmarker: Landmarker, faces: list[Face], markup: Markup, degrees: float = 0.0) -> np.ndarray:
    """Per labelled face, the NME of the network's points on the face the detector found (NaN where it found
    none): each photo decoded whole, turned by `degrees` first if asked."""
    errors = []
    for image, labelled in tqdm(by_image(faces).items(), desc="detecting", unit="image", leave=False):
        photo = read_photo(image)
        truths = [f.points for f in labelled]
        if degrees:
            photo, truths = turn_photo(photo, truths, degrees)
        found, _ = landmarker.in_photo(photo)
        matched = match([f.box for f in found], truths, markup.box_relation)
        for truth, j in zip(truths, matched):
            if j is None:
                errors.append(math.nan)
                continue
            errors.append(float(nme(found[j].points[None], truth[None], markup, [diagonal(truth, markup)])[0]))
    return np.array(errors)


def frame_error(box: Box, roll: float, true_box: Box, true_roll: float) -> list[float]:
    """How a crop (box, roll) misses the face's own level frame: roll (degrees), scale (side ratio - 1), and
    shift sideways and up-down in the level face's frame (fractions of its side)."""
    shift = turn(np.asarray(box.center) - true_box.center, -true_roll, np.zeros(2)) / true_box.side
    return [angle_between(roll, true_roll), box.side / true_box.side - 1, *map(float, shift)]


def source_errors(landmarker: Landmarker, faces: list[Face], markup: Markup,
                  degrees: float = 0.0) -> dict[str, np.ndarray]:
    """Each source of a crop against the level frame of the true points (landmarks.level_frame), per face it
    framed, (N, 4) as frame_error gives: the XML's box (the 300-W protocol; upright, roll 0), the landmarker's
    detector on the photo turned by `degrees`, and the first look's points from the XML box (the crop of a
    second look, and of the next video frame for a face that holds still)."""
    rows: dict[str, list] = {"box": [], "detector": [], "first look": []}
    for image, labelled in tqdm(by_image(faces).items(), desc="framing", unit="image", leave=False):
        photo = read_photo(image)
        truths = [f.points for f in labelled]
        if degrees:
            photo, truths = turn_photo(photo, truths, degrees)
        frames = [level_frame(t, markup) for t in truths]
        if not degrees:
            for face, (box, roll) in zip(labelled, frames):
                rows["box"].append(frame_error(face.box, 0.0, box, roll))
                [first] = landmarker(photo, [face.box])
                rows["first look"].append(frame_error(*level_frame(first.points, markup), box, roll))
        found = landmarker.detect(np.asarray(photo.convert("RGB")))
        for (box, roll), j in zip(frames, match([d.box for d in found], truths, markup.box_relation)):
            if j is not None:
                rows["detector"].append(frame_error(found[j].box, found[j].roll, box, roll))
    return {name: np.array(r).reshape(-1, 4) for name, r in rows.items() if r}


def error_spread(errors: np.ndarray) -> dict:
    """The 50th, 95th and 99th percentiles of each error's size, the figures training's jitter is set from."""
    names = ("roll_deg", "scale", "shift_x", "shift_y")  # the shift in the level face's own frame
    sizes = np.abs(errors)
    return {"faces": len(errors), **{name: [round(float(np.percentile(sizes[:, i], q)), 3) for q in (50, 95, 99)]
                                     for i, name in enumerate(names)}}


def diagonal(points: np.ndarray, markup: Markup) -> float:
    """The box diagonal of a markup without NME points, from the box its relation puts around the points."""
    box = box_from_points(points, markup.box_relation)
    return math.hypot(box.width, box.height)


def fit_yunet_box(faces: list[Face]) -> tuple[BoxRelation, dict[str, float], int]:
    """YUNET_RELATION: YuNet on each labelled photo, each face matched to the detection whose own box
    overlaps its dlib box most, and dlib's box fitted on the five points; with the misfit and the faces used."""
    yunet = YuNet()
    fives, boxes = [], []
    for image, labelled in tqdm(by_image(faces).items(), desc="fitting YuNet's box", unit="image", leave=False):
        found: list[Detection] = yunet(np.asarray(read_photo(image).convert("RGB")))
        pairs = sorted(((box_iou(d.own_box, f.box), i, j) for i, f in enumerate(labelled)
                        for j, d in enumerate(found)), reverse=True)
        used_faces, used_found = set(), set()
        for overlap, i, j in pairs:
            if overlap >= MATCH_IOU and i not in used_faces and j not in used_found:
                used_faces.add(i)
                used_found.add(j)
                fives.append(found[j].five)
                boxes.append(labelled[i].box)
    relation, misfit = fit_five_relation(np.stack(fives), boxes)
    return relation, misfit, len(fives)
