"""Pictures of predictions: a grid of validation faces, truth green and prediction red; landmarks on your own photos and videos (video.py tracks and smooths)."""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tracking
import video
from checkpoints import RELEASED_WEIGHTS, NetworkConfig, load_for_inference
from dataset import FaceLandmarksDataset, trained_split
from detectors import DETECTORS, HOG_UPSAMPLE, any_roll_problem
from errors import DataError, UsageError
from faces import Landmarker, LandmarkerOptions
from files import save_figure
from flags import WORKERS_MAX, box_arg, figure_file, number_in, one_line_errors, out_folder
from labels import load_faces
from archive import RayEngine
from photos import (DEFAULT_OUT, PARQUET_PHOTOS, RESULTS, JsonRecords, ParquetRecords, PhotoSettings, Tally,
                    default_folder, drawn_names, landmark_photos, parse_shard, photo_files, plural, results_of, shard)
from runtime import Network, pick_device
from transforms import Transforms

MAX_UPSAMPLE = 4
DEFAULT_WORKERS = min(os.cpu_count() or 1, WORKERS_MAX)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", help=f"weights from train.py (default: with --image, the project's released "
                                           f"{RELEASED_WEIGHTS.relative_to(RELEASED_WEIGHTS.parent.parent)}; "
                                           f"for the validation grid, runs/best.pt)")
    LandmarkerOptions.add_network_flags(parser)
    grid = parser.add_argument_group("validation grid (without --image)")
    grid.add_argument("--n", type=number_in(int, 1), default=8, help="validation faces to show (default: 8)")
    grid.add_argument("--data-dir", help="dataset folder (default: the one the weights were trained on)")
    grid.add_argument("--out", type=figure_file, default="predictions.png",
                      help="picture to write: .png, .jpg, .pdf or .svg (default: predictions.png)")
    add_photo_flags(parser.add_argument_group("your own photos"))
    add_video_flags(parser.add_argument_group("video (also takes --out-dir, --detector, --any-roll and --upsample)"))
    args = parser.parse_args(argv)
    if args.video is not None and (args.image or args.box):
        parser.error("--video takes neither --image nor --box")
    if problem := any_roll_problem(args.detector, args.any_roll, flags=True):
        parser.error(problem)
    if args.shard is not None:
        try:
            parse_shard(args.shard)
        except UsageError as e:
            parser.error(str(e))
    if args.ray_address is not None and args.engine != "ray":
        parser.error("--ray-address goes with --engine ray")
    if args.video is not None and (args.engine != "local" or args.format != "jsonl"):
        parser.error("--video writes JSON lines on this machine: --engine and --format are for --image")
    return args


