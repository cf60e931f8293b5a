"""Decoding pictures safely: any file PIL reads -> an upright photo, or 8-bit grayscale at a reduced scale; one DataError naming the file otherwise."""
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from errors import DataError

def to_gray(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit grayscale; 16-bit and float images are rescaled rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
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
    try:
        image = Image.open(path)
        width = image.size[0]
        jpeg = image.format == "JPEG"
        if reduce > 1 and jpeg:
            image.draft("L", (math.ceil(image.size[0] / reduce), math.ceil(image.size[1] / reduce)))
        image = to_gray(image)
        if reduce > 1 and not jpeg:
            image = image.reduce(reduce)
    except FileNotFoundError:
        raise DataError(f"{path}: image not found", "image not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})", "unreadable image") from None
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
    try:
        with Image.open(path) as image:
            width = image.size[0]
            wanted = 2 ** max(0, min(3, int(math.log2(max(max(image.size) / at_least, 1))))) if at_least else 1
            if wanted > 1 and image.format == "JPEG":
                image.draft(image.mode, (math.ceil(image.size[0] / wanted), math.ceil(image.size[1] / wanted)))
            factor = 2 ** round(math.log2(width / image.size[0]))
            return ImageOps.exif_transpose(image), factor  # a decoded copy, so truncated files fail here
    except FileNotFoundError:
        raise DataError(f"{path}: image not found", "image not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})", "unreadable image") from None


def read_photo(path: Path) -> Image.Image:
    """The photo upright (EXIF orientation applied), in its own mode, at full size; DataError if unreadable."""
    return open_photo(path)[0]
