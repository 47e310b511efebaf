"""A user's image files as the model's input: found in folders, decoded with PIL, made RGB and 32 x 32.

How a picture becomes a 32 x 32 RGB image (docs/using-a-model.md says the same):
- the first frame of an animation (GIF, WebP); the EXIF orientation applied, as a viewer shows it;
- 16-bit greyscale scaled to 8 bits (value / 257); a picture with transparency laid over white;
  any other mode (greyscale, palette, CMYK, ...) converted to RGB by PIL;
- the largest centred crop of the picture's aspect ratio, square, resized to 32 x 32 with PIL's
  bicubic filter, which widens with the reduction and so antialiases (`ImageOps.fit`): the short
  side becomes 32 and the long side is cut evenly on both ends. A 32 x 32 picture is used as it is.

A picture of more than `MAX_PIXELS` pixels (PIL's own decompression-bomb limit, 89,478,485: a
picture of 9,459 x 9,459) is refused before it is decoded. Each picture is refused alone, with a
`UserError` naming it: one not in `FORMATS` (whatever its name says), a truncated one, one over
the limit, or one that does not fit in memory. A pool of threads decodes at most `MAX_PIXELS`
pixels at once, so several large pictures never decode side by side.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar100.errors import UserError, shown_path

SIZE = 32
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # PIL's names; the only ones decoded, whatever a file's suffix
RESIZE = (
    "the largest centred square crop, resized to 32 x 32 with PIL's antialiasing bicubic filter "
    "(PIL.ImageOps.fit(image, (32, 32), Image.Resampling.BICUBIC)); transparency over white"
)
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
MAX_PIXELS = 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS, fixed here whatever PIL's is set to


class PixelBudget:
    """Bounds the pixels that threads decode at once: a picture waits until its pixels fit beside
    those being decoded; one as large as the whole budget decodes alone."""

    def __init__(self, pixels: int = MAX_PIXELS) -> None:
        self._total = self._free = pixels
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Wait for room for `pixels` (at most the whole budget), hold it while the block runs."""
        need = min(pixels, self._total)
        with self._changed:
            self._changed.wait_for(lambda: self._free >= need)
            self._free -= need
        try:
            yield
        finally:
            with self._changed:
                self._free += need
                self._changed.notify_all()


def find_images(paths: Iterable[str]) -> list[Path]:
    """The files named, and the image files (by suffix, any case) anywhere under the folders named,
    each folder's in sorted order. A file named outright is taken whatever its suffix; a folder's
    entries that are not regular files (FIFOs, devices, links to them) are passed over."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
            if not inside:
                raise UserError(f"{shown_path(text)}: no image files in this folder (looked for {', '.join(SUFFIXES)})")
            found += inside
        elif path.is_file():
            found.append(path)
        elif os.path.exists(path):
            raise UserError(f"{shown_path(text)}: not a regular file (a FIFO, a device, a socket): not an image")
        else:
            raise UserError(f"{shown_path(text)}: no such file or folder")
    if not found:
        raise UserError("no images given: name image files or folders of them")
    return found


def read_image(path: Path, budget: PixelBudget | None = None) -> np.ndarray:
    """The picture in `path` as a uint8 (3, 32, 32) array, R, G, B planes (see the module's
    docstring); decoded within `budget` when given. A picture that cannot be one is a `UserError`."""
    name, pixels = shown_path(path), "its"
    try:
        with _open(path) as picture:
            width, height = picture.size
            pixels = f"{width:,} x {height:,}"
            if width * height > MAX_PIXELS:  # PIL only warns up to twice its limit (`quiet_pil` below)
                raise UserError(
                    f"{name}: refused, {pixels} = {width * height:,} pixels, more than the "
                    f"{MAX_PIXELS:,} pixels predict decodes (PIL's decompression-bomb limit)"
                )
            with budget.hold(width * height) if budget else contextlib.nullcontext():
                picture.seek(0)
                picture.load()
                rgb = _to_rgb(ImageOps.exif_transpose(picture))
                square = ImageOps.fit(rgb, (SIZE, SIZE), method=Image.Resampling.BICUBIC)
    except Image.DecompressionBombError as err:
        raise UserError(
            f"{name}: refused, more than twice the {MAX_PIXELS:,} pixels predict decodes (PIL's decompression-bomb "
            f"limit; PIL: {' '.join(str(err).split())})"
        ) from None
    except MemoryError:
        raise UserError(f"{name}: refused, out of memory decoding {pixels} pixels") from None
    except UnidentifiedImageError:
        what = "an empty file" if path.stat().st_size == 0 else f"not a {', '.join(FORMATS)} picture"
        raise UserError(f"{name}: {what}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # what PIL's decoders raise for broken files
        raise UserError(f"{name}: unreadable image ({' '.join(str(err).split()) or type(err).__name__})") from None
    return np.asarray(square, dtype=np.uint8).transpose(2, 0, 1).copy()


@contextlib.contextmanager
def quiet_pil() -> Iterator[None]:
    """Silence PIL's decompression-bomb warning (`read_image` refuses such pictures itself) while the
    block runs. Warning filters are the process's: the thread that starts the decoding threads
    sets them, as a `catch_warnings` in each thread would undo another's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _open(path: Path) -> Image.Image:
    """PIL's image of a regular file (a FIFO would block PIL's read) in one of the formats predict
    reads, whatever its name: PIL would hand an EPS file to Ghostscript, a program of its own."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError("not a regular file")
    return Image.open(path, formats=FORMATS)


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
