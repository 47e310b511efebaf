"""A user's image files as the model's input: found in folders, decoded with PIL, made RGB and 32 x 32.

How a picture becomes a 32 x 32 RGB image (docs/using-a-model.md says the same):
- the first frame of an animation (GIF, WebP); the EXIF orientation applied, as a viewer shows it;
- 16-bit greyscale scaled to 8 bits (value / 257); a picture with transparency laid over white;
  any other mode (greyscale, palette, CMYK, ...) converted to RGB by PIL;
- the largest centred crop of the picture's aspect ratio, square, resized to 32 x 32 with PIL's
  bicubic filter, which widens with the reduction and so antialiases (`ImageOps.fit`): the short
  side becomes 32 and the long side is cut evenly on both ends. A 32 x 32 picture is used as it is.

A file PIL cannot read, a truncated one or one larger than PIL's decompression-bomb limit
(`Image.MAX_IMAGE_PIXELS` pixels) is a `UserError` naming it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar100.errors import UserError

SIZE = 32
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
RESIZE = (
    "the largest centred square crop, resized to 32 x 32 with PIL's antialiasing bicubic filter "
    "(PIL.ImageOps.fit(image, (32, 32), Image.Resampling.BICUBIC)); transparency over white"
)
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def find_images(paths: Iterable[str]) -> list[Path]:
    """The files named, and the image files (by suffix, any case) anywhere under the folders named,
    each folder's in sorted order. A file named outright is taken whatever its suffix."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            if not inside:
                raise UserError(f"{text}: no image files in this folder (looked for {', '.join(SUFFIXES)})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{text}: no such file or folder")
    if not found:
        raise UserError("no images given: name image files or folders of them")
    return found


def read_image(path: Path) -> np.ndarray:
    """The picture in `path` as a uint8 (3, 32, 32) array, R, G, B planes (see the module's docstring)."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; any picture above the limit is refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                picture.seek(0)
                picture.load()
                rgb = _to_rgb(ImageOps.exif_transpose(picture))
            square = ImageOps.fit(rgb, (SIZE, SIZE), method=Image.Resampling.BICUBIC)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"{path}: refused ({err})") from None
    except UnidentifiedImageError:
        what = "an empty file" if path.stat().st_size == 0 else "not an image PIL can read"
        raise UserError(f"{path}: {what}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # what PIL's decoders raise for broken files
        raise UserError(f"{path}: unreadable image ({' '.join(str(err).split()) or type(err).__name__})") from None
    return np.asarray(square, dtype=np.uint8).transpose(2, 0, 1).copy()


def _to_rgb(picture: Image.Image) -> Image.Image:
    if picture.mode in _SIXTEEN_BIT:
        # PIL's own conversion clips 16-bit values at 255, which turns most of a picture white.
        wide = np.asarray(picture, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8)).convert("RGB")
    if picture.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in picture.info:
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return picture.convert("RGB")
