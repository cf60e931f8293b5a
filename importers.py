"""Other landmark formats -> dlib's XML: 300-W .pts folders, WFLW's annotation file, and a subset of an XML's points."""
import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from detectors import detect_faces, load_hog
from errors import DataError, UsageError
from files import write_atomic
from flags import one_line_errors, out_file, refuse_input_as_output
from images import open_gray
from labels import TRAIN_XML, load_faces, write_xml
from landmarks import (DLIB_RELATION, IBUG, NUM_LANDMARKS, WFLW_EYE_OUTER, WFLW_FLIP_PAIRS, WFLW_POINTS, Box,
                       BoxRelation, Face, box_from_points, box_iou, check_point, fit_box_relation)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
# 300-W names the faces of one image name_1.pts, name_2.pts, ... beside name.jpg.
NUMBERED_FACE = re.compile(r"(.+)_\d+$")
# A detection is a face's when it holds at least this share of the face's points. dlib's box cuts off much
# of the jaw but holds the eyes, nose and mouth: about 3/4 of iBUG's 68 points, all of dlib's 5.
MIN_SHARE_INSIDE = 0.5
# Once the relation is fitted, a detection must also overlap the box the relation puts around the points
# this much: it drops detections that hold a small face's points but are another, larger face's.
MIN_IOU_WITH_FITTED = 0.4
WFLW_FLAGS = ("pose", "expression", "illumination", "make-up", "occlusion", "blur")
# Written beside the XML: what --flip-pairs and --nme-points read for WFLW's markup.
WFLW_MARKUP = "wflw_markup.json"
WFLW_SOURCE = "WFLW (Wu et al., CVPR 2018), as in mmpose's configs/_base_/datasets/wflw.py"
WFLW_FIELDS = 2 * WFLW_POINTS + 4 + len(WFLW_FLAGS) + 1  # points, box, flags, image name


# ---------------------------------------------------------------- 300-W's .pts files

def read_lines(path: Path, what: str) -> list[str]:
    """A text file's lines (a byte-order mark dropped), or DataError naming the file and what went wrong."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the {what} ({getattr(e, 'strerror', None) or e})") from None


def read_pts(path: Path) -> np.ndarray:
    """A .pts file -> (K, 2) float points in dlib's 0-based pixels. Takes the 300-W layout (version and
    n_points header, points between braces) and bare lines of "x y"; DataError naming the file otherwise."""
    path = Path(path)
    lines = read_lines(path, ".pts file")
    points, expected, closed = [], None, False
    for number, line in enumerate(lines, 1):
        text = line.strip()
        where = f"{path}: line {number}"
        if not text:
            continue
        if closed:
            raise DataError(f"{where}: {text[:40]!r} after the closing '}}'")
        if text == "{":
            continue
        if text == "}":
            closed = True
            continue
        if ":" in text:
            key, value = (part.strip() for part in text.split(":", 1))
            if key == "n_points":
                if not value.isdigit():
                    raise DataError(f"{where}: n_points is {value!r}, expected a whole number")
                expected = int(value)
            continue  # version: and any other header line say nothing about the points
        points.append(parse_point(text, where))
    if expected is not None and len(points) != expected:
        raise DataError(f"{path}: {len(points)} points, but its header says n_points: {expected}")
    if len(points) < 2:
        raise DataError(f"{path}: {len(points)} points; a markup needs at least 2")
    # Matlab counts pixels from 1, dlib from 0.
    return np.array(points, np.float64) - 1


def parse_point(text: str, where: str) -> tuple[float, float]:
    """One "x y" line, or one line saying what is wrong with it."""
    fields = text.split()
    try:
        if len(fields) != 2:
            raise ValueError
        x, y = float(fields[0]), float(fields[1])
    except ValueError:
        raise DataError(f"{where}: {text[:40]!r} is not a point; expected two numbers 'x y'") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise DataError(f"{where}: {text[:40]!r} is not a finite point")
    return x, y


def find_pts_images(folders: list[Path]) -> list[tuple[Path, list[Path]]]:
    """(image, its .pts files) for every image under the folders that has any: name.pts beside name.jpg, and
    300-W's name_1.pts, name_2.pts for several faces, where no name_1.jpg of its own exists."""
    found: dict[Path, list[Path]] = {}
    orphans = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise UsageError(f"--from-pts {folder}: not a folder")
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        images = {}
        for p in files:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                images.setdefault((p.parent, p.stem), p)
        for pts in (p for p in files if p.suffix.lower() == ".pts"):
            numbered = NUMBERED_FACE.match(pts.stem)
            image = images.get((pts.parent, pts.stem)) or (numbered and images.get((pts.parent, numbered[1])))
            if image:
                found.setdefault(image, []).append(pts)
            else:
                orphans.append(pts)
    if orphans:
        print(f"--from-pts: skipped {len(orphans)} .pts files with no image beside them (first: {orphans[0]})",
              file=sys.stderr)
    if not found:
        raise UsageError(f"--from-pts {' '.join(map(str, folders))}: no images (.jpg .jpeg .png .bmp) with a "
                         f".pts file of the same name beside them")
    return list(found.items())


