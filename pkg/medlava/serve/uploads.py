"""An uploaded image, checked before any model sees it: its size, its type from its content (the file name and
the declared type are the sender's word), its longest side from the header (a page's own limit, far below
medlava.data.images' decompression-bomb limit: the model works at a few hundred pixels, and an 8192x8192 PNG of
150 kB costs a gigabyte to decode and pad), then a full decode. It is written only into the request's temporary
directory."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

from PIL import Image, UnidentifiedImageError

from medlava.data.images import MAX_PIXELS, load_image, padded_too_large
from medlava.io import InputError

FORMATS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
# Pillow's name for a JPEG with more pictures after the first (phone cameras: depth maps, previews); the first
# picture is the photo, and it decodes as a JPEG.
SAME_AS = {"MPO": "JPEG"}


class UploadError(ValueError):
    """A refused upload: `status` is the HTTP status, the message says why and what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


MAX_SIDE = 4096
"""Default longest side of an upload, in pixels: a phone's 12-megapixel photo (4032x3024) passes."""


def save_upload(stream: IO[bytes], folder: Path, limit: int, name: str, max_side: int = MAX_SIDE) -> Path:
    """Check the upload in `stream` and write it to `folder` under a name of our own; UploadError if refused."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise UploadError(413, f"{name} is larger than the {limit / 2**20:g} MB upload limit; send a smaller image")
    if not data:
        raise UploadError(400, f"{name} is empty; choose an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                fmt, (width, height) = SAME_AS.get(im.format, im.format), im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadError(413, f"{name} declares too many pixels, a decompression bomb? ({e}); refused") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UploadError(
            415,
            f"{name} is not an image: its content is none of {', '.join(FORMATS)} (the file "
            "name and declared type are not trusted); send a photo in one of those formats",
        ) from None
    if fmt not in FORMATS:
        raise UploadError(415, f"{name} is a {fmt} image; accepted: {', '.join(FORMATS)}")
    if width * height > MAX_PIXELS:
        raise UploadError(
            413,
            f"{name} is {width}x{height} = {width * height:,} pixels, over the {MAX_PIXELS:,}-pixel "
            "limit, a decompression bomb?; refused (downscale a real photo before sending it)",
        )
    if problem := padded_too_large(width, height):
        raise UploadError(413, f"{name} is {problem}; refused (downscale it before sending it)")
    if max(width, height) > max_side:
        raise UploadError(
            413,
            f"{name} is {width}x{height} pixels; this server takes images of at most {max_side} "
            "pixels on the longest side (the model sees a few hundred): downscale it before sending it",
        )
    path = Path(folder) / f"upload{FORMATS[fmt]}"
    path.write_bytes(data)
    try:
        load_image(path)  # every pixel: a truncated or corrupt file is refused here, not inside the model
    except InputError as e:  # its message names our temporary file: the sender knows it as `name`
        raise UploadError(
            400, f"{name} is a {fmt} file that cannot be decoded; re-export it ({str(e).replace(str(path), name)})"
        ) from None
    return path