def add_photo_flags(photos) -> None:
    photos.add_argument("--image", nargs="+", metavar="PATH",
                        help="image files, or folders of them; each face found gets the weights' points (68 for "
                             "the released ones)")
    photos.add_argument("--out-dir", type=out_folder,
                        help=f"folder for {RESULTS} (a JSON line per image, then a summary line) and one "
                             "annotated picture per image, or for the video's <name>.jsonl and <name>_landmarks.mp4 "
                             f"(default: {DEFAULT_OUT}; for photos the first of {DEFAULT_OUT}, {DEFAULT_OUT}-2, ... "
                             "that holds no other run's results, or with --resume the last that does)")
    photos.add_argument("--detector", choices=DETECTORS, default="yunet",
                        help="yunet: OpenCV's YuNet, fast, finds tilted faces (default); hog: dlib's HOG, whose "
                             "boxes the 300-W labels use, upright faces only")
    photos.add_argument("--any-roll", action="store_true",
                        help="with yunet: also look at the photo turned by 90, 180 and 270 degrees, to find faces "
                             "at any roll (about 3.5x the detector's time), and look at a face the network doubts each eighth "
                             "turn")
    photos.add_argument("--passes", type=int, choices=[1, 2],
                        help="2: look again at each face, on the crop levelled and framed by the first look's "
                             "points (default: 2 where it pays: with --any-roll, --detector hog or --box; 1 on YuNet's "
                             "upright faces)")
    photos.add_argument("--box", type=box_arg, metavar="L,T,W,H",
                        help="use this face box in every image instead of detecting faces")
    # dlib refuses negative upsampling with a traceback; each step quadruples the pixels it scans.
    photos.add_argument("--upsample", type=number_in(int, 0, MAX_UPSAMPLE), default=HOG_UPSAMPLE,
                        help="with hog: times it doubles the image first; more finds smaller faces, slower "
                             "(default: 1)")
    photos.add_argument("--no-draw", action="store_true",
                        help="write only the JSON lines: no annotated pictures, and for --video no MP4")
    photos.add_argument("--workers", type=number_in(int, 1, WORKERS_MAX),
                        help=f"processes that share the photos, one thread each (default: all {DEFAULT_WORKERS} "
                             f"cores, at most {WORKERS_MAX}; with --engine ray: all the cluster's)")
    photos.add_argument("--recursive", action="store_true", help="also take the photos in folders below")
    photos.add_argument("--shard", metavar="K/N",
                        help="take every N-th photo from the K-th (0-based, as a cluster's array index), into "
                             "predictions.shard-K-of-N.jsonl; the shards' files join by concatenation")
    photos.add_argument("--resume", action="store_true",
                        help="continue a cut-short run in --out-dir, skipping the photos its results hold")
    photos.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl",
                        help=f"jsonl: {RESULTS}, a line per photo (default); parquet: predictions-00000.parquet "
                             f"and on, a row per face, every {PARQUET_PHOTOS} photos (pyarrow; for large archives)")
    photos.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: --workers processes on this machine (default); ray: an actor pool on Ray, on "
                             "this machine or a cluster (docs/scale.md)")
    photos.add_argument("--ray-address", metavar="ADDRESS",
                        help="with --engine ray: the cluster to join (default: the one running on this machine, "
                             "else a local Ray started for the run)")


def add_video_flags(clips) -> None:
    clips.add_argument("--video", metavar="PATH|N",
                       help="a video file, or camera number N; faces are tracked and their points smoothed")
    clips.add_argument("--detect-every", type=number_in(int, 1), default=tracking.DETECT_EVERY, metavar="K",
                       help="run the detector every K frames; between, each face's box follows its points, and "
                            f"a lost face is looked for at once (default: {tracking.DETECT_EVERY})")
    clips.add_argument("--lost-by", choices=tracking.LOST_CHECKS, default=tracking.LOST_BY,
                       help="how a face that went is noticed: score, one crop per face, lost when its point scores "
                            "fall; drift, two crops per face, lost when its points follow the crop (a regression "
                            f"head, which has no scores, always uses drift) (default: {tracking.LOST_BY})")
    clips.add_argument("--no-smooth", action="store_true", help="raw points: no One Euro filter")
    clips.add_argument("--smooth-min-cutoff", type=number_in(float, 0, low_open=True), default=tracking.MIN_CUTOFF,
                       metavar="HZ", help=f"One Euro cutoff of a still face; lower is steadier "
                                          f"(default: {tracking.MIN_CUTOFF:g})")
    clips.add_argument("--smooth-beta", type=number_in(float, 0), default=tracking.BETA,
                       help="how fast the cutoff rises with the speed, in face box sides per second; higher lags "
                            f"less (default: {tracking.BETA:g})")
    clips.add_argument("--smooth-d-cutoff", type=number_in(float, 0, low_open=True), default=tracking.D_CUTOFF,
                       metavar="HZ", help=f"cutoff of the speed estimate (default: {tracking.D_CUTOFF:g})")


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.name == "nt")


def show_or_close(fig) -> None:
    """Show the figure where a display exists; headless runs only keep the PNG."""
    import matplotlib.pyplot as plt
    if has_display():
        plt.show()
    plt.close(fig)


def plot_grid(images: torch.Tensor, truth: np.ndarray, pred: np.ndarray, path: Path) -> None:
    import matplotlib
    if not has_display():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(images)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    size = images.shape[-1]
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(images[i, 0].numpy(), cmap="gray")
        for points, colour in ((truth[i], "g"), (pred[i], "r")):
            crop = (points + 0.5) * size - 0.5
            ax.scatter(crop[:, 0], crop[:, 1], s=4, c=colour)
    fig.tight_layout()
    save_figure(fig, path)
    print(f"wrote {path}")
    show_or_close(fig)