def share_inside(box: Box, points: np.ndarray) -> float:
    """The share of the points that lie in the box (whole pixels, both edges in, as dlib counts them)."""
    x, y = points[:, 0], points[:, 1]
    inside = (x >= box.left) & (x <= box.left + box.width) & (y >= box.top) & (y <= box.top + box.height)
    return float(inside.mean())


def points_box(points: np.ndarray) -> Box:
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    return Box(float(x0), float(y0), float(max(x1 - x0, 1)), float(max(y1 - y0, 1)))


def match_detections(faces: list[np.ndarray], detections: list[Box],
                     relation: BoxRelation | None) -> list[Box | None]:
    """Each face's detection, each detection used once, best pairs first; None where none fits.

    Without a relation (any K) the best pair is the one whose box holds most of the face's points, ties
    going to the box that overlaps the points' own bounding box most. With one, the detection must also
    overlap the box that the relation puts around the points.
    """
    pairs = []
    for i, points in enumerate(faces):
        for j, box in enumerate(detections):
            share = share_inside(box, points)
            if share < MIN_SHARE_INSIDE:
                continue
            if relation is None:
                pairs.append(((share, box_iou(box, points_box(points))), i, j))
            else:
                iou = box_iou(box, box_from_points(points, relation))
                if iou >= MIN_IOU_WITH_FITTED:
                    pairs.append(((iou, share), i, j))
    matched: list[Box | None] = [None] * len(faces)
    used = set()
    for _, i, j in sorted(pairs, reverse=True):
        if matched[i] is None and j not in used:
            matched[i] = detections[j]
            used.add(j)
    return matched


def face_finder() -> Callable[[Path], list[Box]]:
    """image file -> dlib's detections on its grayscale, upsampled once, as the 300-W labels were made."""
    detector = load_hog()

    def find(image: Path) -> list[Box]:
        return detect_faces(detector, open_gray(image)[0], upsample=1)

    return find


def read_labelled(images: list[tuple[Path, list[Path]]], skip_bad: bool) -> tuple[list, int]:
    """(image, [points of each face]) for each image, and K. Every .pts file must have the points the first
    has; with `skip_bad`, the points most have, and a file that is unreadable or has other points (or whose
    image is unreadable) is left out with one line saying how many and the first."""
    read, bad = [], []
    for image, pts_files in images:
        faces = []
        for pts in pts_files:
            try:
                faces.append((pts, read_pts(pts)))
            except DataError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
        read.append((image, faces))
    counts = Counter(len(points) for _, faces in read for _, points in faces)
    if not counts:
        raise DataError(f"--from-pts: none of the .pts files could be read (first: {bad[0]})")
    first = next((pts, len(points)) for _, faces in read for pts, points in faces)
    num_points = counts.most_common(1)[0][0] if skip_bad else first[1]
    labelled = []
    for image, faces in read:
        for pts, points in faces:
            if len(points) != num_points and not skip_bad:
                raise DataError(f"{pts}: {len(points)} points, but {first[0]} has {first[1]}; every .pts "
                                f"file must have the same points")
        kept = [points for pts, points in faces if len(points) == num_points]
        bad += [f"{pts}: {len(points)} points, expected {num_points}" for pts, points in faces
                if len(points) != num_points]
        if kept:
            labelled.append((image, kept))
    if bad:
        print(f"--from-pts --skip-bad: skipped {len(bad)} bad .pts files (first: {bad[0]})", file=sys.stderr)
    return labelled, num_points


