"""Video figures: clips made from real 300-W faces with known points in every frame, and what predict.py --video does on them (jitter, NME, lag, lost faces, tilting heads, frames/s, memory over a long run); also fits dlib's box from landmarks."""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

import tracking
import video
from dataset import trained_split
from detectors import DETECTORS, Detection
from faces import Landmarker, LandmarkerOptions
from errors import UsageError
from files import write_atomic
from flags import number_in, one_line_errors, out_file, out_folder
from labels import TRAIN_XML, load_faces, parse_box, read_xml
from landmarks import (DLIB_RELATION, LEFT_EYE_OUTER, RIGHT_EYE_OUTER, BoxRelation, Face, box_from_points,
                       box_iou, fit_box_relation, nme)

FRAME = (640, 480)   # width, height: the webcam size the frames/s target is set for
FACE_SIDE = 160      # dlib box side of the face in the clips, in pixels: a person about a metre from a webcam
FPS = 30.0
CLIPS = ("still", "moving", "covered", "leaving", "tilting", "tilt10")
NOISE = 4.0          # grey levels of Gaussian noise per pixel and frame, as a webcam in room light
TILT_SECONDS = 6.0   # one slow tilt to one side, to the other and back


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default="runs/best.pt", help="weights from train.py (default: runs/best.pt)")
    p.add_argument("--data-dir", default="../shared/data/300w_subset",
                   help="folder holding dlib's XML and images (default: ../shared/data/300w_subset)")
    p.add_argument("--xml", default=TRAIN_XML, help=f"labels file inside --data-dir (default: {TRAIN_XML})")
    p.add_argument("--faces", type=number_in(int, 1), default=5,
                   help="validation faces of the weights' split to make clips of (default: 5)")
    p.add_argument("--seconds", type=number_in(float, 0.5, 600), default=3.0,
                   help="length of each moving clip, 0.5 to 600 (default: 3)")
    p.add_argument("--out-dir", default="clips",
                   help="folder for the clips and predict.py's output (default: clips)")
    p.add_argument("--smooth-min-cutoff", type=number_in(float, 0, low_open=True), default=tracking.MIN_CUTOFF,
                   metavar="HZ", help=f"One Euro filter, as predict.py's (default: {tracking.MIN_CUTOFF:g})")
    p.add_argument("--smooth-beta", type=number_in(float, 0), default=tracking.BETA,
                   help=f"as predict.py's (default: {tracking.BETA:g})")
    p.add_argument("--smooth-d-cutoff", type=number_in(float, 0, low_open=True), default=tracking.D_CUTOFF,
                   metavar="HZ", help=f"as predict.py's (default: {tracking.D_CUTOFF:g})")
    p.add_argument("--detector", choices=DETECTORS, default="yunet", help="as predict.py's (default: yunet)")
    p.add_argument("--lost-by", choices=tracking.LOST_CHECKS, default=tracking.LOST_BY,
                   help=f"as predict.py's (default: {tracking.LOST_BY})")
    p.add_argument("--command-seconds", type=number_in(float, 0), default=20.0,
                   help="length of the two-face clip that `python predict.py --video` is timed on as a whole "
                        "command, start-up included; 0: skip (default: 20)")
    p.add_argument("--memory-minutes", type=number_in(float, 0), default=0.0,
                   help="instead of the rest: run a clip this long of one moving face and report the resident "
                        "memory after each minute (default: 0, skip)")
    LandmarkerOptions.add_network_flags(p)
    p.add_argument("--json", metavar="FILE", type=out_file, help="also write the figures to FILE as JSON")
    p.add_argument("--rescore", action="store_true",
                   help="score the clips and predict.py's raw JSON already in --out-dir again, without the network "
                        "(to try other --smooth-* values)")
    p.add_argument("--fit-box", action="store_true",
                   help="only fit landmarks.DLIB_RELATION on --xml's faces and print it with its misfit")
    args = p.parse_args(argv)
    if not (args.rescore or args.fit_box):  # those only read the folder, or never touch it
        try:
            out_folder(args.out_dir)
        except argparse.ArgumentTypeError as e:
            p.error(f"argument --out-dir: {e}")
    return args


# ---------------------------------------------------------------- dlib's box from landmarks

