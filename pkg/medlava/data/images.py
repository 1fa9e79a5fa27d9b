"""Safe image loading: a missing, broken or oversized file is an error naming it, the sample and the fix;
and the fast path from a decoded image to pixel values (pad to square, resize, normalise)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
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
        raise BadImage(
            "image_outside_root",
            f"image path {rel!r} is not a file inside the image root {root}; use a path relative to it without '..'",
        )
    return path


def padded_too_large(width: int, height: int) -> str | None:
    """Why an image of this size is refused although its pixel count is within MAX_PIXELS (None: it is not).
    Padding to a square (LLaVA's `pad` aspect) allocates max(w, h)^2 pixels: a 65536x1 PNG of 132 bytes
    would take 12 GB once padded."""
    side = max(width, height)
    if side * side <= MAX_PIXELS:
        return None
    return (
        f"{width}x{height}: padded to a square it would be {side}x{side} = {side * side:,} pixels, over the "
        f"{MAX_PIXELS:,}-pixel limit (the longest side may be at most {math.isqrt(MAX_PIXELS)})"
    )


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
        raise BadImage(
            "missing_image", f"image {path}{who} does not exist: check data.root and the sample's `image` field"
        )
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice that; make it an error like ours.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width}x{im.height} pixels")
                if problem := padded_too_large(im.width, im.height):
                    raise BadImage(
                        "oversized_image", f"image {path}{who} is {problem}; downscale it or remove the sample"
                    )
                return _to_rgb(im) if decode else None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(
            "oversized_image",
            f"image {path}{who} is over the {MAX_PIXELS:,}-pixel limit, a "
            f"decompression bomb? ({e}); downscale it or remove the sample",
        ) from None
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow's decoders raise on broken files
        raise BadImage(
            "unreadable_image", f"image {path}{who} cannot be read ({type(e).__name__}: {e}); re-export or remove it"
        ) from None


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
    if problem := padded_too_large(w, h):  # load_image refuses these first; any other image must not get by
        raise BadImage("oversized_image", f"an image of {problem}; downscale it")
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


_TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


def _fast_resample(p) -> Image.Resampling | None:
    """`p`'s resample filter when `pixel_values` knows every step `p` would take (CLIP/LLaVA processors as
    LLaVA-Med ships them), else None."""
    try:
        resample = Image.Resampling(int(getattr(p, "resample", -1)))
    except (TypeError, ValueError):
        return None
    size, crop = getattr(p, "size", None) or {}, getattr(p, "crop_size", None) or {}
    fits = (
        getattr(p, "do_resize", False)
        and getattr(p, "do_center_crop", False)
        and getattr(p, "do_rescale", False)
        and getattr(p, "do_normalize", False)
        and resample in _TORCH_MODES
        and bool(size.get("shortest_edge"))
        and bool(crop.get("height"))
        and bool(crop.get("width"))
        and max(crop["height"], crop["width"]) <= size["shortest_edge"]
    )
    return resample if fits else None


def pixel_values(image: Image.Image, image_processor) -> torch.Tensor:
    """What a transformers CLIP/LLaVA image processor makes of one RGB image (pad to square if `do_pad`, resize
    of the shortest edge, centre crop, rescale, normalise), as a (3, H, W) float tensor, about 5x faster.

    Downscaling is torch's antialiased uint8 kernel (a vectorised port of Pillow's), so a pixel may differ from
    Pillow's by one 8-bit level (~0.5% of them do); the geometry and everything else are the processor's. This
    is the trade transformers' own fast processors make. Hand-written because those need torchvision, which the
    LLaVA path does not install. A processor configured otherwise is simply called."""
    p = image_processor
    resample = _fast_resample(p)
    if resample is None:
        return p(images=[image], return_tensors="pt")["pixel_values"][0]
    image = image if image.mode == "RGB" else image.convert("RGB")
    if getattr(p, "do_pad", False):
        image = pad_to_square(image, tuple(int(m * 255) for m in p.image_mean))  # Pillow's fill+paste: fastest
    a = np.asarray(image)
    h, w = a.shape[:2]
    # transformers' shortest-edge rule: the long side truncated, not rounded
    short = p.size["shortest_edge"]
    size = (short, short) if h == w else (short, int(short * w / h)) if h < w else (int(short * h / w), short)
    if size[0] > h:  # upscaling a small image: rare and cheap, so Pillow's own kernel, exactly
        a = np.asarray(Image.fromarray(a).resize(size[::-1], resample=resample))
    x = torch.from_numpy(np.array(a, copy=not a.flags.writeable)).permute(2, 0, 1)[None]  # channels-last view
    if size[0] < h:
        x = F.interpolate(x, size=size, mode=_TORCH_MODES[resample], antialias=True, align_corners=False)
    ch, cw = p.crop_size["height"], p.crop_size["width"]
    top, left = (size[0] - ch) // 2, (size[1] - cw) // 2
    x = x[0, :, top : top + ch, left : left + cw].to(torch.float32, memory_format=torch.contiguous_format)
    std = torch.tensor(p.image_std, dtype=torch.float32).view(3, 1, 1)
    mean = torch.tensor(p.image_mean, dtype=torch.float32).view(3, 1, 1)
    return x.mul_(p.rescale_factor / std).sub_(mean / std)