def detect_or_skip(labelled: list, skip_bad: bool) -> tuple[list, list]:
    """dlib's boxes in each labelled image; with `skip_bad` an unreadable image is left out and counted."""
    from tqdm import tqdm
    find, kept, detections, bad = face_finder(), [], [], []
    for image, faces in tqdm(labelled, desc="finding faces with dlib", unit="image"):
        try:
            detections.append(find(image))
            kept.append((image, faces))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append(str(e))
    if bad:
        print(f"--from-pts --skip-bad: skipped {len(bad)} unreadable images (first: {bad[0]})", file=sys.stderr)
    if not kept:
        raise DataError(f"--from-pts: none of the images could be read (first: {bad[0]})")
    return kept, detections


def from_pts(folders: list[Path], out: Path, skip_bad: bool = False) -> None:
    """Images with .pts files beside them -> dlib's XML at `out`. Boxes are dlib's detections where the
    detector finds the face, and elsewhere the box the relation fitted on those puts around the points.
    `skip_bad`: leave out bad .pts files and unreadable images instead of stopping at the first."""
    labelled, num_points = read_labelled(find_pts_images([Path(f) for f in folders]), skip_bad)
    labelled, detections = detect_or_skip(labelled, skip_bad)
    # A first guess that holds for any markup, then again with the relation that guess gives.
    relation, misfit, found = None, None, []
    for _ in range(2):
        found = [match_detections(faces, boxes, relation) for (_, faces), boxes in zip(labelled, detections)]
        detected = [Face(image, box, points) for (image, faces), boxes in zip(labelled, found)
                    for points, box in zip(faces, boxes) if box is not None]
        if not detected:
            relation = None
            break
        relation, misfit = fit_box_relation(detected)
    n_detected = sum(box is not None for boxes in found for box in boxes)
    n_faces = sum(len(faces) for _, faces in labelled)
    if relation is None:
        if num_points != NUM_LANDMARKS:
            raise UsageError(f"--from-pts: dlib's detector found none of the {n_faces} faces, so there is no box "
                             f"relation to fit, and the measured one (DLIB_RELATION) is for iBUG's 68 points, not "
                             f"{num_points}")
        relation, how = DLIB_RELATION, "DLIB_RELATION, measured for iBUG's 68 points: the detector found no face"
    else:
        how = (f"the relation fitted on the detected ones: side {relation.side:.3f}, centre offset "
               f"({relation.dx:+.3f}, {relation.dy:+.3f}) point spreads; RMS misfit of side {misfit['side']:.1%}, "
               f"centre ({misfit['dx']:.1%}, {misfit['dy']:.1%}) of the box side")
    records = []
    for (image, faces), boxes in zip(labelled, found):
        pairs = [(box or box_from_points(points, relation), points) for points, box in zip(faces, boxes)]
        records.append((relative_to(image, out), pairs))
    write_xml(out, records, "faces from .pts files")
    print(f"wrote {out}: {n_faces} faces of {len(labelled)} images, {num_points} points each; boxes: "
          f"{n_detected} from dlib's detector, {n_faces - n_detected} from the points by {how}")


def relative_to(image: Path, xml: Path) -> str:
    """The image's name as dlib's XML at `xml` holds it: relative to the XML's folder."""
    return Path(os.path.relpath(Path(image).absolute(), Path(xml).absolute().parent)).as_posix()


# ---------------------------------------------------------------- WFLW

class WflwFace(NamedTuple):
    image: str  # relative to WFLW's image folder
    points: np.ndarray  # (98, 2) 0-based pixels
    box: Box
    flags: dict[str, bool]  # WFLW_FLAGS: pose, expression, illumination, make-up, occlusion, blur
    line: int