def plot_validation(model: Network, config: NetworkConfig, args: argparse.Namespace, device: torch.device) -> None:
    data_dir = Path(args.data_dir or config.data_dir)
    markup = config.markup
    faces = load_faces(data_dir / config.xml, config.skip_bad, markup_of=lambda k: markup)
    _, val_idx = trained_split(len(faces), config)
    dataset = FaceLandmarksDataset(faces, Transforms(config.img_size, train=False),
                                   val_idx[:args.n])
    images, targets = map(torch.stack, zip(*(dataset[i] for i in range(len(dataset)))))
    with torch.inference_mode():
        pred = model(images.to(device)).float().cpu().numpy()
    plot_grid(images, targets.numpy().reshape(len(images), -1, 2), pred.reshape(len(images), -1, 2), Path(args.out))


# ---------------------------------------------------------------- the user's own photos

def predict_photos(args: argparse.Namespace) -> dict:
    """Landmarks on every image of --image: one JSON line per photo in --out-dir as it is done (and an
    annotated picture unless --no-draw), then a summary line. A file that cannot be read costs one line and a
    non-zero exit at the end, not the rest of the run; Ctrl-C keeps every line written. A path that is not
    there stops the run before any folder is made."""
    missing = [path for path in args.image if not Path(path).exists()]
    if missing:
        raise DataError(f"{missing[0]}: no such file or folder" + (f" (nor {len(missing) - 1} more of --image)"
                                                                   if len(missing) > 1 else ""))
    files, skipped = photo_files(args.image, args.recursive)
    if skipped:
        print(f"note: not taken: {', '.join(plural(n, kind) for kind, n in skipped.items())}", file=sys.stderr)
    if not files:
        raise DataError(f"{' '.join(args.image)}: no image files found")
    names, files = drawn_names(files), shard(files, args.shard)
    out_dir = photo_folder(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = results_of(out_dir, args.shard, args.format == "parquet")
    done = continue_or_refuse(records, args.resume)
    todo = [f for f in files if str(f) not in done]
    settings = PhotoSettings(LandmarkerOptions.from_flags(args), args.box, not args.no_draw, str(out_dir))
    tally, started, engine = Tally(), time.perf_counter(), None
    try:
        if args.engine == "ray" and todo:
            engine = RayEngine(settings, args.ray_address, args.workers)
            workers, found = engine.workers, engine.photos(todo, names)
        else:
            workers = worker_count(args.workers or DEFAULT_WORKERS, len(todo))
            found = landmark_photos(todo, names, settings, workers)
        for record, seconds in found:
            if record["image"] in done:  # a batch Ray ran again after its worker died: written once
                continue
            done.add(record["image"])
            records.add(record)  # photo by photo: a crash or Ctrl-C keeps every photo done so far
            tally.add(record, seconds)
            report_photo(record, args)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {records.where} holds the {len(done)} photos done; finish them with the same "
              f"command and --resume", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if engine is not None:
            engine.close()
        records.keep()  # Parquet rows held back: written, whatever ended the loop
    total = tally.summary(time.perf_counter() - started) | {"weights": str(args.weights), "engine": args.engine,
                                                            "workers": workers}
    records.close(total)
    print_summary(records.where, total, len(files) - len(todo))
    if total["unreadable"]:
        raise SystemExit(1)  # each file was already named on its own line
    return total


def photo_folder(args: argparse.Namespace) -> Path:
    """--out-dir as given, or photos.default_folder's, said on stderr when not the first."""
    if args.out_dir is not None:
        return Path(args.out_dir)
    chosen = default_folder(args.shard, args.format == "parquet", args.resume)
    if chosen != Path(DEFAULT_OUT):
        which = "the last earlier run of this kind" if args.resume else "the first folder free of earlier runs"
        print(f"writing to {chosen}/ ({which}; --out-dir names another)", file=sys.stderr)
    return chosen


def worker_count(asked: int, photos: int) -> int:
    """The processes to start: as asked, but never more than the cores (more only slow each other: 64 on 2 cores
    ran at a quarter of the speed) nor than the photos there are; a cut to the cores is said."""
    cores = os.cpu_count() or 1
    if asked > cores:
        print(f"note: --workers {asked} on {cores} cores: running {cores} (more processes than cores only slow "
              f"each other)", file=sys.stderr)
    return max(1, min(asked, cores, photos))


def continue_or_refuse(records: JsonRecords | ParquetRecords, resume: bool) -> set[str]:
    """The photos already done by the run --resume continues; another run's results are never overwritten."""
    if not records.exists():
        return set()
    if not resume:
        raise UsageError(f"{records.where}: another run's results are there; pass --resume to continue that run, "
                         f"or another --out-dir")
    return records.done()


def report_photo(record: dict, args: argparse.Namespace) -> None:
    if "error" in record:
        print(record["error"], file=sys.stderr)
        return
    faces = record["faces"]
    hint = "try --any-roll, or give one with --box" if args.detector == "yunet" else "try --upsample 2"
    found = plural(len(faces), "face") if faces else f"no face found ({hint})"
    print(f"{record['image']}: {found}" + (f" -> {record['annotated']}" if "annotated" in record else ""))


def print_summary(results: Path, total: dict, before: int) -> None:
    """What was written, how fast, and where each process's time went: its start (the network built, or loaded
    from the cache), reading, the detector, the landmarks and the drawing; the rest is writing and waiting."""
    seconds, steps = total["seconds"], total["seconds_by_step"]
    share = {k: 100 * v / max(seconds, 1e-9) / max(1, total.get("workers", 1)) for k, v in steps.items()}
    print(f"wrote {results}: {plural(total['images'], 'image')}, {plural(total['faces'], 'face')}"
          + (f", {total['unreadable']} unreadable" if total["unreadable"] else "")
          + (f" (after the {before} an earlier run did)" if before else ""))
    named = {"start": "start-up", "decode": "reading", "detect": "face detector", "landmarks": "landmarks",
             "draw": "drawing"}
    parts = ", ".join(f"{word} {share.get(key, 0):.0f}%" for key, word in named.items())
    rest = max(0.0, 100 - sum(share.get(key, 0) for key in named))
    print(f"{total['images_per_s']:.1f} images/s ({total['steady_images_per_s']:.1f} once running); time in each "
          f"process: {parts}, writing and waiting {rest:.0f}%"
          + ("; --no-draw skips the drawing" if share.get("draw", 0) > 30 else ""))


def predict_video(args: argparse.Namespace) -> dict:
    """Landmarks on every frame of --video: its JSON Lines and, unless --no-draw, the annotated MP4 in --out-dir
    (video.py does it, with the Landmarker's network and detector)."""
    smoothing = None if args.no_smooth else dict(min_cutoff=args.smooth_min_cutoff, beta=args.smooth_beta,
                                                 d_cutoff=args.smooth_d_cutoff)
    landmarker = Landmarker(LandmarkerOptions.from_flags(args))
    tracker = landmarker.tracker(args.detect_every, smoothing, args.lost_by)
    run = video.run_video(args.video, tracker, Path(args.out_dir or DEFAULT_OUT), str(args.weights),
                          show=args.video.isdigit() and has_display(), draw=not args.no_draw)
    if run.missing:
        raise DataError(f"{args.video}: truncated: {run.missing} of its frames could not be read "
                        f"(the {run.frames} before were written)")
    if run.interrupted and not args.video.isdigit():
        raise SystemExit(130)  # as train.py: the files hold what was done, the exit code says it was cut short
    return {"results": str(run.results), "frames": run.frames, "faces": run.faces}


def main(args: argparse.Namespace) -> dict | None:
    with one_line_errors(flags={"source": "--video"}):
        return run(args)


def run(args: argparse.Namespace) -> dict | None:
    args.weights = args.weights or (RELEASED_WEIGHTS if args.image or args.video is not None else "runs/best.pt")
    if args.weights == RELEASED_WEIGHTS and not RELEASED_WEIGHTS.is_file():
        raise UsageError(f"{RELEASED_WEIGHTS}: the project's weights are not in this checkout yet; train with "
                         f"`python train.py --recipe best --out runs/best` and pass --weights runs/best/best.pt")
    if args.image:
        return predict_photos(args)
    if args.video is not None:
        return predict_video(args)
    device = pick_device(args.device)
    model, config = load_for_inference(args.weights, device, args.eager, not args.no_int8, args.precision)
    plot_validation(model, config, args, device)
    return None


if __name__ == "__main__":
    main(parse_args())
