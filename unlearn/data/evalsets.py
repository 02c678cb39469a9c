"""Evaluation sets in their real on-disk formats, and their readers.

CelebA-style:   <dir>/img_align_celeba/NNNNNN.jpg
                <dir>/identity_names.txt     "NNNNNN.jpg First_Last" per line
                <dir>/frequent_celebs.txt    one First_Last per line (the identities to evaluate)
ImageNet-style: <dir>/val/<wnid>/ILSVRC2012_val_NNNNNNNN.JPEG
                <dir>/LOC_synset_mapping.txt "<wnid> name, other name" per line
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unlearn.errors import UnlearnError


@dataclass(frozen=True)
class LabelledImages:
    """Image paths with integer labels into `classnames` (display names, spaces not underscores)."""

    paths: list[Path]
    labels: list[int]
    classnames: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UnlearnError(f"{what} not found at {path}: run the download stage, or point the params at a folder in that format")
    return path


def read_celeba(root: str | Path) -> LabelledImages:
    root = Path(root)
    images = _need(root / "img_align_celeba", "CelebA image folder")
    mapping = _need(root / "identity_names.txt", "CelebA identity file")
    frequent_file = _need(root / "frequent_celebs.txt", "CelebA frequent-identity list")
    frequent = [line.strip() for line in frequent_file.read_text().splitlines() if line.strip()]
    index = {name: i for i, name in enumerate(frequent)}
    paths, labels = [], []
    for line in mapping.read_text().splitlines():
        if not line.strip():
            continue
        fname, name = line.split()
        if name in index:
            paths.append(images / fname)
            labels.append(index[name])
    if not paths:
        raise UnlearnError(f"no image in {mapping} belongs to an identity of {frequent_file}")
    return LabelledImages(paths, labels, [n.replace("_", " ") for n in frequent])


def read_imagenet(root: str | Path) -> LabelledImages:
    root = Path(root)
    val = _need(root / "val", "ImageNet val folder")
    synsets = _need(root / "LOC_synset_mapping.txt", "ImageNet synset mapping")
    wnids, names = [], []
    for line in synsets.read_text().splitlines():
        if line.strip():
            wnid, _, rest = line.partition(" ")
            wnids.append(wnid)
            names.append(rest.split(",")[0].strip())
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        folder = val / wnid
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in (".jpeg", ".jpg", ".png"):
                paths.append(p)
                labels.append(label)
    if not paths:
        raise UnlearnError(f"no images under {val} for the classes of {synsets}")
    return LabelledImages(paths, labels, names)
