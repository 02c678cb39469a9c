"""What the diffusion track draws and judges: the world's objects in its styles (and as plain
photos), rendered at the pipeline's resolution, and the prompts that name them.

Images come from the world's renderer (`unlearn.data.render`) on their own seed streams: (seed, 7,
...) for the pipeline's training images, (seed, 8, ...) for the judges' training images.  The
judges' held-out real images are the canvas of the download stage (data/eval/canvas, UnlearnCanvas
format, stream (seed, 6, ...)), so no image is shared between training and testing.

What can be drawn and judged is data, an `Axes`: the objects, and the styles with "photo"
(UnlearnCanvas's Seed_Images) first.  On the default they are the world's (`WORLD`); on real data
they are the canvas's (`canvas_axes`: UnlearnCanvas's 20 objects and 50 styles), and the judges
carry the axes they answer over (`unlearn.sd.judges.Judges.axes`), so every later stage reads them
from there.
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
TRAIN_STREAM, JUDGE_STREAM, HELD_STREAM = 7, 8, 9  # HELD_STREAM: held-out images of the training distribution


@dataclass(frozen=True)
class Axes:
    """The names a pipeline is asked to draw and the judges answer over: objects, and styles with
    `PHOTO` first.  Labels (`Images.objects`, `Images.styles`) are indices into them."""

    objects: tuple[str, ...]
    styles: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.objects or not self.styles or self.styles[0] != PHOTO:
            raise UnlearnError(f"axes need objects and styles with {PHOTO!r} first (got {len(self.objects)} objects, styles "
                               f"{', '.join(self.styles[:3])}...); give a canvas with Seed_Images and at least one style and object")
        for kind, names in (("object", self.objects), ("style", self.styles)):
            if len(set(names)) != len(names):
                raise UnlearnError(f"the {kind} axis names a class twice: {', '.join(names)}")

    def names(self, axis: str) -> tuple[str, ...]:
        return self.objects if axis == "object" else self.styles

    def index(self, axis: str, name: str) -> int:
        return self.names(axis).index(name)

    def cells(self) -> list[tuple[int, int]]:
        """Every (object, style) cell, object-major."""
        return [(o, s) for o in range(len(self.objects)) for s in range(len(self.styles))]

    def cell_of(self, labelled) -> torch.Tensor:
        """Each item's cell (anything with `objects` and `styles` indices: `Images`, an answer
        set) as an index into `cells()`."""
        return labelled.objects * len(self.styles) + labelled.styles

    def prompt(self, templates: Templates, cell: tuple[int, int]) -> str:
        return templates.prompt(self.objects[cell[0]], self.styles[cell[1]])

    def describe(self) -> str:
        """For error messages: the styles (photo left out) and the objects."""
        return f"styles {', '.join(self.styles[1:])}; objects {', '.join(self.objects)}"


WORLD = Axes(tuple(o.name for o in OBJECTS), (PHOTO, *STYLES))
OBJECT_AXIS, STYLE_AXIS = WORLD.objects, WORLD.styles  # the world's names (the renderer's indices)


def canvas_axes(root: str | Path) -> Axes:
    """The axes of a canvas folder: its objects and styles (Seed_Images as `PHOTO`, first).  The
    world's canvas keeps the world's order; any other is sorted, as UnlearnCanvas sorts its own."""
    canvas = read_canvas(root)
    objects = sorted(set(canvas.objects))
    styles = sorted({s for s in canvas.styles if s != SEED_IMAGES})
    if SEED_IMAGES not in canvas.styles:
        raise UnlearnError(f"the canvas at {root} has no {SEED_IMAGES}/ folder; the diffusion track needs the un-stylised photos of every object")
    if set(objects) == set(WORLD.objects) and set(styles) == set(WORLD.styles[1:]):
        return WORLD
    return Axes(tuple(objects), (PHOTO, *styles))


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

    def subset(self, keep: torch.Tensor) -> Images:
        return Images(self.pixels[keep], self.objects[keep], self.styles[keep])


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


def canvas_images(root: str | Path, size: int, axes: Axes) -> Images:
    """A canvas folder (UnlearnCanvas format) as Images at `size` px labelled on `axes`;
    Seed_Images is the photo style.  Every style and object must be one of the axes."""
    canvas = read_canvas(root)
    pix, objs, stys = [], [], []
    for path, style, obj in zip(canvas.paths, canvas.styles, canvas.objects):
        style = PHOTO if style == SEED_IMAGES else style
        if style not in axes.styles or obj not in axes.objects:
            raise UnlearnError(f"{path}: style {style!r} / object {obj!r} is not on the judges' axes ({axes.describe()}); "
                               "give a canvas of the judges' styles and objects (or re-run `dvc repro sd_judges` on this canvas)")
        with Image.open(path) as img:
            pix.append(np.asarray(img.convert("RGB").resize((size, size), Image.LANCZOS)))
        objs.append(axes.objects.index(obj))
        stys.append(axes.styles.index(style))
    return Images(torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).contiguous(), torch.tensor(objs), torch.tensor(stys))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images in [-1, 1] (N, 3, S, S) as PIL images."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
