"""A small demo dataset in dlib's layout: drawn faces with iBUG's 68 points, or dlib's 5 or a WFLW-like 98 built from them, so everything runs without the 1.7 GB download."""
import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flags import SEED_MAX, number_in, one_line_errors, out_folder
from labels import TEST_XML, TRAIN_XML, write_xml
from landmarks import IBUG, LEFT_EYE_OUTER, NUM_LANDMARKS, RIGHT_EYE_OUTER, Box

def template_shape() -> np.ndarray:
    """A symmetric 68-point face in the iBUG order, about 1 wide, centred on the nose."""
    t = np.linspace(0, np.pi, 17)
    jaw = np.stack([-0.5 * np.cos(t), 0.05 + 0.5 * np.sin(t)], 1)
    u = np.linspace(0, 1, 5)
    left_brow = np.stack([-0.42 + 0.32 * u, -0.25 - 0.06 * np.sin(np.pi * u)], 1)
    right_brow = left_brow[::-1] * [-1, 1]
    bridge = np.stack([np.zeros(4), np.linspace(-0.15, 0.1, 4)], 1)
    nostrils = np.stack([np.linspace(-0.1, 0.1, 5), 0.17 + 0.03 * np.sin(np.pi * u)], 1)

    def eye(cx):
        rx, ry, cy = 0.09, 0.04, -0.1
        return np.array([[cx - rx, cy], [cx - rx / 3, cy - ry], [cx + rx / 3, cy - ry],
                         [cx + rx, cy], [cx + rx / 3, cy + ry], [cx - rx / 3, cy + ry]])

    def lips(n, rx, ry):
        phi = np.pi - np.arange(n) * 2 * np.pi / n
        return np.stack([rx * np.cos(phi), 0.32 - ry * np.sin(phi)], 1)

    return np.concatenate([jaw, left_brow, right_brow, bridge, nostrils, eye(-0.22), eye(0.22),
                           lips(12, 0.2, 0.08), lips(8, 0.12, 0.03)]).astype(np.float32)


FACE_STROKES = [range(0, 17), range(17, 22), range(22, 27), range(27, 31), range(31, 36),
                [*range(36, 42), 36], [*range(42, 48), 42], [*range(48, 60), 48], [*range(60, 68), 60]]


def draw_face(draw: ImageDraw.ImageDraw, points: np.ndarray, rng: random.Random) -> None:
    """A cartoon face whose strokes run through the landmarks, so a network can learn to find them."""
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    pad = 0.15 * (x1 - x0)
    draw.ellipse([x0 - pad / 2, y0 - 2 * pad, x1 + pad / 2, y1 + pad / 3], fill=rng.randint(150, 230))
    ink, width = rng.randint(0, 70), max(1, round((x1 - x0) / 40))
    for stroke in FACE_STROKES:
        draw.line([tuple(points[i]) for i in stroke], fill=ink, width=width)


# dlib's 5-point markup, from the 68: both corners of each eye (left to right in the picture) and the bottom
# of the nose. Its twins are (0, 3) and (1, 2), and its outer eye corners 0 and 3 normalise NME as for 68.
FIVE_FROM_68 = [36, 39, 42, 45, 33]


DEMO_POINTS = (5, 68, 98)
# A demo shows that the pipeline runs; more images than this only fill the disk (a few KB each).
MAX_IMAGES = 10_000


def demo_weights(num_points: int) -> np.ndarray:
    """(K, 68): each demo point as a mix of the 68 iBUG points. 5: dlib's five; 68: iBUG's; 98: WFLW's
    layout (33 jaw, 9 per brow, 9 nose, 8 per eye, 20 lips, 2 pupils), with points between iBUG's."""
    eye = np.eye(NUM_LANDMARKS)
    if num_points == 5:
        return eye[FIVE_FROM_68]
    if num_points == NUM_LANDMARKS:
        return eye
    if num_points != 98:
        raise ValueError(f"demo markups have 5, 68 or 98 points, not {num_points}")
    mid = lambda i, j: (eye[i] + eye[j]) / 2  # noqa: E731
    jaw = [row for i in range(16) for row in (eye[i], mid(i, i + 1))] + [eye[16]]
    brow = [eye[i] for i in range(17, 22)] + [0.8 * mid(i, i + 1) + 0.2 * eye[37 if i < 19 else 38] for i in range(17, 21)]
    left_eye = [eye[36], eye[37], mid(37, 38), eye[38], eye[39], eye[40], mid(40, 41), eye[41]]
    mirror = np.array(IBUG.flip)
    twin = lambda rows: [row[mirror] for row in rows]  # noqa: E731  (the same point on the other half)
    rows = (jaw + brow + twin(brow) + [eye[i] for i in range(27, 36)] + left_eye + twin(left_eye)
            + [eye[i] for i in range(48, 68)] + [eye[36:42].mean(0), eye[42:48].mean(0)])
    return np.array(rows)


