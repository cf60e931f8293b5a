"""Labels for faces that have none (self-training): a teacher, the network with a mirror look and two looks averaged with dlib's 68-point model, finds the faces in folders of photos and labels those its members agree on; kept photo by photo, so a cut-short labelling resumes, and given to training as a dlib XML."""
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import dlib_baseline
from errors import DataError, UsageError
from faces import Landmarker
from looks import DOUBTFUL_SCORE
from files import file_sha256, resume_json_lines
from images import read_stored
from labels import write_xml
from landmarks import IBUG, Box, Face, box_cover, box_from_points, nme
from photos import photo_files

# A face is taught only where the teacher's members agree: ours and dlib's points within this NME of each
# other (% of the outer-eye-corner distance). The issue's crude probe kept the training photos' faces so.
AGREE_NME = 6.0
# ... where the network is sure of the face: its mean point score at least looks.DOUBTFUL_SCORE ...
# ... and where the face is at least this many pixels a side (dlib's box of its points): a smaller face is blur
# upscaled more than 2.5 times into the crop of a 160 px network (the crop is 1.4 box sides), and its labels
# the least certain. The Udacity frames' faces have a median side of 75 px.
MIN_SIDE = 64.0
# A detection that covers this much of a labelled face, or is covered so, is that face: it has true labels.
SAME_FACE_COVER = 0.5
# Bumped whenever what a record holds changes, so that older records are labelled again.
RECORD_VERSION = 2


@dataclass(frozen=True)
class Taught:
    """One face as the teacher labelled it: the label is the members' mean; `agree` their NME apart."""
    image: Path
    box: Box
    points: np.ndarray
    score: float
    agree: float | None  # None: the network alone (dlib's model is not installed)


def teacher_key(weights: Path, with_dlib: bool) -> str:
    """Which teacher labelled a record: the weights' bytes, whether dlib's model joined, the record format."""
    return file_sha256(weights, f"|dlib={with_dlib}|v{RECORD_VERSION}").hexdigest()[:16]


def photo_stamp(path: Path) -> list:
    """What says a photo is the one labelled before: its resolved path, size and modification time."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, int(stat.st_mtime)]


class Teacher:
    """The labeller: the Landmarker with two looks and a mirror look on YuNet's upright faces, and dlib's
    68-point model on the box of the network's points where it is installed."""

    def __init__(self, weights: Path, device: str = "auto"):
        self.landmarker = Landmarker(weights=weights, device=device, passes=2, flip=True)
        if self.landmarker.markup.num_points != IBUG.num_points:
            raise UsageError(f"teacher={weights}: puts {self.landmarker.markup.num_points} points; the teacher "
                             f"labels iBUG's 68", "teacher")
        if self.landmarker.config.head != "pip":
            raise UsageError(f"teacher={weights}: the regression head gives no point scores, which say where the "
                             f"teacher is sure; take weights of the pip head (--head pip, as the released ones)",
                             "teacher")
        try:
            self.predictor = dlib_baseline.load_predictor()
        except UsageError:
            self.predictor = None
        self.key = teacher_key(Path(weights), self.predictor is not None)

    def label(self, path: Path) -> dict:
        """One photo's record: each face's box, the network's points and mean score, and dlib's points; all in
        the photo's pixels as stored (EXIF orientation not applied), where training crops its faces."""
        try:
            found, gray = self.landmarker.in_photo(read_stored(path))
        except DataError as e:
            return {"stamp": photo_stamp(path), "error": str(e), "faces": []}
        full = np.asarray(gray)
        faces = []
        for face in found:
            ours = face.points
            theirs = None
            if self.predictor is not None:
                theirs = dlib_baseline.predict_points(self.predictor, full, box_from_points(ours)).tolist()
            faces.append({"ours": np.round(ours, 2).tolist(), "dlib": theirs,
                          "score": round(float(face.scores.mean()), 4)})
        return {"stamp": photo_stamp(path), "faces": faces}


def records_path(folder: Path, key: str) -> Path:
    return folder / f"teacher-{key}.jsonl"


def read_records(path: Path) -> dict[str, dict]:
    """The records kept so far, by resolved photo path; a torn last line (a crash mid-write) is cut off."""
    if not path.is_file():
        return {}
    return {r["stamp"][0]: r for r in resume_json_lines(path) if "stamp" in r}


