"""The style x object canvas in UnlearnCanvas's folder format, and its reader.

    <dir>/<Style>/<Object>/<n>.jpg        n = 1, 2, ...; an underscore in a folder name stands for a space
    <dir>/Seed_Images/<Object>/<n>.jpg    the same objects without a style (photos)

On the default it is rendered from the world (every style of the world x every object, held-out
seeds: stream (seed, 6, ...)); on real data it is the UnlearnCanvas dataset folder, linked by
path (`data.laion.canvas_dir`).  The CLIP track reads its styled images as the evaluation set of
the `style` kind (zero-shot among the styles); the diffusion tracks read it as real images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unlearn.data.evalsets import LabelledImages
from unlearn.errors import UnlearnError

SEED_IMAGES = "Seed_Images"
SUFFIXES = (".jpg", ".jpeg", ".png")


def folder_name(name: str) -> str:
    """"Pixel Art" -> "Pixel_Art" (UnlearnCanvas's folder names have no spaces)."""
    return name.replace(" ", "_")


def display_name(folder: str) -> str:
    return folder.replace("_", " ")


@dataclass(frozen=True)
class Canvas:
    """Every image of a canvas folder with its style and object (display names)."""

    paths: list[Path]
    styles: list[str]   # SEED_IMAGES for an un-stylised image
    objects: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def style_names(self) -> list[str]:
        """The styles present, sorted, without Seed_Images."""
        return sorted({s for s in self.styles if s != SEED_IMAGES})

    @property
    def object_names(self) -> list[str]:
        return sorted(set(self.objects))

    def by_style(self) -> LabelledImages:
        """The stylised images labelled by style (Seed_Images left out): the `style` kind's set."""
        names = self.style_names
        keep = [i for i, s in enumerate(self.styles) if s != SEED_IMAGES]
        return LabelledImages([self.paths[i] for i in keep], [names.index(self.styles[i]) for i in keep], names)


def read_canvas(root: str | Path) -> Canvas:
    """Read `<root>/<Style>/<Object>/<n>.jpg`; a folder in any other shape is a one-line error."""
    root = Path(root)
    if not root.is_dir():
        raise UnlearnError(f"canvas folder not found at {root}: run the download stage, or point data.laion.canvas_dir at an "
                           f"UnlearnCanvas folder (<Style>/<Object>/<n>.jpg)")
    paths, styles, objects = [], [], []
    for style_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for object_dir in sorted(p for p in style_dir.iterdir() if p.is_dir()):
            for img in sorted(object_dir.iterdir(), key=lambda p: (len(p.stem), p.stem)):
                if img.suffix.lower() in SUFFIXES:
                    paths.append(img)
                    styles.append(style_dir.name if style_dir.name == SEED_IMAGES else display_name(style_dir.name))
                    objects.append(display_name(object_dir.name))
    if not paths:
        raise UnlearnError(f"no <Style>/<Object>/<n>.jpg image under {root}; point data.laion.canvas_dir at an UnlearnCanvas folder")
    canvas = Canvas(paths, styles, objects)
    if not canvas.style_names:
        raise UnlearnError(f"{root} holds only {SEED_IMAGES}: the canvas needs at least one style folder")
    return canvas
