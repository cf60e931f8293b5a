"""dlib's XML of faces (imglab's and the 300-W files' layout): reading it into checked Face records, and writing it."""
import random
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np

from errors import DataError
from files import write_atomic
from images import check_image
from landmarks import IBUG, Box, Face, Markup, markup_for

TRAIN_XML = "labels_ibug_300W_train.xml"


TEST_XML = "labels_ibug_300W_test.xml"
# On the 300-W subset the outer eye corners lie 0.33 to 0.81 box sides apart and every point within 0.95
# box sides of the box's centre: labels far beyond either are typos, and would turn NME into inf or noise.
MIN_EYE_DISTANCE, MAX_POINT_DISTANCE = 0.1, 1.5  # in box sides
FLOAT32_MAX = float(np.finfo(np.float32).max)


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
            raise DataError(f"{where} part {name} lacks a finite numeric x or y (within float32's range)",
                            "bad part") from None
    if len(parts) != k:
        raise DataError(f"{where} has {len(parts)} parts, expected {k} as most boxes of the file have",
                        "wrong part count")
    return Face(path, box, points, index)


def finite(text: str | None) -> float:
    """A coordinate: a number, and neither NaN nor infinite (float() takes 'nan' and '1e999'), nor beyond
    float32's range ('1e39'), in which the points are kept: it would become infinite there."""
    value = float(text)
    if not abs(value) <= FLOAT32_MAX:
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
        raise DataError(f"{xml_path}: labels file not found (run `bash download.sh`, or pass --data-dir)")
    try:
        return ET.parse(xml_path).getroot()
    except (ET.ParseError, ValueError, LookupError) as e:  # expat: ValueError, LookupError for encodings
        raise DataError(f"{xml_path}: malformed XML ({e})") from None


def load_faces(xml_path: Path, skip_bad: bool = False, keep_degenerate: bool = False,
               markup_of: Callable[[int], Markup] = markup_for) -> list[Face]:
    """Every <box> of every <image> in a dlib XML, with each image decoded once to prove it readable.

    The part count of most boxes sets the point count K (so one bad box cannot reject the good ones);
    `markup_of(K)` says what the points are (which ones normalise NME, for the label checks), and DataError
    says so when they cannot be those of K points.

    The first problem raises DataError, its one line naming the file; with skip_bad the faces
    concerned are dropped instead and a summary of what was skipped is printed. Faces whose labels
    parse but are degenerate (label_problem) count as problems unless keep_degenerate: evaluate.py
    keeps them, to name them and leave them out of its averages.
    """
    xml_path = Path(xml_path)
    root = read_xml(xml_path)
    faces, skipped = [], Counter()
    counts = Counter(len(b.findall("part")) for b in root.iter("box") if b.get("ignore", "0") != "1")
    num_points = counts.most_common(1)[0][0] if counts else None
    if num_points is not None and num_points < 2:  # nothing to learn K from: the file is not landmarks
        raise DataError(f"{xml_path}: most of its boxes have {num_points} parts; a markup needs at least 2")
    found = markup_of_count(markup_of, num_points, xml_path) if num_points else None
    for number, image_element in enumerate(root.iter("image")):
        name = image_element.get("file", "")
        path = xml_path.parent / name
        boxes = [b for b in image_element.findall("box") if b.get("ignore", "0") != "1"]
        try:
            if not name.strip() and boxes:
                raise DataError(f"{xml_path}: <image> {number} has no file name (its 'file' attribute)",
                                "no file name")
            if not name.isprintable():  # a character reference such as &#10; would break the one-line messages
                raise DataError(f"{xml_path}: <image> {number} has the file name {name!r}, with control "
                                f"characters", "bad file name")
            size = check_image(path) if boxes else None
        except DataError as e:
            if not skip_bad:
                raise
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
                    raise
                skipped[e.reason] += 1
    if skipped:
        reasons = "; ".join(f"{n} x {why}" for why, n in skipped.most_common())
        print(f"{xml_path}: skipped {sum(skipped.values())} bad faces ({reasons})", file=sys.stderr)
    if not faces:
        raise DataError(f"{xml_path}: no usable <box> elements with their <part>s")
    return faces


def markup_of_count(markup_of: Callable[[int], Markup], num_points: int, xml_path: Path) -> Markup:
    """markup_of(K) for a file whose boxes have K parts, or DataError saying why these points cannot be it."""
    try:
        found = markup_of(num_points)
    except ValueError as e:
        raise DataError(f"{xml_path}: its boxes have {num_points} parts: {e}") from None
    if found.num_points != num_points:
        raise DataError(f"{xml_path}: its boxes have {num_points} parts, but the weights are for "
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
    return write_atomic(path, "\n".join(lines), encoding="ISO-8859-1", errors="xmlcharrefreplace")