def report_box_fit(faces: list[Face]) -> dict:
    relation, misfit = fit_box_relation(faces)
    ious = [box_iou(box_from_points(f.points, relation), f.box) for f in faces]
    print(f"{len(faces)} faces: {relation}")
    print(f"RMS misfit in units of the box side: centre x {misfit['dx']:.4f}, centre y {misfit['dy']:.4f}, "
          f"side {misfit['side']:.4f}; IoU with dlib's box: median {np.median(ious):.3f}, "
          f"10th percentile {np.percentile(ious, 10):.3f}")
    return {"relation": relation._asdict(), "misfit": misfit, "iou_median": float(np.median(ious))}


# ---------------------------------------------------------------- clips with known truth

def face_matrix(face: Face, shift=(0.0, 0.0), angle: float = 0.0, zoom: float = 1.0) -> np.ndarray:
    """2x3 map from the photo to the frame: the face's box centred, FACE_SIDE wide, then moved."""
    scale = zoom * FACE_SIDE / face.box.side
    c, s = math.cos(math.radians(angle)) * scale, math.sin(math.radians(angle)) * scale
    center = face.box.center
    target = np.array(FRAME) / 2 + shift
    return np.array([[c, -s, target[0] - c * center[0] + s * center[1]],
                     [s, c, target[1] - s * center[0] - c * center[1]]])


def warp(photo: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The photo in a FRAME-sized frame by `matrix` (face_matrix), its edges repeated beyond the photo."""
    return cv2.warpAffine(photo, matrix, FRAME, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def moving_path(n: int) -> list[dict]:
    """Shift, roll and zoom along smooth loops, as a head moves in front of a webcam: up to 1.2 box sides
    a second sideways, 30 degrees a second of roll, and 20% nearer and farther."""
    t = np.arange(n) / FPS
    w = 2 * math.pi / 3.0
    return [dict(shift=(120 * math.sin(w * u), 40 * math.sin(2 * w * u)), angle=15 * math.sin(w * u + 1),
                 zoom=1 + 0.2 * math.sin(w * u / 1.5)) for u in t]


def write_clip(path: Path, photo: np.ndarray, face: Face, poses: list[dict], rng: np.random.Generator,
               cover_from: int | None = None) -> np.ndarray:
    """The photo warped by each pose, plus noise, into an MP4; the true points per frame (N, K, 2).

    From frame `cover_from` on, a patch of the frame's own background slides over the face in 5 frames
    and stays: the face is covered."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, FRAME)
    truth = []
    for i, pose in enumerate(poses):
        matrix = face_matrix(face, **pose)
        frame = warp(photo, matrix)
        points = face.points @ matrix[:, :2].T + matrix[:, 2]
        if cover_from is not None and i >= cover_from:
            frame = cover(frame, box_from_points(points), min(1.0, (i - cover_from + 1) / 5))
        frame = np.clip(frame + rng.normal(0, NOISE, frame.shape), 0, 255).astype(np.uint8)
        writer.write(frame)
        truth.append(points)
    writer.release()
    return np.array(truth)


def cover(frame: np.ndarray, box, share: float) -> np.ndarray:
    """`share` of the way, a patch from the frame's top-left corner slides in from the left over the face."""
    side = int(box.side * 1.6)
    patch = frame[:side, :side].copy()
    left = int(box.center[0] - side / 2 - (1 - share) * side * 1.5)
    top = int(box.center[1] - side / 2)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, frame.shape[1]), min(top + side, frame.shape[0])
    frame = frame.copy()
    if x1 > x0 and y1 > y0:
        frame[y0:y1, x0:x1] = patch[y0 - top:y1 - top, x0 - left:x1 - left]
    return frame


# ---------------------------------------------------------------- running predict.py and scoring it

def run_predict(args: argparse.Namespace, clip: Path, smooth: bool) -> video.VideoRun:
    """What predict.py --video does on a clip with its default detector settings, with or without smoothing."""
    out_dir = clip.parent / ("smooth" if smooth else "raw")
    tracker = args.landmarker.tracker(tracking.DETECT_EVERY, smoothing_of(args) if smooth else None, args.lost_by)
    return video.run_video(str(clip), tracker, out_dir, args.weights)


