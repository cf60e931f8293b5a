"""Fixtures and helpers that several sections of test_all.py share (it imports the helpers from here)."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

import checkpoints
import demo as demodata  # the module; `demo` is the fixture of demo data
import export
import labels
import landmarks
import network_cache
import photos
import predict
import train
from dataset import FaceLandmarksDataset
from demo import template_shape
from faces import Landmarker
from landmarks import NUM_LANDMARKS, Box, Face
from transforms import Transforms

HERE = Path(__file__).parent
# Small and fast: a ResNet18 at 64 px trains an epoch of the demo set in about a second.
FAST = ["--img-size", "64", "--batch-size", "16", "--lr", "1e-3", "--workers", "0"]
FLIP_PERMUTATION = list(landmarks.IBUG.flip)
ANY_BOX = "20,20,120,120"
RELEASED = pytest.mark.skipif(not checkpoints.RELEASED_WEIGHTS.is_file(), reason="no released weights")


# ---- scripts

def run_script(*args: str, cwd: Path = HERE, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def answer_ctrl_c() -> None:
    """Popen's preexec_fn for a run that a test stops with Ctrl-C: SIGINT at its default, as in a terminal's
    foreground job, so Python in the child raises KeyboardInterrupt. A shell that starts pytest in the
    background (`pytest … &`) has it ignored, and the child would inherit that and never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---- labels in dlib's XML

def write_xml(path: Path, images: list[tuple[str, list[str]]]) -> Path:
    """A dlib-layout XML from (image file, [box XML]) pairs."""
    body = "".join(f"<image file='{name}'>{''.join(boxes)}</image>" for name, boxes in images)
    path.write_text(f"<?xml version='1.0'?><dataset><images>{body}</images></dataset>")
    return path


def box_xml(points: np.ndarray, box=(10, 10, 50, 50), order=None, names=None) -> str:
    order = range(len(points)) if order is None else order
    names = [f"{i:02d}" for i in range(len(points))] if names is None else names
    parts = "".join(f"<part name='{names[i]}' x='{points[i, 0]}' y='{points[i, 1]}'/>" for i in order)
    left, top, width, height = box
    return f"<box top='{top}' left='{left}' width='{width}' height='{height}'>{parts}</box>"


def good_face_xml(names=None, box=(50, 40, 100, 100), n_parts=68) -> str:
    points = template_shape()[:n_parts] * 100 + [100, 100]
    return box_xml(points, box=box, names=names)


def faces_xml(root: Path, n_faces: int, extra: list[str] = ()) -> Path:
    """n good faces (the same drawn box) in one image, plus any extra <box> elements after them."""
    Image.new("RGB", (200, 200), 128).save(root / "good.jpg")
    return write_xml(root / labels.TRAIN_XML, [("good.jpg", [good_face_xml()] * n_faces + list(extra))])


def degenerate_face_xml(case: str) -> str:
    points = template_shape() * 100 + [100, 100]
    if case == "eye corners coincide":
        points[45] = points[36]
    else:
        points[8] += [400, 0]
    return box_xml(points, box=(50, 40, 100, 100))


# ---- photos

def astronaut_jpg(tmp_path: Path) -> Path:
    """A real face photo that ships inside scikit-image, so no test downloads anything."""
    path = tmp_path / "astronaut.jpg"
    Image.fromarray(astronaut()).save(path, quality=95)
    return path


def astronaut_turned(tmp_path: Path, quarter_turns: int) -> Path:
    """The astronaut photo turned by exact quarter turns (counter-clockwise on screen, as np.rot90)."""
    path = tmp_path / f"astronaut_{quarter_turns}.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(astronaut(), quarter_turns))).save(path)
    return path


def image_in_mode(mode: str) -> Image.Image:
    gradient = np.tile(np.linspace(0, 1, 160), (140, 1))
    if mode == "I;16":
        return Image.fromarray((gradient * 65535).astype(np.uint16))
    return Image.fromarray((gradient * 255).astype(np.uint8)).convert("RGB").convert(mode)


def predict_images(trained: Path, out_dir: Path, *args: str) -> dict:
    predict.main(predict.parse_args(["--weights", str(trained / "best.pt"), "--out-dir", str(out_dir), *args]))
    return photos.read_results(out_dir / photos.RESULTS)


# ---- points, crops and runs

def grid_points(box: Box) -> np.ndarray:
    xs, ys = np.meshgrid(np.linspace(0.1, 0.9, 9), np.linspace(0.1, 0.9, 8))
    grid = np.c_[xs.ravel(), ys.ravel()][:NUM_LANDMARKS]
    return np.round(grid * [box.width, box.height] + [box.left, box.top])


