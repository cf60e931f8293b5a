"""Landmarks on folders of photos: finding the files, a shard of them, spreading them over the CPU's cores a few at a time, the annotated picture of each, and the results written as they come: one JSON line per photo, or Parquet rows per face."""
import importlib.util
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoints import RELEASED_WEIGHTS, choose_ahead
from errors import DataError, Error, OutputError, UsageError
from images import rgb_is_faithful
from faces import Landmarker, LandmarkerOptions
from looks import FaceLandmarks
from files import read_json_lines, resume_json_lines, save_with
from flags import ignore_ctrl_c, worker_pool
from landmarks import Box

import cv2  # noqa: E402  (after the project's files: detectors.py sets OpenCV's log levels before it first loads)

# The JSON Lines file a run writes in --out-dir: one object per photo, then one {"summary": ...} line; the folder
# when none is named (predict.py takes the next free one, default_folder).
RESULTS = "predictions.jsonl"
DEFAULT_OUT = "predictions"


# Photos a worker takes at a time: their faces' crops share the network's calls (Landmarker.in_photos), and
# results still come out a few photos at a time.
PHOTO_BATCH = 4
# Drawn JPEGs stay JPEGs (at this quality): a 1024 px photo takes 3 ms to write so, against 237 ms as a PNG at
# PIL's default compression; other photos become PNGs at compression level 1 (54 ms, 15% larger).
DRAWN_JPEG_QUALITY, DRAWN_PNG_LEVEL = 90, 1
JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class PhotoSettings:
    """What each worker needs to build its own Landmarker, and what to do with each photo."""
    options: LandmarkerOptions = LandmarkerOptions()
    box: Box | None = None
    draw: bool = True
    out_dir: str = DEFAULT_OUT


class PhotoList(NamedTuple):
    files: list[Path]
    skipped: Counter  # what a folder held that is not taken, by kind: "linked folder", "broken link", ...


def photo_files(paths: list[str], recursive: bool = False) -> PhotoList:
    """Files as given; folders -> the files inside (and below, if `recursive`) that PIL can open, by name, in
    order. Missing paths stay, to be reported. Below a folder, links to files are taken (they are photos put
    there), links to folders are not followed (as find and os.walk do: so a link loop or a link to / costs
    nothing), and links that lead nowhere or round in a loop are skipped; each kind is counted."""
    Image.init()
    suffixes = set(Image.registered_extensions())
    files, skipped = [], Counter()
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        found = []
        for root, folders, names in os.walk(path, onerror=lambda e: skipped.update(["unreadable folder"])):
            skipped.update("linked folder" for f in folders if os.path.islink(os.path.join(root, f)))
            for name in names:
                file = Path(root, name)
                if file.suffix.lower() not in suffixes:
                    continue
                if file.is_file():
                    found.append(file)
                elif file.is_symlink():
                    skipped["broken or looping link"] += 1
            if not recursive:
                break
        files += sorted(found)
    return PhotoList(files, skipped)


def shard(files: list, spec: str | None) -> list:
    """`K/N`: every N-th file from the K-th (0-based, as SLURM's and Kubernetes' array indexes), so that N
    machines given K = 0..N-1 share a folder between them and their outputs join by concatenation."""
    if spec is None:
        return files
    k, n = parse_shard(spec)
    return files[k::n]


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard {spec}: expected K/N, such as 0/4 (the first of 4)") from None
    if not (n >= 1 and 0 <= k < n):
        raise UsageError(f"--shard {spec}: expected 0 <= K < N")
    return k, n


def results_path(out_dir: Path, spec: str | None) -> Path:
    if spec is None:
        return out_dir / RESULTS
    k, n = parse_shard(spec)
    return out_dir / f"predictions.shard-{k}-of-{n}.jsonl"


def drawn_names(files: list[Path]) -> dict[Path, str]:
    """<stem>_landmarks.jpg for a JPEG, <stem>_landmarks.png for any other photo, numbered when two inputs
    would share a name (two folders); from the whole list, so that every shard names each photo alike."""
    names, taken = {}, set()
    for path in files:
        suffix = ".jpg" if path.suffix.lower() in JPEG_SUFFIXES else ".png"
        name, k = f"{path.stem}_landmarks{suffix}", 1
        while name in taken:
            k += 1
            name = f"{path.stem}_landmarks-{k}{suffix}"
        taken.add(name)
        names[path] = name
    return names