def smoothing_of(args: argparse.Namespace) -> dict:
    return dict(min_cutoff=args.smooth_min_cutoff, beta=args.smooth_beta, d_cutoff=args.smooth_d_cutoff)


def face_points(record: dict, smoothing: dict | None = None, relation: BoxRelation = DLIB_RELATION) -> np.ndarray:
    """The points of the clip's face in each frame (NaN where none), from predict.py's JSON; with
    `smoothing`, through the One Euro filter as the tracker runs it (one filter per id, the same times and
    scale), so that raw and smoothed figures come from the very same tracking."""
    frames = record["frames"]
    k = next((len(f["faces"][0]["points"]) for f in frames if f["faces"]), 1)
    points, filters = np.full((len(frames), k, 2), np.nan), {}
    for i, frame in enumerate(frames):
        for face in frame["faces"]:
            p = np.array(face["points"])
            if smoothing is not None:
                smoother = filters.setdefault(face["id"], tracking.OneEuroFilter(**smoothing))
                p = smoother.update(p, frame["time"], scale=box_from_points(p, relation).side)
            # One face in these clips; should the detector find a second, the biggest is the face.
            if face is max(frame["faces"], key=lambda f: f["box"][2]):
                points[i] = p
    return points


def ocular(truth: np.ndarray) -> np.ndarray:
    return np.linalg.norm(truth[:, LEFT_EYE_OUTER] - truth[:, RIGHT_EYE_OUTER], axis=-1)


def jitter(points: np.ndarray, truth: np.ndarray) -> float:
    """Mean frame-to-frame movement of the points over the outer-eye-corner distance, in %."""
    steps = np.linalg.norm(np.diff(points, axis=0), axis=-1).mean(-1)
    return float(100 * np.nanmean(steps / ocular(truth)[1:]))


def lag_frames(points: np.ndarray, truth: np.ndarray) -> float:
    """The delay, in frames (to 0.1), that best aligns the points with the truth."""
    found = ~np.isnan(points[:, 0, 0])
    t = np.arange(len(truth), dtype=np.float64)
    best = (math.inf, 0.0)
    for delay in np.arange(0, 6.01, 0.1):
        shifted = np.stack([np.interp(t - delay, t, truth[:, j, d]) for j in range(truth.shape[1]) for d in (0, 1)],
                           axis=1).reshape(truth.shape)
        usable = found & (t >= 6)
        error = np.linalg.norm(points[usable] - shifted[usable], axis=-1).mean()
        best = min(best, (error, float(delay)))
    return best[1]


def checks_on(args: argparse.Namespace, clip: Path, boxes: list) -> tuple[np.ndarray, np.ndarray]:
    """What each lost check reads on each frame of the clip, the network cropping the given upright box:
    the drift of two crops, and the mean point score of one (NaN for a network without scores)."""
    by_drift, by_score = (tracking.network_locator(args.landmarker.looker, lost_by)
                          for lost_by in ("drift", "score"))
    capture, drifts, scores = cv2.VideoCapture(str(clip)), [], []
    for box in boxes:
        gray = Image.fromarray(cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2GRAY))
        crop = [Detection(box, 1.0)]
        drifts.append(by_drift(gray, crop)[1][0])
        point_scores = by_score(gray, crop)[2]
        scores.append(np.nan if point_scores is None else point_scores[0].mean())
    return np.array(drifts), np.array(scores)


def tilt_path(n: int, degrees: float) -> list[dict]:
    """A head that tilts slowly to +-degrees and back, once over TILT_SECONDS (up to 94 degrees a second at
    90), swaying a little sideways."""
    t = np.arange(n) / FPS
    w = 2 * math.pi / TILT_SECONDS
    return [dict(shift=(30 * math.sin(w * u), 0.0), angle=degrees * math.sin(w * u)) for u in t]


