"""Safe image loading: a missing, broken or oversized file is an error naming it, the sample and the fix."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from medlava.io import InputError

# Decompression-bomb guard, checked from the header before any pixel is decoded. 8192^2 RGB is 200 MB in
# memory per image; real dermoscopy (600x450) and radiographs (~3000x3000) are far below it.
MAX_PIXELS = 8192 * 8192
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def resolve_image(root: Path, rel: str) -> Path:
    """`root / rel`, refusing a path that leaves `root` (via `..` or an absolute path elsewhere). The check is
    lexical, so a symlink inside root pointing at shared storage is still allowed."""
    root = Path(os.path.normpath(Path(root).absolute()))
    path = Path(os.path.normpath(root / rel))
    if not path.is_relative_to(root) or path == root:
        raise InputError(f"image path {rel!r} is not a file inside the image root {root}; use a path relative "
                         "to it without '..'")
    return path


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _WIDE_MODES:
        # Pillow clips 16-bit/float pixels at 255 when converting (a 16-bit radiograph turns white), so
        # stretch the image's own range to 8 bits first.
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        im = Image.fromarray(((a - lo) * (255 / (hi - lo) if hi > lo else 0)).astype(np.uint8))
    return im.convert("RGB")


def load_image(path: Path, sample_id: str | None = None) -> Image.Image:
    """The image at `path` as RGB; InputError naming path and sample when it is missing, unreadable,
    truncated or too large."""
    who = f" (sample {sample_id})" if sample_id is not None else ""
    if not Path(path).is_file():
        raise InputError(f"image {path}{who} does not exist: check data.root and the sample's `image` field")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice that; make it an error like ours.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels")
                return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image {path}{who} is over the {MAX_PIXELS:,}-pixel limit, a decompression bomb? ({e}); "
                         "downscale it or remove the sample") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow's decoders raise on broken files
        raise InputError(f"image {path}{who} cannot be read ({type(e).__name__}: {e}); "
                         "re-export or remove it") from None