def draw_faces(photo: Image.Image, gray: Image.Image, faces: list[FaceLandmarks], factor: int, path: Path) -> None:
    """Boxes yellow, points red, on the photo as decoded (1/factor of its size), in colour where RGB
    conversion keeps it faithful; as a JPEG or a PNG by its name's suffix (DRAWN_JPEG_QUALITY, DRAWN_PNG_LEVEL),
    written to a temporary name and renamed, so no picture is ever half there."""
    canvas = photo.convert("RGB") if rgb_is_faithful(photo) else gray.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for face in faces:
        box, points = Box(*(v / factor for v in face.box)), (face.points + 0.5) / factor - 0.5
        r = max(1.5, box.side / 90)
        draw.polygon(turned_corners(box, face.roll), outline=(255, 220, 0), width=max(1, round(r / 2)))
        for x, y in points:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 40, 40))
    jpeg = path.suffix.lower() in JPEG_SUFFIXES
    save_with(path, lambda tmp: canvas.save(tmp, format="JPEG", quality=DRAWN_JPEG_QUALITY) if jpeg
              else canvas.save(tmp, format="PNG", compress_level=DRAWN_PNG_LEVEL))


def turned_corners(box: Box, roll: float) -> list[tuple[float, float]]:
    """The box's corners turned by `roll` degrees about its centre (clockwise on screen): the crop's outline."""
    c, s = np.cos(np.radians(roll)), np.sin(np.radians(roll))
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [box.width / 2, box.height / 2]
    return [tuple(p) for p in box.center + half @ np.array([[c, s], [-s, c]])]


# ---------------------------------------------------------------- one photo, in whichever process runs it

WORKER: dict = {}


def start_worker(settings: PhotoSettings, threads: int) -> None:
    """Each process its own Landmarker; one thread each when several processes share the cores, OpenCV's too
    (YuNet's threads in each worker otherwise fought the other workers for the cores)."""
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    WORKER.clear()  # this process may have run photos before (in-process runs, from Python or the tests)
    WORKER["settings"] = settings
    try:
        WORKER["landmarker"] = Landmarker(settings.options)
    except Error as e:  # raised again with the first photo, in the parent: a pool whose start fails would retry forever
        WORKER["error"] = e


def start_pool_worker(settings: PhotoSettings) -> None:
    ignore_ctrl_c()
    start_worker(settings, 1)


def do_photos(jobs: list[tuple[Path, str]]) -> list[tuple[dict, dict]]:
    """A few photos' JSON records (an "error" record for one that cannot be read), the crops of all of them
    in shared network calls; with the seconds each step took, the Landmarker's start on the first."""
    if "error" in WORKER:
        raise WORKER["error"]
    settings, landmarker = WORKER["settings"], WORKER["landmarker"]
    before = WORKER.get("counted", {})  # nothing yet in this worker: its Landmarker's start counts too
    decoded, records = [], []
    for path, _ in jobs:
        try:
            decoded.append(landmarker.open(path))
        except DataError as e:
            decoded.append(None)
            records.append({"image": str(path), "error": str(e), "faces": []})
    good = [d for d in decoded if d is not None]
    found = iter(landmarker.in_photos(good, [[settings.box] if settings.box else None] * len(good)))
    records = iter(records)
    done = []
    for (path, drawn), opened in zip(jobs, decoded):
        if opened is None:
            done.append(next(records))
            continue
        (photo, factor), (faces, gray) = opened, next(found)
        record = {"image": str(path), "width": photo.width * factor, "height": photo.height * factor,
                  "faces": [f.to_dict() for f in faces]}
        if settings.draw:
            record["annotated"] = draw(photo, gray, faces, factor, Path(settings.out_dir), drawn, landmarker)
        done.append(record)
    WORKER["counted"] = asdict(landmarker.timings)
    spent = {k: v - before.get(k, 0.0) for k, v in WORKER["counted"].items()}
    return [(record, spent if i == 0 else {}) for i, record in enumerate(done)]


def draw(photo: Image.Image, gray: Image.Image, faces: list[FaceLandmarks], factor: int, out_dir: Path, name: str,
         landmarker: Landmarker) -> str:
    """The annotated picture written; OutputError naming the folder where it cannot be (the record is not
    written either, so --resume does this photo again). Its seconds count as the Landmarker's drawing."""
    start = perf_counter()
    try:
        draw_faces(photo, gray, faces, factor, out_dir / name)
    except OSError as e:
        raise cannot_write(out_dir / name, e) from None
    landmarker.timings.draw += perf_counter() - start
    return str(out_dir / name)


