"""Safe image loading: a missing, broken or oversized file is an error naming it, the sample and the fix;
and the fast path from a decoded image to pixel values (pad to square, resize, normalise)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medlava.io import InputError

# Decompression-bomb guard, checked from the header before any pixel is decoded. 8192^2 RGB is 200 MB in
# memory per image; real dermoscopy (600x450) and radiographs (~3000x3000) are far below it.
MAX_PIXELS = 8192 * 8192
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class BadImage(InputError):
    """An image problem; `reason` is its kind in medlava.data.problems.REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def resolve_image(root: Path, rel: str) -> Path:
    """`root / rel`, refusing a path that leaves `root` (via `..` or an absolute path elsewhere). The check is
    lexical, so a symlink inside root pointing at shared storage is still allowed."""
    root = Path(os.path.normpath(Path(root).absolute()))
    path = Path(os.path.normpath(root / rel))
    if not path.is_relative_to(root) or path == root:
        raise BadImage("image_outside_root", f"image path {rel!r} is not a file inside the image root {root}; "
                       "use a path relative to it without '..'")
    return path


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _WIDE_MODES:
        # Pillow clips 16-bit/float pixels at 255 when converting (a 16-bit radiograph turns white), so
        # stretch the image's own range to 8 bits first.
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        im = Image.fromarray(((a - lo) * (255 / (hi - lo) if hi > lo else 0)).astype(np.uint8))
    return im.convert("RGB")


def _open(path: Path, sample_id: str | None, decode: bool) -> Image.Image | None:
    """Open `path`, refuse a bomb from its header, then (decode) read every pixel, as RGB."""
    who = f" (sample {sample_id})" if sample_id is not None else ""
    if not Path(path).is_file():
        raise BadImage("missing_image", f"image {path}{who} does not exist: check data.root and the sample's "
                       "`image` field")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice that; make it an error like ours.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels")
                return _to_rgb(im) if decode else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("oversized_image", f"image {path}{who} is over the {MAX_PIXELS:,}-pixel limit, a "
                       f"decompression bomb? ({e}); downscale it or remove the sample") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow's decoders raise on broken files
        raise BadImage("unreadable_image", f"image {path}{who} cannot be read ({type(e).__name__}: {e}); "
                       "re-export or remove it") from None


def load_image(path: Path, sample_id: str | None = None) -> Image.Image:
    """The image at `path` as RGB; BadImage (an InputError) naming path and sample when it is missing,
    unreadable, truncated or too large."""
    return _open(path, sample_id, decode=True)


def check_image(path: Path, decode: bool = True) -> None:
    """Raise BadImage as load_image would. Without `decode` only the header is read (fast, but a truncated
    file passes)."""
    _open(path, None, decode)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `pad` aspect: the whole image centred on a square of `fill` (the processor's mean colour)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def pixel_values(image: Image.Image, image_processor) -> torch.Tensor:
    """What a transformers CLIP/LLaVA image processor makes of one image (pad if `do_pad`, resize of the
    shortest edge, centre crop, rescale, normalise), as a (3, H, W) float tensor, ~2x faster: PIL does the
    geometry on uint8 and torch the arithmetic. Hand-written because the processors' fast backend needs
    torchvision; tests check it matches the processor's own output."""
    p = image_processor
    if p.do_pad:
        image = pad_to_square(image, tuple(int(m * 255) for m in p.image_mean))
    short = p.size["shortest_edge"]
    w, h = image.size
    scale = short / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)) if w != h else (short, short), resample=p.resample)
    ch, cw = p.crop_size["height"], p.crop_size["width"]
    left, top = (image.width - cw) // 2, (image.height - ch) // 2
    if (image.width, image.height) != (cw, ch):
        image = image.crop((left, top, left + cw, top + ch))
    mean, std = np.asarray(p.image_mean, np.float32), np.asarray(p.image_std, np.float32)
    x = np.asarray(image, np.float32) * (np.float32(p.rescale_factor) / std) - mean / std  # one pass, HWC
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
