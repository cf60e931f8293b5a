"""Pictures of predictions: a grid of validation faces, truth green and prediction red; landmarks on your own photos and videos (video.py tracks and smooths)."""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from dataset import Box, FaceLandmarksDataset, Markup, load_faces, number_in, out_file, out_folder, to_gray, trained_split
from faces import FacePrediction, detect_faces, load_detector, predict_faces
from model import RELEASED_WEIGHTS, Network, load_for_inference, pick_device
from transforms import Transforms
import video

MAX_UPSAMPLE = 4


def box_arg(text: str) -> Box:
    """--box left,top,width,height in image pixels."""
    try:
        box = Box(*(float(v) for v in text.split(",")))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected four numbers, left,top,width,height") from None
    if not all(map(math.isfinite, box)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected four finite numbers")
    if box.width <= 0 or box.height <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return box


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", help=f"weights from train.py (default: with --image, the project's released "
                                           f"{RELEASED_WEIGHTS.relative_to(RELEASED_WEIGHTS.parent.parent)}; "
                                           f"for the validation grid, runs/best.pt)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: auto)")
    parser.add_argument("--eager", action="store_true",
                        help="run the network as loaded, not traced and fused for the CPU (same points, slower)")
    grid = parser.add_argument_group("validation grid (without --image)")
    grid.add_argument("--n", type=number_in(int, 1), default=8, help="validation faces to show (default: 8)")
    grid.add_argument("--data-dir", help="dataset folder (default: the one the weights were trained on)")
    grid.add_argument("--out", type=out_file, default="predictions.png",
                      help="PNG to write (default: predictions.png)")
    photos = parser.add_argument_group("your own photos")
    photos.add_argument("--image", nargs="+", metavar="PATH",
                        help="image files, or folders of them; each face found gets the weights' points (68 for "
                             "the released ones)")
    photos.add_argument("--out-dir", type=out_folder, default="predictions",
                        help="folder for one annotated PNG per image and predictions.json, or for the video's "
                             "<name>_landmarks.mp4 and <name>.json (default: predictions)")
    photos.add_argument("--box", type=box_arg, metavar="L,T,W,H",
                        help="use this face box in every image instead of detecting faces")
    # dlib refuses negative upsampling with a traceback; each step quadruples the pixels it scans.
    photos.add_argument("--upsample", type=number_in(int, 0, MAX_UPSAMPLE), default=1,
                        help="times the detector doubles the image first; more finds smaller faces, slower "
                             "(default: 1)")
    clips = parser.add_argument_group("video (also takes --out-dir and --upsample)")
    clips.add_argument("--video", metavar="PATH|N",
                       help="a video file, or camera number N; faces are tracked and their points smoothed")
    clips.add_argument("--detect-every", type=number_in(int, 1), default=video.DETECT_EVERY, metavar="K",
                       help="run the detector every K frames; between, each face's box follows its points, and "
                            f"a lost face is looked for at once (default: {video.DETECT_EVERY})")
    clips.add_argument("--no-smooth", action="store_true", help="raw points: no One Euro filter")
    clips.add_argument("--smooth-min-cutoff", type=number_in(float, 0, low_open=True), default=video.MIN_CUTOFF, metavar="HZ",
                       help=f"One Euro cutoff of a still face; lower is steadier (default: {video.MIN_CUTOFF:g})")
    clips.add_argument("--smooth-beta", type=number_in(float, 0), default=video.BETA,
                       help="how fast the cutoff rises with the speed, in face box sides per second; higher lags "
                            f"less (default: {video.BETA:g})")
    clips.add_argument("--smooth-d-cutoff", type=number_in(float, 0, low_open=True), default=video.D_CUTOFF, metavar="HZ",
                       help=f"cutoff of the speed estimate (default: {video.D_CUTOFF:g})")
    args = parser.parse_args(argv)
    if args.video is not None and (args.image or args.box):
        parser.error("--video takes neither --image nor --box")
    return args


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
    show_or_close(fig)


def plot_validation(model: Network, config: dict, args: argparse.Namespace, device: torch.device) -> None:
    data_dir = Path(args.data_dir or config.get("data_dir", "data"))
    markup = Markup.from_config(config)
    faces = load_faces(data_dir / config.get("xml", "labels_ibug_300W_train.xml"), config.get("skip_bad", False),
                       markup=lambda k: markup)
    _, val_idx = trained_split(len(faces), config)
    dataset = FaceLandmarksDataset(faces, Transforms(config.get("img_size", 224), train=False),
                                   val_idx[:args.n])
    images, targets = map(torch.stack, zip(*(dataset[i] for i in range(len(dataset)))))
    with torch.inference_mode():
        pred = model(images.to(device)).float().cpu().numpy()
    plot_grid(images, targets.numpy().reshape(len(images), -1, 2), pred.reshape(len(images), -1, 2), Path(args.out))


# ---------------------------------------------------------------- the user's own photos

def image_files(paths: list[str]) -> list[Path]:
    """Files as given; folders -> the files inside that PIL can open, by name. Missing paths stay, to be reported."""
    Image.init()
    suffixes = set(Image.registered_extensions())
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        else:
            files.append(path)
    return files


def read_photo(path: Path) -> Image.Image:
    """The photo upright (EXIF orientation applied), in its own mode; ValueError with one line if unreadable."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image)  # a decoded copy, so truncated files fail here
    except FileNotFoundError:
        raise ValueError(f"{path}: image not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def draw_predictions(photo: Image.Image, gray: Image.Image, faces: list[FacePrediction], path: Path) -> None:
    """Boxes yellow, points red, on the photo in colour where RGB conversion keeps it faithful."""
    # 16-bit and float modes would clip and transparent ones turn black: those are drawn on their grayscale.
    faithful = photo.mode in ("RGB", "L", "CMYK", "YCbCr", "P") and "transparency" not in photo.info
    canvas = photo.convert("RGB") if faithful else gray.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for face in faces:
        box, r = face.box, max(1.5, face.box.side / 90)
        draw.rectangle([box.left, box.top, box.left + box.width - 1, box.top + box.height - 1],
                       outline=(255, 220, 0), width=max(1, round(r / 2)))
        for x, y in face.points:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 40, 40))
    canvas.save(path)


def png_name(path: Path, taken: set[str]) -> str:
    """<stem>_landmarks.png, numbered when two inputs share a stem (a.jpg and a.png, or two folders)."""
    name, k = f"{path.stem}_landmarks.png", 1
    while name in taken:
        k += 1
        name = f"{path.stem}_landmarks-{k}.png"
    taken.add(name)
    return name


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def face_record(face: FacePrediction) -> dict:
    return {"box": [round(float(v), 2) for v in face.box],
            "points": np.round(face.points.astype(np.float64), 2).tolist()}


def predict_photos(model: Network, config: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Landmarks on every image of --image: annotated PNGs and one predictions.json in --out-dir.

    A file that cannot be read costs one line and a non-zero exit at the end, not the rest of the run.
    """
    files = image_files(args.image)
    if not files:
        raise SystemExit(f"{' '.join(args.image)}: no image files found")
    detector = None if args.box else load_detector()
    transform = Transforms(config.get("img_size", 224), train=False)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, taken, unreadable = [], set(), 0
    started, detecting, landmarking = time.perf_counter(), 0.0, 0.0  # where the time goes, for the summary
    for path in files:
        try:
            photo = read_photo(path)
        except ValueError as e:
            print(e, file=sys.stderr)
            records.append({"image": str(path), "error": str(e), "faces": []})
            unreadable += 1
            continue
        gray = to_gray(photo)
        tick = time.perf_counter()
        boxes = [args.box] if args.box else detect_faces(detector, gray, args.upsample)
        tock = time.perf_counter()
        faces = predict_faces(model, transform, gray, boxes, device)
        detecting, landmarking = detecting + tock - tick, landmarking + time.perf_counter() - tock
        png = out_dir / png_name(path, taken)
        draw_predictions(photo, gray, faces, png)
        records.append({"image": str(path), "width": photo.width, "height": photo.height,
                        "annotated": str(png), "faces": [face_record(f) for f in faces]})
        found = plural(len(faces), "face") if faces else "no face found (try --upsample 2, or give one with --box)"
        print(f"{path}: {found} -> {png}")
    result = {"weights": str(args.weights), "images": records}
    (out_dir / "predictions.json").write_text(json.dumps(result))
    n_faces = sum(len(r["faces"]) for r in records)
    seconds = time.perf_counter() - started
    print(f"wrote {out_dir / 'predictions.json'}: {plural(len(records), 'image')}, {plural(n_faces, 'face')}"
          + (f", {unreadable} unreadable" if unreadable else ""))
    print(f"{len(records) / seconds:.1f} images/s: face detector {100 * detecting / seconds:.0f}% of the time, "
          f"landmarks {100 * landmarking / seconds:.0f}%, reading, drawing and writing the rest")
    if unreadable:
        raise SystemExit(1)  # each file was already named on its own line
    return result


def predict_video(model: Network, config: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Landmarks on every frame of --video: the annotated MP4 and its JSON in --out-dir (video.py does it)."""
    smoothing = None if args.no_smooth else dict(min_cutoff=args.smooth_min_cutoff, beta=args.smooth_beta,
                                                 d_cutoff=args.smooth_d_cutoff)
    tracker = video.video_tracker(model, config, device, load_detector(), args.upsample, args.detect_every,
                                  smoothing)
    run = video.run_video(args.video, tracker, Path(args.out_dir), str(args.weights),
                          show=args.video.isdigit() and has_display())
    if run.missing:
        raise SystemExit(f"{args.video}: truncated: {run.missing} of its frames could not be read "
                         f"(the {len(run.record['frames'])} before were written)")
    if run.interrupted and not args.video.isdigit():
        raise SystemExit(130)  # as train.py: the files hold what was done, the exit code says it was cut short
    return run.record


def main(args: argparse.Namespace) -> dict | None:
    device = pick_device(args.device)
    args.weights = args.weights or (RELEASED_WEIGHTS if args.image or args.video is not None else "runs/best.pt")
    if args.weights == RELEASED_WEIGHTS and not RELEASED_WEIGHTS.is_file():
        raise SystemExit(f"{RELEASED_WEIGHTS}: the project's weights are not in this checkout yet; train with "
                         f"`python train.py --recipe best --out runs/best` and pass --weights runs/best/best.pt")
    model, config = load_for_inference(args.weights, device, args.eager)
    if args.video is not None:
        return predict_video(model, config, args, device)
    if args.image:
        return predict_photos(model, config, args, device)
    plot_validation(model, config, args, device)
    return None


if __name__ == "__main__":
    main(parse_args())