def read_wflw(path: Path) -> list[WflwFace]:
    """WFLW's list_98pt_rect_attr_*.txt -> one record per line; one line naming the file and line if bad."""
    path = Path(path)
    lines = read_lines(path, "WFLW annotation file")
    faces = [parse_wflw_line(line, f"{path}: line {number}", number)
             for number, line in enumerate(lines, 1) if line.strip()]
    if not faces:
        raise DataError(f"{path}: no annotation lines")
    return faces


def parse_wflw_line(line: str, where: str, number: int) -> WflwFace:
    fields = line.split(maxsplit=WFLW_FIELDS - 1)  # the name last, whole even if it holds a space
    if len(fields) != WFLW_FIELDS:
        raise DataError(f"{where}: {len(fields)} fields, expected {WFLW_FIELDS} ({2 * WFLW_POINTS} point "
                        f"coordinates, 4 box corners, {len(WFLW_FLAGS)} flags, the image name)")
    try:
        numbers = np.array([float(f) for f in fields[:2 * WFLW_POINTS + 4]])
    except ValueError:
        raise DataError(f"{where}: the points and box must be numbers") from None
    if not np.isfinite(numbers).all():
        raise DataError(f"{where}: the points and box must be finite numbers")
    flags = fields[2 * WFLW_POINTS + 4:-1]
    if any(f not in ("0", "1") for f in flags):
        raise DataError(f"{where}: the flags ({' '.join(WFLW_FLAGS)}) must be 0 or 1, got {' '.join(flags)}")
    x0, y0, x1, y1 = numbers[2 * WFLW_POINTS:]
    if not (x1 > x0 and y1 > y0):
        raise DataError(f"{where}: the box {x0:g},{y0:g} to {x1:g},{y1:g} is empty")
    return WflwFace(fields[-1], numbers[:2 * WFLW_POINTS].reshape(WFLW_POINTS, 2),
                    Box(float(x0), float(y0), float(x1 - x0), float(y1 - y0)),
                    {name: f == "1" for name, f in zip(WFLW_FLAGS, flags)}, number)


def from_wflw(annotations: Path, images: Path, out: Path) -> None:
    """WFLW's annotation file -> dlib's XML at `out`, keeping WFLW's boxes; the lines of one image become
    one <image> with several boxes."""
    if not Path(images).is_dir():
        raise UsageError(f"--images {images}: not a folder")
    grouped: dict[str, list[WflwFace]] = {}
    for face in read_wflw(annotations):
        grouped.setdefault(face.image, []).append(face)
    records = []
    for name, faces in grouped.items():
        image = Path(images) / name
        if not image.is_file():
            raise DataError(f"{image}: image not found (line {faces[0].line} of {annotations})")
        records.append((relative_to(image, out), [(f.box, f.points) for f in faces]))
    write_xml(out, records, "faces from WFLW")
    markup = write_atomic(Path(out).with_name(WFLW_MARKUP), json.dumps(
        {"flip_pairs": WFLW_FLIP_PAIRS, "nme_points": WFLW_EYE_OUTER, "source": WFLW_SOURCE}) + "\n")
    n_faces = sum(len(faces) for faces in grouped.values())
    print(f"wrote {out}: {n_faces} faces of {len(grouped)} images, {WFLW_POINTS} points each, WFLW's boxes; "
          f"WFLW's mirror pairs and outer eye corners in {markup}: train with --flip --flip-pairs {markup} "
          f"--nme-points {markup}")


# ---------------------------------------------------------------- a smaller markup

def parse_indices(text: str) -> list[int]:
    """"36,39,42" -> [36, 39, 42], or one line naming --pick-points."""
    fields = [f.strip() for f in text.split(",")]
    if not all(f.isascii() and f.isdigit() for f in fields):
        raise UsageError(f"--pick-points {text!r}: expected point numbers separated by commas, such as "
                         f"36,39,42,45,33")
    indices = [int(f) for f in fields]
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise UsageError(f"--pick-points {text!r}: point {twice[0]} is picked twice")
    if len(indices) < 2:
        raise UsageError(f"--pick-points {text!r}: a markup needs at least 2 points")
    return indices


