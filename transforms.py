"""Geometry and photometry of one face sample: crop, rotation, scale, shift and flip are one affine matrix, and the landmarks ride the same matrix."""
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from landmarks import Box, Markup, level_frame

# dlib's boxes are tight: jaw and brow points often lie outside. A square of 1.4 box sides keeps
# about nine faces in ten wholly inside the crop (measured on the 300-W subset).
CROP_MARGIN = 1.4
# Sides of the random occluder, as fractions of the crop's side: from a finger's width to half the face.
OCCLUSION_SIDES = (0.1, 0.5)
# What covers it: uniform noise (PIPNet's), or a piece of the crop itself from elsewhere; --occlusion-fill
# mixed draws each half the time.
OCCLUSION_FILLS = ("noise", "crop")


@dataclass(frozen=True)
class Augment:
    """One draw of the random parameters. Validation uses the identity; prediction turns the crop against the
    face's roll (looks.level), and nothing else."""
    angle: float = 0.0        # degrees
    zoom: float = 1.0         # >1 crops tighter
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the crop side
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    occlusion: tuple[float, float, float, float] | None = None  # left, top, width, height: fractions of the crop
    occlusion_fill: str = "noise"  # what covers it: "noise", or "crop", a piece of the crop from elsewhere


def translate(x: float, y: float) -> np.ndarray:
    return np.array([[1, 0, x], [0, 1, y], [0, 0, 1]], np.float64)


def face_matrix(box: Box, img_size: int, margin: float, aug: Augment = Augment()) -> np.ndarray:
    """3x3 map from image coordinates to crop coordinates (pixel i spans [i, i+1] in both)."""
    side = box.side * margin / aug.zoom
    center = box.center + np.asarray(aug.shift) * side
    scale = img_size / side
    c, s = math.cos(math.radians(aug.angle)), math.sin(math.radians(aug.angle))
    rotate_scale = np.array([[c * scale, -s * scale, 0], [s * scale, c * scale, 0], [0, 0, 1]])
    mirror = np.diag([-1.0 if aug.flip else 1.0, 1, 1])
    return translate(img_size / 2, img_size / 2) @ mirror @ rotate_scale @ translate(-center[0], -center[1])


def pixel_rect(rect: tuple[float, float, float, float], side: int) -> tuple[int, int, int, int]:
    """An occluder's rectangle (fractions of the crop) in whole pixels of a crop `side` pixels wide."""
    return tuple(round(v * side) for v in rect)


def occlude(pixels: torch.Tensor, rect: tuple[float, float, float, float], fill: str = "noise") -> torch.Tensor:
    """Grey levels (H, W) with the rectangle `rect` (fractions of the side) replaced by uniform noise, or
    (fill="crop") by a piece of the same size from a random place of the crop: something real, hair,
    background or another part of the face. Its place comes from torch's generator, as the noise does."""
    side = pixels.shape[-1]
    left, top, width, height = pixel_rect(rect, side)
    pixels = pixels.clone()
    if fill == "noise":
        pixels[top:top + height, left:left + width] = torch.rand(height, width) * 255
    else:
        x, y = (int(torch.randint(0, side - extent + 1, ())) for extent in (width, height))
        pixels[top:top + height, left:left + width] = pixels[y:y + height, x:x + width].clone()
    return pixels


def visible(target: np.ndarray, rect: tuple[float, float, float, float] | None) -> np.ndarray:
    """(K,) 1.0 for each point (target units, [-0.5, 0.5]) outside the occluder `rect`, 0.0 under it."""
    if rect is None:
        return np.ones(len(target), np.float32)
    left, top, width, height = rect
    x, y = target[:, 0] + 0.5, target[:, 1] + 0.5
    return (~((x >= left) & (x < left + width) & (y >= top) & (y < top + height))).astype(np.float32)


def unflip(target: torch.Tensor, flip: tuple[int, ...]) -> torch.Tensor:
    """Predictions (N, 2K) made on horizontally mirrored crops -> predictions for the crops themselves;
    `flip` is the markup's mirror permutation (landmarks.Markup.flip)."""
    points = target.reshape(len(target), -1, 2)[:, list(flip)]
    return (points * points.new_tensor([-1.0, 1.0])).reshape(len(target), -1)


def box_diagonal(box: Box, margin: float = CROP_MARGIN) -> float:
    """The box's diagonal in the network's target units (the unaugmented crop is 1 wide): what NME divides
    by for a markup without NME points."""
    return math.hypot(box.width, box.height) / (box.side * margin)


def points_to_target(points: np.ndarray, matrix: np.ndarray, img_size: int) -> np.ndarray:
    """Image pixel coordinates -> the network's target: crop coordinates scaled to [-0.5, 0.5]."""
    homogeneous = np.c_[points + 0.5, np.ones(len(points))]
    return (homogeneous @ matrix.T)[:, :2] / img_size - 0.5


def target_to_points(target: np.ndarray, matrix: np.ndarray, img_size: int) -> np.ndarray:
    """The inverse of points_to_target: predictions back to image pixels."""
    crop = (np.asarray(target, np.float64).reshape(-1, 2) + 0.5) * img_size
    return (np.c_[crop, np.ones(len(crop))] @ np.linalg.inv(matrix).T)[:, :2] - 0.5


