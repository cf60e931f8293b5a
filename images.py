"""Decoding pictures safely: any file PIL reads -> an upright photo, or 8-bit grayscale at a reduced scale; one DataError naming the file otherwise."""
import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from errors import DataError

# Modes PIL converts to both L and RGB; any other is brought to one of them first (readable_mode).
CONVERTIBLE = {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr",
               "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


def readable_mode(image: Image.Image) -> Image.Image:
    """A photo in a mode PIL can turn into gray and RGB: LAB keeps its lightness band (already a gray
    image: PIL converts LAB to nothing), HSV and the like go through RGB. ValueError where PIL cannot."""
    if image.mode in CONVERTIBLE:
        return image
    if image.mode == "LAB":
        return image.getchannel("L")
    return image.convert("RGB")


@contextlib.contextmanager
def decoding(path: Path) -> Iterator[None]:
    """What PIL raises while reading `path` (missing, truncated, not an image, a decompression bomb), as the
    one-line DataError every reader here raises."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: image not found", "image not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})", "unreadable image") from None


def rgb_is_faithful(photo: Image.Image) -> bool:
    """Whether turning the photo into RGB keeps it as it looks: not for 16-bit and float modes, which would
    clip, nor for transparent ones, which would turn black (those are seen and drawn on their grayscale)."""
    return photo.mode in ("RGB", "L", "CMYK", "YCbCr", "P") and "transparency" not in photo.info


def to_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit grayscale; 16-bit and float images are rescaled rather than clipped."""
    image = readable_mode(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        # The range the values were written for: a 16-bit file whose values stay under 256 holds 8-bit data
        # (as PIL's own convert("I;16") writes it), and float images are often 0..1.
        peak = array.max(initial=0.0)
        top = 1.0 if image.mode == "F" and peak <= 1 else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        return Image.fromarray(np.clip(array * 255.0 / top, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("L")


def open_gray(path: Path, reduce: int = 1) -> tuple[Image.Image, int]:
    """Decode an image as grayscale, letting JPEG decode at 1/2, 1/4 or 1/8 scale when `reduce` allows.

    Returns the image and the factor it was shrunk by, so coordinates can follow.
    """
    reduce = 2 ** min(3, int(math.log2(max(reduce, 1))))
    with decoding(path):
        image = Image.open(path)
        width = image.size[0]
        jpeg = image.format == "JPEG"
        if reduce > 1 and jpeg:
            image.draft("L", (math.ceil(image.size[0] / reduce), math.ceil(image.size[1] / reduce)))
        image = to_gray(image)
        if reduce > 1 and not jpeg:
            image = image.reduce(reduce)
    return image, 2 ** round(math.log2(width / image.size[0]))


def check_image(path: Path) -> tuple[int, int]:
    """Decode the whole file cheaply (JPEG at 1/8 scale) so that truncated files fail now, not mid-epoch."""
    open_gray(path, reduce=8)
    with Image.open(path) as image:
        return image.size


def open_photo(path: Path, at_least: int = 0) -> tuple[Image.Image, int]:
    """The photo upright (EXIF orientation applied), in its own mode, and the factor it was shrunk by: a JPEG
    whose long side is over twice `at_least` decodes at 1/2, 1/4 or 1/8 scale, still `at_least` or more.
    That is what keeps a 12-megapixel photo cheap. DataError with one line if the file is unreadable."""
    with decoding(path):
        with Image.open(path) as image:
            width = image.size[0]
            wanted = 2 ** max(0, min(3, int(math.log2(max(max(image.size) / at_least, 1))))) if at_least else 1
            if wanted > 1 and image.format == "JPEG":
                image.draft(image.mode, (math.ceil(image.size[0] / wanted), math.ceil(image.size[1] / wanted)))
            factor = 2 ** round(math.log2(width / image.size[0]))
            # a decoded copy, so truncated files fail here
            return readable_mode(ImageOps.exif_transpose(image)), factor


# What a numpy picture's last (or, channels first, its first) axis may hold: gray, gray and alpha, RGB, RGBA.
CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
ARRAY_TAKES = ("an H x W gray or H x W x 3 RGB array (or x 1, x 2 gray and alpha, x 4 RGBA; channels first too), "
               "of uint8, uint16, bool, or floats in [0, 1]")


def array_picture(array: np.ndarray) -> Image.Image:
    """A picture handed in as a numpy array, as numpy, PIL, OpenCV (after BGR -> RGB) and torch users hold
    them: gray, gray and alpha, RGB or RGBA; channels last or first; uint8, uint16 (scaled to 8 bits), bool,
    whole numbers in 0..255, or floats in [0, 1] (or in 0..255 where they go above 1); any strides (views,
    slices, [..., ::-1]). DataError naming what it got and what it takes otherwise."""
    got = f"a numpy array of shape {tuple(array.shape)} and dtype {array.dtype}"
    if array.ndim == 3 and array.shape[0] in CHANNEL_MODES and array.shape[-1] not in CHANNEL_MODES:
        array = np.moveaxis(array, 0, -1)  # channels first, as torch and some loaders hold pictures
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in CHANNEL_MODES)):
        raise DataError(f"{got}: expected {ARRAY_TAKES}", "unreadable image")
    if array.size == 0:
        raise DataError(f"{got}: an empty picture; expected {ARRAY_TAKES}", "unreadable image")
    return Image.fromarray(to_uint8(array, got), CHANNEL_MODES[1 if array.ndim == 2 else array.shape[-1]])


def to_uint8(array: np.ndarray, got: str) -> np.ndarray:
    """The array's values as contiguous uint8, each kind scaled from the range it is written in."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array, np.uint8) * 255
    if array.dtype == np.uint16:
        return np.ascontiguousarray(array >> 8, np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{got}: expected {ARRAY_TAKES}", "unreadable image")
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        return np.ascontiguousarray(array, np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{got}: holds NaN or infinite values; expected {ARRAY_TAKES}", "unreadable image")
        top = 1.0 if array.max() <= 1.0 else 255.0
        if array.min() >= 0 and array.max() <= 255:
            return np.ascontiguousarray(np.round(array * (255.0 / top)), np.uint8)
    raise DataError(f"{got} with values from {array.min()} to {array.max()}: expected {ARRAY_TAKES}",
                    "unreadable image")


def read_stored(path: Path) -> Image.Image:
    """The photo as its pixels are stored, its EXIF orientation not applied: the frame dlib's XML labels are in,
    and training crops from (open_gray); in a mode PIL turns into gray and RGB. DataError if unreadable."""
    with decoding(path):
        with Image.open(path) as image:
            image.load()
            return readable_mode(image)


def read_photo(path: Path) -> Image.Image:
    """The photo upright (EXIF orientation applied), in its own mode, at full size; DataError if unreadable."""
    return open_photo(path)[0]
