"""Landmarks on folders of photos: finding the files, a shard of them, spreading them over the CPU's cores, the annotated PNG of each, and one JSON line per photo written as it comes."""
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from errors import DataError, Error, UsageError
from faces import FaceLandmarks, Landmarker
from files import read_json_lines, save_with
from flags import ignore_ctrl_c
from landmarks import Box

# The JSON Lines file a run writes in --out-dir: one object per photo, then one {"summary": ...} line.
RESULTS = "predictions.jsonl"


@dataclass(frozen=True)
class PhotoSettings:
    """What each worker needs to build its own Landmarker, and what to do with each photo."""
    weights: str | None = None
    device: str = "auto"
    detector: str = "yunet"
    any_roll: bool = False
    upsample: int = 1
    eager: bool = False
    passes: int | None = None  # None: faces.default_passes
    box: Box | None = None
    draw: bool = True
    out_dir: str = "predictions"
    int8: bool = True


def photo_files(paths: list[str], recursive: bool = False) -> list[Path]:
    """Files as given; folders -> the files inside (and below, if `recursive`) that PIL can open, by name.
    Missing paths stay, to be reported."""
    Image.init()
    suffixes = set(Image.registered_extensions())
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = path.rglob("*") if recursive else path.iterdir()
            files += sorted(p for p in found if p.is_file() and p.suffix.lower() in suffixes)
        else:
            files.append(path)
    return files


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


def png_names(files: list[Path]) -> dict[Path, str]:
    """<stem>_landmarks.png, numbered when two inputs share a stem (a.jpg and a.png, or two folders); from
    the whole list, so that every shard names each photo alike."""
    names, taken = {}, set()
    for path in files:
        name, k = f"{path.stem}_landmarks.png", 1
        while name in taken:
            k += 1
            name = f"{path.stem}_landmarks-{k}.png"
        taken.add(name)
        names[path] = name
    return names


def draw_faces(photo: Image.Image, gray: Image.Image, faces: list[FaceLandmarks], factor: int, path: Path) -> None:
    """Boxes yellow, points red, on the photo as decoded (1/factor of its size), in colour where RGB
    conversion keeps it faithful; written to a temporary name and renamed, so no PNG is ever half there."""
    # 16-bit and float modes would clip and transparent ones turn black: those are drawn on their grayscale.
    faithful = photo.mode in ("RGB", "L", "CMYK", "YCbCr", "P") and "transparency" not in photo.info
    canvas = photo.convert("RGB") if faithful else gray.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for face in faces:
        box, points = Box(*(v / factor for v in face.box)), (face.points + 0.5) / factor - 0.5
        r = max(1.5, box.side / 90)
        draw.polygon(turned_corners(box, face.roll), outline=(255, 220, 0), width=max(1, round(r / 2)))
        for x, y in points:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 40, 40))
    save_with(path, lambda tmp: canvas.save(tmp, format="PNG"))


def turned_corners(box: Box, roll: float) -> list[tuple[float, float]]:
    """The box's corners turned by `roll` degrees about its centre (clockwise on screen): the crop's outline."""
    c, s = np.cos(np.radians(roll)), np.sin(np.radians(roll))
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [box.width / 2, box.height / 2]
    return [tuple(p) for p in box.center + half @ np.array([[c, s], [-s, c]])]


# ---------------------------------------------------------------- one photo, in whichever process runs it

WORKER: dict = {}


def start_worker(settings: PhotoSettings, threads: int) -> None:
    """Each process its own Landmarker; one thread each when several processes share the cores."""
    torch.set_num_threads(threads)
    WORKER.clear()  # this process may have run photos before (in-process runs, from Python or the tests)
    WORKER["settings"] = settings
    try:
        WORKER["landmarker"] = Landmarker(settings.weights, settings.device, settings.detector, settings.any_roll,
                                          settings.upsample, settings.eager, settings.passes, settings.int8)
    except Error as e:  # raised again with the first photo, in the parent: a pool whose start fails would retry forever
        WORKER["error"] = e


def start_pool_worker(settings: PhotoSettings) -> None:
    ignore_ctrl_c()
    start_worker(settings, 1)


def do_photo(job: tuple[Path, str]) -> tuple[dict, dict]:
    """One photo's JSON record (an "error" record if unreadable), and the seconds it took by step."""
    path, png = job
    if "error" in WORKER:
        raise WORKER["error"]
    settings, landmarker = WORKER["settings"], WORKER["landmarker"]
    before = asdict(landmarker.timings)
    try:
        photo, factor = landmarker.open(path)
        faces, gray = landmarker.in_photo(photo, factor, [settings.box] if settings.box else None)
    except DataError as e:
        return {"image": str(path), "error": str(e), "faces": []}, {}
    record = {"image": str(path), "width": photo.width * factor, "height": photo.height * factor,
              "faces": [f.to_dict() for f in faces]}
    if settings.draw:
        annotated = Path(settings.out_dir) / png
        draw_faces(photo, gray, faces, factor, annotated)
        record["annotated"] = str(annotated)
    spent = {k: v - before[k] for k, v in asdict(landmarker.timings).items()}
    return record, spent


def landmark_photos(files: list[Path], names: dict[Path, str], settings: PhotoSettings,
                    workers: int) -> Iterator[tuple[dict, dict]]:
    """(record, seconds by step) for each file, in order, from `workers` processes (this one if 1)."""
    jobs = [(path, names[path]) for path in files]
    if workers <= 1 or len(jobs) <= 1:
        start_worker(settings, torch.get_num_threads())
        yield from map(do_photo, jobs)
        return
    with Pool(workers, start_pool_worker, (settings,)) as pool:
        yield from pool.imap(do_photo, jobs, chunksize=1)


def done_images(path: Path) -> set[str]:
    """The photos a cut-short run already wrote, its torn last line (a crash mid-write) cut off."""
    records, good = read_json_lines(path)
    os.truncate(path, good)
    return {record["image"] for record in records if "image" in record}


def summary(records: list[dict], seconds: float, spent: dict) -> dict:
    n_faces = sum(len(r["faces"]) for r in records)
    return {"images": len(records), "faces": n_faces, "unreadable": sum("error" in r for r in records),
            "seconds": round(seconds, 3), "images_per_s": round(len(records) / max(seconds, 1e-9), 2),
            "seconds_by_step": {k: round(v, 3) for k, v in spent.items() if k != "calls"}}


def read_results(path: Path) -> dict:
    """A run's JSON lines as one object: {"images": [one record per photo], "summaries": [the summary lines]}
    (one summary per run or shard that ended; none if it was cut short)."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"images": [r for r in records if "summary" not in r],
            "summaries": [r["summary"] for r in records if "summary" in r]}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"
