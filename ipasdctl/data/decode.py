"""Decoding an image file someone handed in: Pillow's pixel bound enforced in one line, never a warning; an
unreadable file is one line naming it."""

from __future__ import annotations

import re
import warnings

from ..errors import UserError, one_line


def open_image(source, path):
    """Image.open(source) with Pillow's pixel bound enforced: an image past Image.MAX_IMAGE_PIXELS (89
    megapixels) is refused in one line, also below twice the bound, where Pillow would only warn (two raw
    lines) and decode it anyway (a 12,000 x 12,000 image: 1.3 GB). `path` names it in the message."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(source)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(pixels.group(1)):,} pixels, " if pixels else ""
            raise UserError(f"cannot decode image {path}: it is too large ({size}beyond the bound of "
                            f"{Image.MAX_IMAGE_PIXELS:,} pixels against decompression bombs); downscale it, or "
                            "remove it") from None


def load_rgb(path: str):
    """The image at `path` as an RGB PIL image; an unreadable file is a UserError naming it."""
    try:
        with open(path, "rb") as handle:
            return open_image(handle, path).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot decode image {path} ({one_line(exc, 200, named=True)}); "
                        "remove or replace the file") from None