def demo_markup(num_points: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The demo markup's mirror pairs (found by mirroring its weights with iBUG's twins) and its outer eye
    corners (the points that are iBUG's 36 and 45)."""
    weights = demo_weights(num_points)
    mirrored = weights[:, np.argsort(IBUG.flip)]
    twins = [int(np.flatnonzero(np.abs(weights - row).sum(1) < 1e-9)[0]) for row in mirrored]
    pairs = [(i, j) for i, j in enumerate(twins) if i < j]
    corners = tuple(int(np.flatnonzero(weights[:, k] == 1)[0]) for k in (LEFT_EYE_OUTER, RIGHT_EYE_OUTER))
    return pairs, corners


def make_demo(out: Path, n_images: int = 120, seed: int = 0, num_points: int = NUM_LANDMARKS) -> None:
    """Write a small dataset in dlib's layout: JPEGs of drawn faces plus train and test XMLs, with the 68
    iBUG points or another demo markup of them (demo_weights); beside them, for other markups, the mirror
    pairs in flip_pairs.json.

    Every fifth image holds two faces. Test images are spread over dlib's subset folders.
    """
    out, rng = Path(out), random.Random(seed)
    template, weights = template_shape(), demo_weights(num_points)
    sets = {TRAIN_XML: ["helen/trainset", "afw"], TEST_XML: ["helen/testset", "lfpw/testset", "ibug"]}
    for xml_name, folders in sets.items():
        n = n_images if xml_name == TRAIN_XML else max(6, n_images // 4)
        images = []
        for k in range(n):
            folder = folders[k % len(folders)]
            n_faces = 2 if k % 5 == 4 else 1
            width, height = 200 * n_faces + rng.randint(0, 60), 220 + rng.randint(0, 60)
            image = Image.new("L", (width, height), rng.randint(0, 255))
            draw = ImageDraw.Draw(image)
            faces = []
            for f in range(n_faces):
                size = rng.uniform(90, 140)
                angle = math.radians(rng.uniform(-15, 15))
                rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
                center = np.array([100 + 200 * f + rng.uniform(-10, 10), height / 2 + rng.uniform(-10, 10)])
                shape = template + np.array([rng.gauss(0, 0.01) for _ in range(2 * NUM_LANDMARKS)]).reshape(-1, 2)
                points = (shape * size) @ rotation.T + center
                draw_face(draw, points, rng)
                # Like dlib's detector: a square that misses some of the jaw.
                side = size * rng.uniform(0.75, 0.85)
                faces.append((Box(center[0] - side / 2, center[1] - side * 0.45, side, side), weights @ points))
            images.append((f"{folder}/{k:04d}.jpg", faces))
            (out / folder).mkdir(parents=True, exist_ok=True)
            image.save(out / folder / f"{k:04d}.jpg", quality=90)
        write_xml(out / xml_name, images, "demo faces", shuffle=rng)
    extra = ""
    if num_points != NUM_LANDMARKS:
        pairs, corners = demo_markup(num_points)
        (out / "flip_pairs.json").write_text(json.dumps(pairs) + "\n")
        extra = (f"; {num_points} points: train with --flip-pairs {out / 'flip_pairs.json'} "
                 f"--nme-points {corners[0]},{corners[1]} (the outer eye corners)")
    print(f"wrote a demo dataset to {out}/ ({TRAIN_XML}, {TEST_XML}){extra}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=out_folder, metavar="DIR", help="folder to write the demo dataset into")
    parser.add_argument("--points", type=int, choices=DEMO_POINTS, default=NUM_LANDMARKS,
                        help=f"the markup, {DEMO_POINTS} points (default: {NUM_LANDMARKS})")
    parser.add_argument("--images", type=number_in(int, 1, MAX_IMAGES), default=120,
                        help=f"training images, 1 to {MAX_IMAGES} (default: 120)")
    parser.add_argument("--seed", type=number_in(int, 0, SEED_MAX), default=0, help="random seed (default: 0)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    with one_line_errors():
        make_demo(Path(args.out), args.images, args.seed, args.points)


if __name__ == "__main__":
    main(parse_args())