def make_clips(face: Face, folder: Path, seconds: float, rng: np.random.Generator) -> None:
    """still, moving, covered, leaving, tilting (to +-90 degrees) and tilt10 (+-10) .mp4, each with its true
    points in a .npy beside it."""
    photo = cv2.imread(str(face.image))
    folder.mkdir(parents=True, exist_ok=True)
    n, tilt = round(seconds * FPS), round(TILT_SECONDS * FPS)
    walk = [dict(shift=(min(1.0, i / (n / 2)) * (FRAME[0] / 2 + FACE_SIDE), 0.0)) for i in range(n)]
    for name, poses, cover_from in (("still", [{}] * n, None), ("moving", moving_path(n), None),
                                    ("covered", [{}] * n, n // 3), ("leaving", walk, None),
                                    ("tilting", tilt_path(tilt, 90), None), ("tilt10", tilt_path(tilt, 10), None)):
        np.save(folder / f"{name}.npy", write_clip(folder / f"{name}.mp4", photo, face, poses, rng, cover_from))


def write_pair_clip(path: Path, faces: list[Face], seconds: float, rng: np.random.Generator) -> None:
    """Two faces side by side, each swaying on its own, for the frames/s of two faces."""
    photos = [cv2.imread(str(face.image)) for face in faces]
    noise = [rng.normal(0, NOISE, (*FRAME[::-1], 3)) for _ in range(30)]  # cycled: drawing it is the slow part
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, FRAME)
    for i in range(round(seconds * FPS)):
        u = i / FPS
        frame = None
        for side, photo, face in zip((-1, 1), photos, faces):
            matrix = face_matrix(face, shift=(side * 150 + 30 * math.sin(u + side), 20 * math.sin(1.3 * u)),
                                 angle=10 * math.sin(0.7 * u + side))
            warped = warp(photo, matrix)
            if frame is None:
                frame = warped
            else:  # the right half from the second face
                frame[:, FRAME[0] // 2:] = warped[:, FRAME[0] // 2:]
        writer.write(np.clip(frame + noise[i % len(noise)], 0, 255).astype(np.uint8))
    writer.release()


def make_long_clip(path: Path, face: Face, minutes: float, rng: np.random.Generator) -> None:
    """One face on the moving path, looped for `minutes`."""
    photo = cv2.imread(str(face.image))
    poses = moving_path(round(3 * FPS))  # the path's period: 3 s
    noise = [rng.normal(0, NOISE, (*FRAME[::-1], 3)) for _ in range(30)]
    warped = [warp(photo, face_matrix(face, **pose)) for pose in poses]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, FRAME)
    for i in range(round(minutes * 60 * FPS)):
        writer.write(np.clip(warped[i % len(warped)] + noise[i % len(noise)], 0, 255).astype(np.uint8))
    writer.release()


def run_face(args: argparse.Namespace, folder: Path) -> dict:
    """predict.py --no-smooth on each clip (JSON in folder/raw), and once smoothed on the moving clip, timed
    end to end; what the lost checks read on the face and where it was covered."""
    for name in CLIPS:
        run_predict(args, folder / f"{name}.mp4", smooth=False)
    timed = run_predict(args, folder / "moving.mp4", smooth=True)
    # The tracker frames faces and scales its filter by the weights' box relation: so does everything here.
    relation = args.config.markup.box_relation
    replayed = face_points(video.read_video_results(folder / "raw" / "moving.jsonl"), smoothing_of(args), relation)
    # The filter replayed on the raw JSON is the filter the tracker ran: scores below rest on that.
    assert np.allclose(face_points(video.read_video_results(timed.results)), replayed, atol=0.05, equal_nan=True)
    moving, covered = np.load(folder / "moving.npy"), np.load(folder / "covered.npy")
    covered_from = len(covered) // 3 + 5
    drift_face, score_face = checks_on(args, folder / "moving.mp4", [box_from_points(p, relation) for p in moving])
    drift_covered, score_covered = checks_on(args, folder / "covered.mp4",
                                             [box_from_points(p, relation) for p in covered])
    return {"fps": timed.frames / timed.seconds, "detector_runs": timed.detector_runs,
            "frames": timed.frames, "box_relation": list(relation),
            "drift_face": drift_face.tolist(), "drift_covered": drift_covered[covered_from:].tolist(),
            "score_face": score_face.tolist(), "score_covered": score_covered[covered_from:].tolist()}