def landmark_photos(files: list[Path], names: dict[Path, str], settings: PhotoSettings,
                    workers: int) -> Iterator[tuple[dict, dict]]:
    """(record, seconds by step) for each file, in order, from `workers` processes (this one if 1), each
    taking up to PHOTO_BATCH photos at a time (fewer where there are too few photos to keep every worker busy)."""
    size = max(1, min(PHOTO_BATCH, -(-len(files) // max(workers, 1))))
    jobs = [[(path, names[path]) for path in files[i:i + size]] for i in range(0, len(files), size)]
    if workers <= 1 or len(jobs) <= 1:
        start_worker(settings, torch.get_num_threads())
        for batch in map(do_photos, jobs):
            yield from batch
        return
    options = settings.options
    if not options.eager and options.precision == "auto" and options.device in ("auto", "cpu") \
            and not torch.cuda.is_available():
        choose_ahead(Path(options.weights) if options.weights else RELEASED_WEIGHTS, options.int8, 1)
    with worker_pool(workers, start_pool_worker, (settings,)) as pool:
        for batch in pool.imap(do_photos, jobs, chunksize=1):
            yield from batch


def done_images(path: Path) -> set[str]:
    """The photos a cut-short run already wrote, its torn last line (a crash mid-write) cut off."""
    return {record["image"] for record in resume_json_lines(path) if "image" in record}


class Tally:
    """What a run has done so far, as counts: its memory stays flat over any number of photos."""

    def __init__(self):
        self.images = self.faces = self.unreadable = 0
        self.spent: dict[str, float] = {}
        self.first = self.last = 0.0  # when the first and the last record came

    def add(self, record: dict, seconds: dict) -> None:
        self.images += 1
        self.faces += len(record["faces"])
        self.unreadable += "error" in record
        for step, spent in seconds.items():
            self.spent[step] = self.spent.get(step, 0.0) + spent
        self.last = perf_counter()
        self.first = self.first or self.last

    def summary(self, seconds: float) -> dict:
        """The counts, photos a second over the whole run and once running (from the first record to the last:
        the start of workers or of a Ray left out), and each step's seconds summed over the processes."""
        steady = (self.images - 1) / (self.last - self.first) if self.last > self.first else 0.0
        return {"images": self.images, "faces": self.faces, "unreadable": self.unreadable,
                "seconds": round(seconds, 3), "images_per_s": round(self.images / max(seconds, 1e-9), 2),
                "steady_images_per_s": round(steady, 2),
                "seconds_by_step": {k: round(v, 3) for k, v in self.spent.items() if k != "calls"}}


def cannot_write(path: Path, error: OSError) -> OutputError:
    """A run's output that could not be written (a full disk, a folder gone), said naming its folder."""
    return OutputError(f"{path.parent}: cannot write {path.name} ({error.strerror or error}); the photos done so far "
                       f"are kept: make room, then finish them with the same command and --resume")


def append_line(path: Path, record: dict) -> None:
    """One JSON line added whole, or nothing: a write that fails part-way (a full disk) is cut back off, so no
    torn line is left, and OutputError names the folder. The file is opened for each line, so a run that
    stops before its first photo (weights that do not load, say) leaves no empty file for its rerun to refuse."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    existed = path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
    except OSError as e:
        os.ftruncate(fd, size)
        raise cannot_write(path, e) from None
    finally:
        os.close(fd)
        if not existed and size == 0 and path.stat().st_size == 0:
            path.unlink()


class JsonRecords:
    """Where a run's records go by default: predictions.jsonl, one line per photo appended as it is done
    (append_line), then a summary line."""

    def __init__(self, path: Path):
        self.path = self.where = path

    def exists(self) -> bool:
        return self.path.exists()

    def done(self) -> set[str]:
        return done_images(self.path)

    def add(self, record: dict) -> None:
        append_line(self.path, record)

    def keep(self) -> None:
        """Nothing held back: every line is on disk as it comes."""

    def close(self, summary: dict) -> None:
        append_line(self.path, {"summary": summary})


# --format parquet: photos per file. Each file is written whole (a Parquet file is readable only once closed),
# so a crash loses at most this many photos' rows, which --resume does again.
PARQUET_PHOTOS = 500


def parquet_schema():
    """One row per face: the photo's path and size, the face's number in it (-1: a photo without a face, or
    one that could not be read, whose `error` says why), and the face as the JSON record holds it."""
    import pyarrow as pa
    floats = pa.list_(pa.float32())
    return pa.schema([("image", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("face", pa.int32()),
                      ("box", floats), ("points", pa.list_(floats)), ("scores", floats), ("pose", floats),
                      ("roll", pa.float32()), ("detector_score", pa.float32()), ("annotated", pa.string()),
                      ("error", pa.string())])


def face_rows(record: dict) -> list[dict]:
    """A photo's JSON record as Parquet rows: one per face, or one with face -1 where it has none."""
    common = {k: record.get(k) for k in ("image", "width", "height", "annotated", "error")}
    if not record["faces"]:
        return [common | {"face": -1}]
    return [common | {"face": i} | {k: face.get(k) for k in ("box", "points", "scores", "pose", "roll",
                                                               "detector_score")}
            for i, face in enumerate(record["faces"])]


class ParquetRecords:
    """--format parquet: the records as Parquet files in the out folder, <stem>-00000.parquet and on, one row per
    face (face_rows), each file written whole every PARQUET_PHOTOS photos and at the end. The files read as one
    table: pyarrow.parquet.read_table(their paths), DuckDB's read_parquet('folder/predictions-*.parquet'),
    Spark. No summary is kept; the run prints it."""

    def __init__(self, folder: Path, stem: str):
        if importlib.util.find_spec("pyarrow") is None:
            raise UsageError("format=parquet: needs pyarrow: pip install pyarrow", "format")
        self.folder, self.stem, self.rows, self.photos = folder, stem, [], 0
        self.where = folder / f"{stem}-*.parquet"  # what the results are, as messages name them

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.stem}-*.parquet"))

    def exists(self) -> bool:
        return bool(self.files())

    def done(self) -> set[str]:
        import pyarrow.parquet as pq
        return {image for file in self.files() for image in pq.read_table(file, columns=["image"])["image"].to_pylist()}

    def add(self, record: dict) -> None:
        self.rows += face_rows(record)
        self.photos += 1
        if self.photos >= PARQUET_PHOTOS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        if not self.rows:
            return
        files = self.files()
        number = int(files[-1].stem.rsplit("-", 1)[1]) + 1 if files else 0
        path = self.folder / f"{self.stem}-{number:05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=parquet_schema())
        try:
            save_with(path, lambda tmp: pq.write_table(table, tmp))
        except OSError as e:
            raise cannot_write(path, e) from None
        self.rows, self.photos = [], 0

    def keep(self) -> None:
        """The rows held back written out, whatever ended the run (an error, Ctrl-C); a failure to write them
        is said only where no other error is being said already."""
        pending = sys.exc_info()[1]
        try:
            self.flush()
        except OutputError:
            if pending is None:
                raise

    def close(self, summary: dict) -> None:
        self.flush()


def results_of(folder: Path, spec: str | None, parquet: bool) -> "JsonRecords | ParquetRecords":
    """Where a run's records go in `folder`: its JSON Lines file (a shard's own), or its Parquet files."""
    path = results_path(folder, spec)
    return ParquetRecords(folder, path.stem) if parquet else JsonRecords(path)


def default_folder(spec: str | None, parquet: bool, resume: bool) -> Path:
    """predict.py's folder when none is named: the first of predictions, predictions-2, ... that holds no
    results of this kind of run (this shard's own file, so the shards of one folder still join there); with
    resume, the last that holds some, the run to go on with."""
    names = [Path(DEFAULT_OUT)] + [Path(f"{DEFAULT_OUT}-{k}") for k in range(2, 10000)]
    holds = [results_of(folder, spec, parquet).exists() for folder in names[:next(
        (i for i, f in enumerate(names) if not f.exists()), len(names)) + 1]]
    if resume:
        return names[max((i for i, held in enumerate(holds) if held), default=0)]
    return names[holds.index(False)]


def read_results(path: Path) -> dict:
    """A run's JSON lines as one object: {"images": [one record per photo], "summaries": [the summary lines]}
    (one summary per run, shard or engine worker that ended; none if it was cut short). `path` is one results
    file, or a folder whose predictions*.jsonl files are read as one, in name order. A line a crash tore at
    the end of a file is left out, as --resume leaves it."""
    path = Path(path)
    files = sorted(path.glob("predictions*.jsonl")) if path.is_dir() else [path]
    records = [r for file in files for r in read_json_lines(file)[0]]
    return {"images": [r for r in records if "summary" not in r],
            "summaries": [r["summary"] for r in records if "summary" in r]}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"
