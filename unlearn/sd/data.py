"""What the diffusion track draws and judges: the world's objects in its styles (and as plain
photos), rendered at the pipeline's resolution, and the prompts that name them.

Images come from the world's renderer (`unlearn.data.render`) on their own seed streams: (seed, 7,
...) for the pipeline's training images, (seed, 8, ...) for the judges' training images.  The
judges' held-out real images are the canvas of the download stage (data/eval/canvas, UnlearnCanvas
format, stream (seed, 6, ...)), so no image is shared between training and testing.  The style
axis is "photo" (UnlearnCanvas's Seed_Images) followed by the world's styles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from unlearn.data import render as R
from unlearn.data.canvas import SEED_IMAGES, read_canvas
from unlearn.data.world import OBJECTS, STYLES
from unlearn.errors import UnlearnError

PHOTO = "photo"
STYLE_AXIS: tuple[str, ...] = (PHOTO, *STYLES)
OBJECT_AXIS: tuple[str, ...] = tuple(o.name for o in OBJECTS)
TRAIN_STREAM, JUDGE_STREAM, HELD_STREAM = 7, 8, 9  # HELD_STREAM: held-out images of the training distribution


@dataclass(frozen=True)
class Templates:
    """Prompts naming an object in a style, and an object as a photo (Seed_Images)."""

    style: str = "An {object} image in {style} style."
    photo: str = "A photo of a {object}."

    def __post_init__(self) -> None:
        for key, text, fields in (("style", self.style, ("{object}", "{style}")), ("photo", self.photo, ("{object}",))):
            missing = [f for f in fields if f not in text]
            if missing:
                raise UnlearnError(f"sd.templates.{key} {text!r} lacks {' and '.join(missing)}; write it with every field, "
                                   f"e.g. {Templates().__dict__[key]!r}")

    def prompt(self, obj: str, style: str) -> str:
        return self.photo.format(object=obj) if style == PHOTO else self.style.format(object=obj, style=style)


@dataclass(frozen=True)
class Images:
    """uint8 images (N, 3, S, S) with their object and style indices into the axes."""

    pixels: torch.Tensor
    objects: torch.Tensor
    styles: torch.Tensor

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def as_float(self) -> torch.Tensor:
        """In [-1, 1], the range the autoencoder and the judges take."""
        return self.pixels.float() / 127.5 - 1.0


def render_cell(obj_index: int, style: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One object on a plain-ish backdrop (one clutter shape), lit, in `style` (or as a photo)."""
    img = R.background(rng, clutter=1)
    R._place(img, R.object_layer(OBJECTS[obj_index], rng), rng, max_angle=10, max_shift=8)
    img = R.light(img, rng)
    if style != PHOTO:
        img = R.apply_style(img, style, rng)
    return np.asarray(R.finish(img, size))


def render_images(seed: int, stream: int, per_cell: int, size: int, progress: str | None = None) -> Images:
    """`per_cell` images of every (object, style) cell, each on its own seed (seed, stream, o, s, j)."""
    if per_cell < 1:
        raise UnlearnError(f"images per cell is {per_cell}; use 1 or more")
    pix, objs, stys = [], [], []
    cells = [(o, s) for o in range(len(OBJECT_AXIS)) for s in range(len(STYLE_AXIS))]
    for o, s in tqdm(cells, desc=progress, disable=progress is None, mininterval=2.0):
        for j in range(per_cell):
            pix.append(render_cell(o, STYLE_AXIS[s], np.random.default_rng([seed, stream, o, s, j]), size))
            objs.append(o)
            stys.append(s)
    return Images(torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).contiguous(), torch.tensor(objs), torch.tensor(stys))


def canvas_images(root: str | Path, size: int) -> Images:
    """A canvas folder (UnlearnCanvas format) as Images at `size` px; Seed_Images is the photo
    style.  Every style and object must be one of the axes."""
    canvas = read_canvas(root)
    pix, objs, stys = [], [], []
    for path, style, obj in zip(canvas.paths, canvas.styles, canvas.objects):
        style = PHOTO if style == SEED_IMAGES else style
        if style not in STYLE_AXIS or obj not in OBJECT_AXIS:
            raise UnlearnError(f"{path}: style {style!r} / object {obj!r} is not on the judges' axes ({', '.join(STYLE_AXIS)}; "
                               f"{', '.join(OBJECT_AXIS)}); give a canvas of the world's styles and objects")
        with Image.open(path) as img:
            pix.append(np.asarray(img.convert("RGB").resize((size, size), Image.LANCZOS)))
        objs.append(OBJECT_AXIS.index(obj))
        stys.append(STYLE_AXIS.index(style))
    return Images(torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).contiguous(), torch.tensor(objs), torch.tensor(stys))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1] (N, 3, S, S) as PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