def time_command(args: argparse.Namespace, clip: Path) -> dict:
    """`python predict.py --video clip` as a user runs it, start-up included."""
    command = [sys.executable, "predict.py", "--weights", args.weights, "--video", str(clip), "--out-dir",
               str(clip.parent / "command"), "--detector", args.detector, "--lost-by", args.lost_by]
    command += ["--eager"] * args.eager + ["--no-int8"] * args.no_int8 + ["--precision", args.precision, "--device",
                                                                            args.device]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).resolve().parent)
    seconds = time.perf_counter() - start
    frames = len(video.read_video_results(clip.parent / "command" / f"{clip.stem}.jsonl")["frames"])
    return {"command": " ".join(command[1:]), "frames": frames, "seconds": seconds, "fps": frames / seconds}


def score_face(folder: Path, smoothing: dict, relation: BoxRelation = DLIB_RELATION) -> dict:
    """Jitter, NME and lag, raw and smoothed, and frames with points after the face was covered or left."""
    def raw(name: str) -> dict:
        return video.read_video_results(folder / "raw" / f"{name}.jsonl")

    row = {}
    for key, smooth in (("raw", None), ("smooth", smoothing)):
        still, still_truth = face_points(raw("still"), smooth, relation), np.load(folder / "still.npy")
        moving, moving_truth = face_points(raw("moving"), smooth, relation), np.load(folder / "moving.npy")
        found = ~np.isnan(moving[:, 0, 0])
        row[f"jitter_{key}"] = jitter(still, still_truth)
        row[f"nme_{key}"] = float(nme(moving[found], moving_truth[found]).mean())
        row[f"found_{key}"] = float(found.mean())
        row[f"lag_{key}_frames"] = lag_frames(moving, moving_truth)
    for name in ("tilting", "tilt10"):
        points, truth = face_points(raw(name), smoothing, relation), np.load(folder / f"{name}.npy")
        found = ~np.isnan(points[:, 0, 0])
        row[f"found_{name}"] = float(found.mean())
        row[f"nme_{name}"] = float(nme(points[found], truth[found]).mean())
    covered, walk = face_points(raw("covered")), np.load(folder / "leaving.npy")
    gone = next(i for i, p in enumerate(walk) if tracking.visible_share(box_from_points(p), *FRAME) < tracking.MIN_VISIBLE)
    row["frames_shown_after_covered"] = int((~np.isnan(covered[len(covered) // 3 + 5:, 0, 0])).sum())
    row["frames_shown_after_leaving"] = int((~np.isnan(face_points(raw("leaving"))[gone:, 0, 0])).sum())
    return row


def read_faces(xml_path: Path) -> list[Face]:
    """load_faces' faces in its order, without decoding every image to check it (a minute on this CPU, for
    the few faces used here; their photos are decoded when the clips are made)."""
    faces = []
    for image in read_xml(xml_path).iter("image"):
        boxes = [b for b in image.findall("box") if b.get("ignore", "0") != "1"]
        faces += [parse_box(b, xml_path.parent / image.get("file", ""), i, (math.inf, math.inf))
                  for i, b in enumerate(boxes)]
    return faces


def pick_faces(args: argparse.Namespace, n: int) -> list[Face]:
    """The first n faces, by a seeded shuffle, of the weights' validation split that are at least
    FACE_SIDE pixels wide, so the clips never enlarge the photo."""
    faces = read_faces(Path(args.data_dir) / args.xml)
    _, val = trained_split(len(faces), args.config)
    order = np.random.default_rng(0).permutation(val)
    picked = [faces[i] for i in order if faces[i].box.side >= FACE_SIDE][:n]
    if len(picked) < n:
        raise UsageError(f"{Path(args.data_dir) / args.xml}: {len(picked)} validation faces of the weights' split are "
                         f"at least {FACE_SIDE} px wide, and {n} are needed (--faces, and 2 for the pair)")
    return picked


def summarise(rows: list[dict]) -> dict:
    def spread_low(key: str) -> list[float]:
        values = np.concatenate([r[key] for r in rows])
        return [float(np.percentile(values, 1)), float(np.median(values)), float(values.min())]

    def spread_high(key: str) -> list[float]:
        values = np.concatenate([r[key] for r in rows])
        return [float(values.max()), float(np.median(values))]

    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if isinstance(rows[0][k], (int, float))}
    face_drift = np.concatenate([r["drift_face"] for r in rows])
    covered_drift = np.concatenate([r["drift_covered"] for r in rows])
    return {**mean, "jitter_cut": mean["jitter_raw"] / mean["jitter_smooth"],
            "nme_cost_pct": 100 * (mean["nme_smooth"] / mean["nme_raw"] - 1),
            "lag_added_ms": 1000 * (mean["lag_smooth_frames"] - mean["lag_raw_frames"]) / FPS,
            "drift_face_p50_p99_max": [float(np.percentile(face_drift, 50)), float(np.percentile(face_drift, 99)),
                                       float(face_drift.max())],
            "drift_covered_min_p50": [float(covered_drift.min()), float(np.percentile(covered_drift, 50))],
            "score_face_p1_p50_min": spread_low("score_face"), "score_covered_max_p50": spread_high("score_covered"),
            "tilt_nme_ratio": mean["nme_tilting"] / mean["nme_tilt10"]}


def main(args: argparse.Namespace) -> dict:
    with one_line_errors():
        return bench(args)


def bench(args: argparse.Namespace) -> dict:
    if args.fit_box:
        return report_box_fit(load_faces(Path(args.data_dir) / args.xml, skip_bad=True))
    out = Path(args.out_dir)
    start = time.perf_counter()
    if args.rescore:
        folders = sorted(out.glob("face*"))
        if not (out / "runs.json").is_file() or not (out / "pair.json").is_file():
            raise UsageError(f"--rescore: {out} holds no earlier run (runs.json and pair.json); run without "
                             f"--rescore first")
        runs = json.loads((out / "runs.json").read_text())
        pair = json.loads((out / "pair.json").read_text())
    else:
        args.landmarker = Landmarker(LandmarkerOptions.from_flags(args))
        args.config = args.landmarker.config
        rng = np.random.default_rng(0)
        faces = pick_faces(args, max(args.faces, 2))
        if args.memory_minutes:
            return memory_run(args, faces[0], out, rng)
        folders = [out / f"face{i}" for i in range(args.faces)]
        for face, folder in zip(faces, folders):
            make_clips(face, folder, args.seconds, rng)
        runs = [run_face(args, folder) for folder in folders]
        pair = run_pair(args, faces[:2], out / "pair", rng)
        write_atomic(out / "runs.json", json.dumps(runs))
        write_atomic(out / "pair.json", json.dumps(pair))
    rows = [{**score_face(folder, smoothing_of(args), BoxRelation(*run.get("box_relation", DLIB_RELATION))), **run}
            for folder, run in zip(folders, runs)]
    summary = {**summarise(rows), **pair}
    report(args, summary, len(rows), time.perf_counter() - start)
    result = {"weights": args.weights, "detector": args.detector, "lost_by": args.lost_by,
              "smoothing": smoothing_of(args), "summary": summary, "faces": rows}
    if args.json:
        write_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


def run_pair(args: argparse.Namespace, faces: list[Face], folder: Path, rng: np.random.Generator) -> dict:
    """Frames/s with two faces: as the run reports it on a --seconds clip, and for the whole command on a
    --command-seconds one."""
    folder.mkdir(parents=True, exist_ok=True)
    write_pair_clip(folder / "two.mp4", faces, args.seconds, rng)
    timed = run_predict(args, folder / "two.mp4", smooth=True)
    pair = {"fps_two": timed.frames / timed.seconds,
            "ms_per_frame_by_step": {k: round(1000 * v / timed.frames, 2) for k, v in timed.spent.items()}}
    if args.command_seconds:
        write_pair_clip(folder / "command.mp4", faces, args.command_seconds, rng)
        pair["command"] = time_command(args, folder / "command.mp4")
    return pair


def resident_mb() -> float:
    """The process's resident memory now, from /proc on Linux; elsewhere its peak so far (ru_maxrss: KiB on
    Linux, bytes on macOS), which the clip made beforehand can dominate."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def memory_run(args: argparse.Namespace, face: Face, out: Path, rng: np.random.Generator) -> dict:
    """predict.py --video's run on a clip of --memory-minutes, the resident memory read after each minute."""
    out.mkdir(parents=True, exist_ok=True)
    clip = out / "long.mp4"
    make_long_clip(clip, face, args.memory_minutes, rng)
    tracker = args.landmarker.tracker(tracking.DETECT_EVERY, smoothing_of(args), args.lost_by)
    update, per_minute = tracker.update, []

    def sampled(gray, t, picture=None):
        faces = update(gray, t, picture)
        if tracker.frame % round(60 * FPS) == 0:
            per_minute.append(resident_mb())
            print(f"minute {len(per_minute)}: resident memory {per_minute[-1]:.1f} MB", flush=True)
        return faces

    tracker.update = sampled
    run = video.run_video(str(clip), tracker, out / "long", args.weights)
    result = {"minutes": args.memory_minutes, "frames": run.frames, "fps": run.frames / run.seconds,
              "resident_mb_per_minute": per_minute, "growth_mb": per_minute[-1] - per_minute[0]}
    print(f"resident memory after minute 1: {per_minute[0]:.1f} MB, after minute {len(per_minute)}: "
          f"{per_minute[-1]:.1f} MB ({result['growth_mb']:+.1f} MB); {result['fps']:.1f} frames/s")
    if args.json:
        write_atomic(Path(args.json), json.dumps(result, indent=2) + "\n")
    return result


def report(args: argparse.Namespace, summary: dict, faces: int, seconds: float) -> None:
    print(f"\n{faces} faces, clips of {args.seconds:g} s at {FRAME[0]}x{FRAME[1]}, {FPS:g} frames/s "
          f"({seconds:.0f} s in all), weights {args.weights}, detector {args.detector}, lost by {args.lost_by}, "
          f"smoothing {smoothing_of(args)}")
    print(f"still-face jitter: {summary['jitter_raw']:.3f}% raw, {summary['jitter_smooth']:.3f}% smoothed "
          f"({summary['jitter_cut']:.1f}x less)")
    print(f"moving-face NME: {summary['nme_raw']:.2f}% raw, {summary['nme_smooth']:.2f}% smoothed "
          f"({summary['nme_cost_pct']:+.1f}%); lag {summary['lag_raw_frames']:.2f} -> "
          f"{summary['lag_smooth_frames']:.2f} frames ({summary['lag_added_ms']:+.0f} ms added by smoothing); "
          f"face found on {100 * summary['found_raw']:.1f}% of frames")
    print(f"tilting to +-90 degrees over {TILT_SECONDS:g} s: found on {100 * summary['found_tilting']:.1f}% of "
          f"frames, NME {summary['nme_tilting']:.2f}%; to +-10: found on {100 * summary['found_tilt10']:.1f}%, "
          f"NME {summary['nme_tilt10']:.2f}% ({summary['tilt_nme_ratio']:.2f}x)")
    print(f"frames/s as the run reports it (read, track, landmarks, smooth, draw, write): one face "
          f"{summary['fps']:.1f} (moving clips), two faces {summary['fps_two']:.1f}; detector on "
          f"{summary['detector_runs']:.1f} of {summary['frames']:.0f} frames")
    if "ms_per_frame_by_step" in summary:
        print("two faces, ms per frame: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in
                                                      summary["ms_per_frame_by_step"].items())
              + " (the main thread decodes and tracks; a thread of its own writes the JSON, draws and encodes, "
                "at the same time)")
    if "command" in summary:
        command = summary["command"]
        print(f"whole command, start-up included, two faces: {command['frames']} frames in "
              f"{command['seconds']:.1f} s, {command['fps']:.1f} frames/s ({command['command']})")
    print(f"lost faces: points shown on {summary['frames_shown_after_covered']:.1f} frames after the face was "
          f"covered, {summary['frames_shown_after_leaving']:.1f} after it left the frame")
    p50, p99, top = summary["drift_face_p50_p99_max"]
    low, mid = summary["drift_covered_min_p50"]
    print(f"drift (lost when > {tracking.LOST_DRIFT:g}): on faces median {p50:.2f}, 99th percentile {p99:.2f}, "
          f"max {top:.2f}; where the face was covered min {low:.2f}, median {mid:.2f}")
    p1, p50, least = summary["score_face_p1_p50_min"]
    most, mid = summary["score_covered_max_p50"]
    print(f"mean point score (lost when < {tracking.LOST_SCORE:g}): on faces median {p50:.3f}, 1st percentile "
          f"{p1:.3f}, min {least:.3f}; where the face was covered max {most:.3f}, median {mid:.3f}")


if __name__ == "__main__":
    main(parse_args())
