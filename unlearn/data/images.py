"""Decoding a sample's image bytes, whatever the web stored: JPEG or PNG, CMYK, greyscale, palette,
alpha, 16 bits per channel.

Pillow's own ``convert("RGB")`` clips a 16-bit greyscale PNG (mode ``I;16``/``I``) to white: such
images are scaled to 8 bits first.  A zero-byte or truncated file raises ``OSError``; curation
skips and counts such samples (``image_fault``), the stages that read pairs stop with one line
naming the sample.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def read_image(data: bytes) -> Image.Image:
    """The image in `data` as 8-bit RGB; OSError (or ValueError) when it cannot be decoded."""
    if not data:
        raise OSError("zero-byte image")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
            wide = np.asarray(img, dtype=np.float64)
            scale = 65535.0 if wide.max(initial=0) > 255 else 255.0
            img = Image.fromarray(np.clip(np.rint(wide * 255.0 / scale), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")


def image_fault(data: bytes) -> str | None:
    """Why `data` is not a readable image (one short line), or None when it is."""
    try:
        read_image(data)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"{e.__class__.__name__}: {e}"[:200]
    return None