def pick_points(xml: Path, indices: str, out: Path) -> None:
    """Keep the points `indices` names ("I,J,..."), in that order and numbered 0..n-1, of every face of
    `xml` -> dlib's XML at `out`, with the same boxes."""
    picked = parse_indices(indices)
    faces = load_faces(Path(xml))
    num_points = len(faces[0].points)
    try:
        for i in picked:
            check_point(i, num_points)
    except ValueError as e:
        raise UsageError(f"--pick-points {indices!r}: {e} of {xml}") from None
    grouped: dict[Path, list[tuple[Box, np.ndarray]]] = {}
    for face in faces:
        grouped.setdefault(face.image, []).append((face.box, face.points[picked]))
    write_xml(out, [(relative_to(image, out), pairs) for image, pairs in grouped.items()],
              f"points {','.join(map(str, picked))} of {Path(xml).name}")
    print(f"wrote {out}: {len(faces)} faces of {len(grouped)} images, points {','.join(map(str, picked))} of "
          f"{xml} as 0..{len(picked) - 1}{mirror_note(picked, num_points)}")


def mirror_note(picked: list[int], num_points: int) -> str:
    """For points picked from iBUG's 68: their mirror pairs in the new numbering, which training needs to
    flip faces; any other markup's twins are unknown here."""
    if num_points != NUM_LANDMARKS:
        return ""
    position = {p: n for n, p in enumerate(picked)}
    pairs = sorted((position[p], position[IBUG.flip[p]]) for p in picked
                   if IBUG.flip[p] in position and position[p] < position[IBUG.flip[p]])
    return f"; their mirror pairs (iBUG's twins): {[list(p) for p in pairs]}"


# ---------------------------------------------------------------- the command line (also dataset.py's)

def add_arguments(parser: argparse.ArgumentParser, group) -> None:
    """The converters' flags: `group` is the mutually exclusive group they share with other actions."""
    group.add_argument("--from-pts", metavar="DIR", nargs="+", type=Path,
                       help="images with 300-W .pts files beside them (1-based points) -> --out XML; boxes from "
                            "dlib's detector, or from the points where it finds no face")
    group.add_argument("--from-wflw", metavar="FILE", type=Path,
                       help="WFLW annotation file (98 points, box, 6 flags, image name per line) -> --out XML")
    group.add_argument("--pick-points", metavar="I,J,...",
                       help="keep these points of --data-dir/--xml, in this order -> --out XML (a smaller markup)")
    parser.add_argument("--images", type=Path, help="with --from-wflw: the folder its image names are relative to")


def converting(args: argparse.Namespace) -> bool:
    return bool(args.from_pts or args.from_wflw or args.pick_points)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if converting(args) and (args.out is None or not args.out.lower().endswith(".xml")):
        parser.error("--from-pts, --from-wflw and --pick-points need --out FILE.xml")
    if args.from_wflw and args.images is None:
        parser.error("--from-wflw needs --images DIR, the folder of WFLW's images")


def convert(args: argparse.Namespace) -> None:
    if args.from_pts:
        from_pts(args.from_pts, Path(args.out), args.skip_bad)
    elif args.from_wflw:
        from_wflw(args.from_wflw, args.images, Path(args.out))
    else:
        refuse_input_as_output("--out", args.out, [Path(args.data_dir) / args.xml])
        pick_points(Path(args.data_dir) / args.xml, args.pick_points, Path(args.out))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    add_arguments(parser, action)
    parser.add_argument("--data-dir", default="data", help="with --pick-points: the dataset folder (default: data)")
    parser.add_argument("--xml", default=TRAIN_XML, help=f"with --pick-points: its labels (default: {TRAIN_XML})")
    parser.add_argument("--out", type=out_file, required=True, help="the XML to write")
    parser.add_argument("--skip-bad", action="store_true",
                        help="with --from-pts: leave out bad .pts files and unreadable images, and say how many")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    return args


def main(args: argparse.Namespace) -> None:
    with one_line_errors():
        convert(args)


if __name__ == "__main__":
    main(parse_args())
