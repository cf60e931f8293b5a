"""Faces in one picture: dlib's detector finds their boxes, the network puts the points in each; shared by photos and video."""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dataset import Box
from model import Network
from transforms import Transforms


@dataclass(frozen=True)
class FacePrediction:
    box: Box
    points: np.ndarray  # (K, 2) image pixels of the upright photo


def load_detector():
    """dlib's HOG frontal face detector: the one whose boxes the 300-W training labels use."""
    try:
        import dlib
    except ImportError:
        raise SystemExit("finding faces needs dlib's face detector: pip install dlib-bin "
                         "(or, with --image, pass --box left,top,width,height)") from None
    return dlib.get_frontal_face_detector()


def detect_faces(detector, gray: Image.Image, upsample: int = 1) -> list[Box]:
    """Face boxes in dlib's XML convention (rect.width() counts both edge pixels, as the labels do).

    The detector sees the grayscale the network sees: on the colour original it also took the mission
    patch on the astronaut's suit, in the tests' photo, for a face.
    """
    rects = detector(np.asarray(gray, np.uint8), upsample)
    return [Box(r.left(), r.top(), r.width(), r.height()) for r in rects]


def predict_faces(model: Network, transform: Transforms, gray: Image.Image, boxes: list[Box],
                  device: torch.device) -> list[FacePrediction]:
    """All faces of one image as one batch."""
    if not boxes:
        return []
    no_points = np.zeros((1, 2))  # the transform moves points too; here there are none to move
    batch = torch.stack([transform(gray, box, no_points)[0] for box in boxes])
    with torch.inference_mode():
        pred = model(batch.to(device)).float().cpu().numpy()
    return [FacePrediction(box, transform.to_image(p, box)) for p, box in zip(pred, boxes)]