def pip_maps(targets: torch.Tensor, index: torch.Tensor, grid: int) -> tuple[torch.Tensor, ...]:
    """The maps a perfect PIPNet head would give: a one-hot score at each point's cell, exact offsets."""
    n, k = targets.shape[0], targets.shape[1] // 2
    points = (targets.view(n, k, 2) + 0.5) * grid
    cell = points.floor()
    scores = torch.zeros(n, k, grid, grid)
    offsets = torch.zeros(n, k, 2, grid, grid)
    neighbours = torch.zeros(n, k, index.shape[1], 2, grid, grid)
    for i in range(n):
        for j in range(k):
            x, y = int(cell[i, j, 0]), int(cell[i, j, 1])
            scores[i, j, y, x] = 1
            offsets[i, j, :, y, x] = points[i, j] - cell[i, j]
            neighbours[i, j, :, :, y, x] = points[i, index[j]] - cell[i, j]
    return scores, offsets, neighbours


def jaw_shape() -> np.ndarray:
    """A face whose jaw runs straight along x (so along the outline is x, across it y)."""
    points = np.random.default_rng(0).uniform(0, 100, (NUM_LANDMARKS, 2))
    points[:17] = np.stack([np.arange(17) * 5.0, np.full(17, 80.0)], 1)
    points[36], points[45] = (20, 30), (70, 30)  # the eye corners 50 apart
    return points


def eval_crops(faces: list[Face], indices: list[int], size: int) -> torch.Tensor:
    data = FaceLandmarksDataset(faces, Transforms(size, train=False), indices)
    return torch.stack([data[i][0] for i in range(len(data))])


def copy_run(one_epoch: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(one_epoch, tmp_path / "run"))


# ---- fixtures

@pytest.fixture(scope="session", autouse=True)
def own_network_cache(tmp_path_factory):
    """Frozen networks go to a folder of the tests' own, never the user's ~/.cache (scripts the tests start
    inherit it)."""
    previous = os.environ.get(network_cache.CACHE_ENV)
    os.environ[network_cache.CACHE_ENV] = str(tmp_path_factory.mktemp("network_cache"))
    yield
    if previous is None:
        del os.environ[network_cache.CACHE_ENV]
    else:
        os.environ[network_cache.CACHE_ENV] = previous


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    demodata.make_demo(root, n_images=50, seed=1)
    return root


@pytest.fixture(scope="session")
def trained(demo, tmp_path_factory) -> Path:
    """One short training run that several tests look at."""
    out = tmp_path_factory.mktemp("run")
    history = train.main(train.parse_args(["--data-dir", str(demo), "--epochs", "8", "--out", str(out), *FAST]))
    assert len(history) == 8
    return out


@pytest.fixture(scope="session")
def one_epoch(demo, tmp_path_factory) -> Path:
    """A finished one-epoch run that resume tests copy, so that each starts from the same files."""
    out = tmp_path_factory.mktemp("one_epoch")
    train.main(train.parse_args(["--data-dir", str(demo), "--epochs", "1", "--out", str(out), *FAST]))
    return out


@pytest.fixture(scope="session", params=[5, 98])
def other_markup(request, tmp_path_factory) -> tuple[int, Path, Path]:
    """A demo markup of K points trained for a few epochs with its mirror pairs: (K, data, run)."""
    k = request.param
    root = tmp_path_factory.mktemp(f"demo{k}")
    demodata.make_demo(root, n_images=40, seed=2, num_points=k)
    out = root / "run"
    _, corners = demodata.demo_markup(k)
    nme_flags = ["--nme-points", f"{corners[0]},{corners[1]}"] if k == 98 else []  # 5: the box diagonal
    head = ["--head", "pip"] if k == 5 else []
    train.main(train.parse_args(["--data-dir", str(root), "--epochs", "3", "--flip", "--rotation", "10",
                                 "--flip-pairs", str(root / "flip_pairs.json"), *nme_flags, *head,
                                 "--out", str(out), *FAST]))
    return k, root, out


@pytest.fixture(scope="session")
def int8_release(demo, tmp_path_factory) -> Path:
    """The released weights with calibration crops of the demo's drawn faces, as export.py --release
    --data-dir writes a release."""
    path = tmp_path_factory.mktemp("int8") / "release.pt"
    export.main(export.parse_args(["--weights", str(checkpoints.RELEASED_WEIGHTS), "--release", str(path),
                                   "--data-dir", str(demo)]))
    return path


@pytest.fixture(scope="module")
def released() -> Landmarker:
    return Landmarker()


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session, with this machine's two cores: predict.py --engine ray joins it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def photo_set(folder: Path, n: int, bad: bool = False) -> Path:
    """n photos of the astronaut, each shifted a little, and a file that is not a photo if `bad`."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = np.asarray(Image.open(astronaut_jpg(folder.parent)))
    for i in range(n):
        Image.fromarray(np.roll(photo, 2 * i, axis=1)).save(folder / f"p{i:03d}.jpg", quality=95)
    if bad:
        (folder / "broken.jpg").write_bytes(b"not a photo")
    return folder


def run_photos(folder: Path, out: Path, *flags: str) -> dict:
    """predict.py --image on a folder without drawing; its records by photo name."""
    try:
        predict.main(predict.parse_args(["--image", str(folder), "--out-dir", str(out), "--no-draw", *flags]))
    except SystemExit as stop:
        assert stop.code == 1  # the bad photo's exit, after every record was written
    return {Path(r["image"]).name: r for r in photos.read_results(out)["images"]}
