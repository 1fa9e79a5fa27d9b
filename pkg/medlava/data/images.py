"""Safe image loading: a missing, broken or oversized file is an error naming it and the sample."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from medlava.io import InputError

MAX_PIXELS = 20_000 * 20_000  # decompression-bomb guard; the largest real scans are far below it


def resolve_image(root: Path, rel: str) -> Path:
    root = Path(root).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"image path {rel!r} escapes the image root {root}; use a path inside it")
    return path


def load_image(path: Path, sample_id: str | None = None) -> Image.Image:
    who = f" (sample {sample_id})" if sample_id is not None else ""
    if not Path(path).exists():
        raise InputError(f"image {path}{who} does not exist: check data.root and the sample's `image` field")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise InputError(f"image {path}{who} has {im.width}x{im.height} pixels, over the "
                                 f"{MAX_PIXELS:,} limit (a decompression bomb?)")
            return im.convert("RGB")
    except InputError:
        raise
    except (OSError, Image.DecompressionBombError) as e:
        raise InputError(f"image {path}{who} cannot be read ({e}); re-export or remove it") from None