def label_photos(teacher: Teacher, files: list[Path], folder: Path, show: bool = True) -> dict[str, dict]:
    """Every photo's record, labelling only those not kept from before (or changed since); each new record is
    appended as it is made, so an interrupted labelling goes on where it stopped."""
    path = records_path(folder, teacher.key)
    kept = read_records(path)
    todo = [f for f in files if kept.get(str(f.resolve()), {}).get("stamp") != photo_stamp(f)]
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        members = "the network and dlib's 68-point model" if teacher.predictor else "the network alone"
        if show:
            print(f"teacher ({members}): labelling {len(todo)} of {len(files)} photos into {path}")
        for file in tqdm(todo, desc="teacher", unit="photo", disable=not show, leave=False):
            record = teacher.label(file)
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
            kept[record["stamp"][0]] = record
    return kept


def taught_faces(records: dict[str, dict], files: list[Path], labelled: list[Face],
                 held_out: set[Path]) -> tuple[list[Taught], dict[str, int]]:
    """The faces the teacher's labels are kept for, in the order of `files`, and how many each rule dropped:
    photos holding a validation face (`held_out`) are left out whole, and a face the labels already hold is
    not taught again."""
    boxes: dict[Path, list[Box]] = {}
    for face in labelled:
        boxes.setdefault(face.image.resolve(), []).append(face.box)
    kept, dropped = [], {"validation photo": 0, "labelled already": 0, "small": 0, "unsure": 0, "disagree": 0}
    for file in files:
        record = records.get(str(file.resolve()))
        for face in record["faces"] if record else []:
            ours = np.asarray(face["ours"], np.float64)
            theirs = None if face["dlib"] is None else np.asarray(face["dlib"], np.float64)
            label = ours if theirs is None else (ours + theirs) / 2
            box = box_from_points(label)
            agree = None if theirs is None else float(nme(ours[None], theirs[None])[0])
            reason = (
                "validation photo" if file.resolve() in held_out else
                "labelled already" if any(box_cover(box, b) > SAME_FACE_COVER for b in boxes.get(file.resolve(), [])) else
                "small" if box.side < MIN_SIDE else
                "unsure" if face["score"] < DOUBTFUL_SCORE else
                "disagree" if agree is not None and agree > AGREE_NME else None)
            if reason:
                dropped[reason] += 1
            else:
                kept.append(Taught(file.resolve(), box, label.astype(np.float32), face["score"], agree))
    return kept, dropped


def teacher_xml(taught: list[Taught], folder: Path) -> Path:
    """The taught faces as a dlib XML in `folder`, named by its content (the crop cache keys on its bytes)."""
    by_image: dict[Path, list[tuple[Box, np.ndarray]]] = {}
    for t in taught:
        by_image.setdefault(t.image, []).append((t.box, t.points))
    text = "\n".join(f"{p}|{b}|{np.round(x, 0).tolist()}" for p, faces in by_image.items() for b, x in faces)
    name = f"teacher-faces-{hashlib.sha256(text.encode()).hexdigest()[:12]}.xml"
    path = folder / name
    if not path.is_file():
        write_xml(path, [(str(p), faces) for p, faces in by_image.items()], name="faces labelled by the teacher")
    return path


def teach(folders: list[str], weights: Path, cache: Path, labelled: list[Face], held_out: set[Path],
          device: str = "auto", show: bool = True) -> Path:
    """The XML of the faces found in `folders` (and below) and labelled by the teacher, with the labelled
    faces' photos and boxes kept out as taught_faces says; its records kept in `cache` between runs."""
    files = photo_files(folders, recursive=True).files
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"--unlabelled {missing[0]}: no such folder or photo")
    if not files:
        raise DataError(f"--unlabelled {' '.join(folders)}: no photos found")
    teacher = Teacher(weights, device)
    if teacher.predictor is None and show:
        print(f"note: dlib's 68-point model is not installed, so the teacher is the network alone "
              f"({dlib_baseline.INSTALL_HINT.split('; ', 1)[1]})", file=sys.stderr)
    records = label_photos(teacher, files, cache, show)
    taught, dropped = taught_faces(records, files, labelled, held_out)
    if show:
        why = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n)
        print(f"teacher: {len(taught)} faces kept from {len(files)} photos" + (f" (left out: {why})" if why else ""))
    if not taught:
        raise DataError(f"--unlabelled {' '.join(folders)}: the teacher kept no face (left out: {dropped})")
    return teacher_xml(taught, cache)
