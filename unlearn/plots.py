"""Pictures people open: image grids (and, in later stages, the PNG plots)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image


def image_grid(tiles: Sequence[Image.Image], path: str | Path, size: int = 96, cols: int = 12) -> None:
    """Save `tiles` as a PNG grid of `size`-pixel squares, `cols` to a row."""
    rows = max(1, (len(tiles) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * (size + 2), rows * (size + 2)), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile.convert("RGB").resize((size, size), Image.LANCZOS), ((k % cols) * (size + 2), (k // cols) * (size + 2)))
    sheet.save(path)