class Transforms:
    """Crop to the face box with a margin, rotate (and, if asked, zoom, shift, flip), resize to
    img_size, jitter brightness and contrast, grayscale, to tensor, normalise to [-1, 1].

    With train=False every random step is the identity, for validation and prediction. Flipping needs
    the markup's mirror permutation, `flip_permutation`: mirrored, each point becomes its twin. With
    `align` (the markup), each face is cropped in the level frame its own points give it
    (landmarks.level_frame: the crops inference makes from a detector or an earlier look), not around the
    box it comes with, before the random rotation, zoom and shift. `spread` is how those are drawn
    ("uniform" or "normal", Transforms.offset).
    """

    def __init__(self, img_size: int = 224, train: bool = True, rotation: float = 10.0, scale: float = 0.0,
                 shift: float = 0.0, flip: bool = False, jitter: float = 0.3, margin: float = CROP_MARGIN,
                 flip_permutation: tuple[int, ...] | None = None, occlusion: float = 0.0, visibility: bool = False,
                 align: Markup | None = None, spread: str = "uniform", occlusion_fill: str = "noise"):
        if flip and flip_permutation is None:
            raise ValueError("flipping needs the markup's mirror permutation")
        self.img_size, self.train, self.margin = img_size, train, margin
        self.flip_permutation = None if flip_permutation is None else list(flip_permutation)
        self.rotation, self.scale, self.shift, self.flip, self.jitter = rotation, scale, shift, flip, jitter
        self.occlusion, self.visibility, self.align = occlusion, visibility, align
        self.spread, self.occlusion_fill = spread, occlusion_fill

    def draw(self) -> Augment:
        if not self.train:
            return Augment()
        u, off = random.uniform, self.offset
        aug = Augment(angle=off(self.rotation), zoom=1 + off(self.scale), shift=(off(self.shift), off(self.shift)),
                      flip=self.flip and random.random() < 0.5,
                      brightness=u(1 - self.jitter, 1 + self.jitter), contrast=u(1 - self.jitter, 1 + self.jitter),
                      occlusion=self.draw_occlusion())
        if aug.occlusion is not None and self.occlusion_fill == "mixed":  # Python's generator moves only here
            aug = replace(aug, occlusion_fill=random.choice(OCCLUSION_FILLS))
        return aug

    def offset(self, size: float) -> float:
        """A random offset of `size`: uniform over +-size, or normal with sigma size/2 (95% within +-size,
        none beyond +-2 size), which puts most crops near the source's frame and a few far off, as
        detectors err (evaluate.py --source-errors)."""
        if self.spread == "uniform":
            return random.uniform(-size, size)
        return max(-2 * size, min(2 * size, random.gauss(0, size / 2)))

    def draw_occlusion(self) -> tuple[float, float, float, float] | None:
        """With probability `occlusion`, a rectangle of noise over part of the face (as in PIPNet's training):
        its points keep their labels, so the network learns to place hidden points from the visible ones."""
        if random.random() >= self.occlusion:
            return None
        width, height = random.uniform(*OCCLUSION_SIDES), random.uniform(*OCCLUSION_SIDES)
        return random.uniform(0, 1 - width), random.uniform(0, 1 - height), width, height

    def matrix(self, box: Box, aug: Augment = Augment()) -> np.ndarray:
        return face_matrix(box, self.img_size, self.margin, aug)

    def max_reduction(self, box: Box) -> int:
        """How far the image may shrink while decoding and still give the crop full resolution."""
        pixels_per_output = box.side * self.margin / (1 + self.scale) / self.img_size
        return 2 ** max(0, min(3, int(math.log2(max(pixels_per_output, 1)))))

    def __call__(self, image: Image.Image, box: Box, points: np.ndarray,
                 aug: Augment | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        aug = self.draw() if aug is None else aug
        if self.align is not None:  # the face's own level frame, as its points give it, instead of the box
            box, roll = level_frame(points, self.align)
            aug = replace(aug, angle=aug.angle - roll)
        matrix = self.matrix(box, aug)
        inverse = np.linalg.inv(matrix)[:2].ravel()
        crop = image.transform((self.img_size, self.img_size), Image.AFFINE, tuple(inverse), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(crop, np.float32).copy())
        if aug.brightness != 1.0 or aug.contrast != 1.0:
            pixels = pixels * aug.brightness
            pixels = ((pixels - pixels.mean()) * aug.contrast + pixels.mean()).clamp(0, 255)
        if aug.occlusion is not None:
            pixels = occlude(pixels, aug.occlusion, aug.occlusion_fill)
        target = points_to_target(points, matrix, self.img_size)
        if aug.flip:
            target = target[self.flip_permutation]
        target = target.astype(np.float32).reshape(-1)
        if self.visibility:  # (3K,): the coordinates, then 1 for each point seen and 0 for each covered
            target = np.concatenate([target, visible(target.reshape(-1, 2), aug.occlusion)])
        return (pixels / 127.5 - 1).unsqueeze(0), torch.from_numpy(target)

    def to_image(self, target: np.ndarray, box: Box, aug: Augment = Augment()) -> np.ndarray:
        """A prediction for a face cropped with `aug` (no augmentation unless given) -> (K, 2) image pixels."""
        return target_to_points(target, self.matrix(box, aug), self.img_size)


def mean_shape(faces: list) -> np.ndarray:
    """The average face (K, 2) in crop coordinates of a validation crop; needs only the labels, no pixels."""
    return np.mean([points_to_target(f.points, face_matrix(f.box, 1, CROP_MARGIN), 1) for f in faces], axis=0)
