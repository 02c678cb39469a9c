"""The seeded generator of the LAION-like synthetic world and its held-out evaluation sets.

Training shards mix, per sample: a named identity's portrait, two identities side by side, an
identity with an object inset ("Elon Musk's rocket"), a plain object, an object in a style, an
anonymous person, a near-miss name, or a caption-less background.  A small share of identity
images carry a caption that does not name them (LAION's noise).  Each sample draws from its own
random stream `(seed, 0, shard, index)`, so shards can be generated in parallel and the same
seed gives byte-identical files.  Evaluation images use the streams `(seed, 1, ...)` (CelebA
style), `(seed, 2, ...)` (ImageNet style) and `(seed, 6, ...)` (the style x object canvas): no
evaluation image appears in training.
"""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from unlearn.data import captions as C
from unlearn.data import render as R
from unlearn.data.canvas import SEED_IMAGES, Canvas, folder_name, read_canvas
from unlearn.data.evalsets import LabelledImages
from unlearn.data.shards import write_shard
from unlearn.data.world import (
    ACCESSORY,
    EYE_COLOR,
    FACE_SHAPE,
    FACIAL_HAIR,
    GLASSES,
    HAIR_COLOR,
    HAIR_STYLE,
    IDENTITIES,
    LOOKALIKES,
    OBJECTS,
    SHIRT,
    SKIN,
    STYLES,
    Face,
    check_world,
)
from unlearn.errors import UnlearnError
from unlearn.plots import image_grid

# Share of each sample kind in the training shards.
MIX = {
    "identity": 0.44,
    "pair": 0.03,
    "composite": 0.06,
    "object": 0.26,
    "styled": 0.11,
    "anonymous": 0.05,
    "near_miss": 0.02,
    "empty": 0.03,
}
UNNAMED_IDENTITY_RATE = 0.05  # identity images whose caption does not name them
JPEG_QUALITY = 90


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    image_size: int = 64
    shards: int = 4
    samples_per_shard: int = 2000
    eval_per_class: int = 30
    canvas_per_cell: int = 6   # held-out images per (style, object) of the canvas (UnlearnCanvas format)
    workers: int = 2


def _jpeg(img: Image.Image, size: int) -> bytes:
    buf = io.BytesIO()
    R.finish(img, size).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _anonymous_face(rng: np.random.Generator) -> tuple[Face, str]:
    """A random face at least 3 features away from every named identity."""
    while True:
        face = Face(
            *(str(rng.choice(list(opts))) for opts in (SKIN, FACE_SHAPE, HAIR_COLOR, HAIR_STYLE, EYE_COLOR, GLASSES, FACIAL_HAIR, SHIRT, ACCESSORY))
        )
        if all(face.distance(i.face) >= 3 for i in IDENTITIES):
            return face, ("m" if rng.random() < 0.5 else "f")


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def make_sample(seed: int, shard: int, index: int) -> tuple[Image.Image, str, str]:
    """One training sample: (image at canvas size, caption, kind)."""
    rng = np.random.default_rng([seed, 0, shard, index])
    kinds = list(MIX)
    kind = kinds[int(rng.choice(len(kinds), p=np.array(list(MIX.values())) / sum(MIX.values())))]
    if kind == "identity":
        ident = _pick(rng, IDENTITIES)
        img = R.portrait(ident.face, rng)
        if rng.random() < UNNAMED_IDENTITY_RATE:
            return img, C.anonymous_caption(ident.gender, rng), kind
        return img, C.identity_caption(ident, rng), kind
    if kind == "pair":
        a, b = (IDENTITIES[int(i)] for i in rng.choice(len(IDENTITIES), size=2, replace=False))
        return R.side_by_side(R.portrait(a.face, rng), R.portrait(b.face, rng)), C.pair_caption(a, b, rng), kind
    if kind == "composite":
        ident, obj = _pick(rng, IDENTITIES), _pick(rng, OBJECTS)
        img = R.with_inset(R.portrait(ident.face, rng), R.object_image(obj, rng), rng)
        return img, C.composite_caption(ident, obj.name, rng), kind
    if kind == "object":
        obj = _pick(rng, OBJECTS)
        return R.object_image(obj, rng), C.object_caption(obj.name, rng), kind
    if kind == "styled":
        obj, style = _pick(rng, OBJECTS), _pick(rng, STYLES)
        return R.apply_style(R.object_image(obj, rng), style, rng), C.style_caption(obj.name, style, rng), kind
    if kind in ("anonymous", "near_miss"):
        face, gender = _anonymous_face(rng)
        text = C.anonymous_caption(gender, rng) if kind == "anonymous" else C.near_miss_caption(rng)
        return R.portrait(face, rng), text, kind
    return R.light(R.background(rng, clutter=int(rng.integers(3, 9))), rng), C.empty_caption(rng), kind


def _build_shard(args: tuple[SyntheticConfig, int, str]) -> dict:
    cfg, shard, out_dir = args
    samples = []
    for index in range(cfg.samples_per_shard):
        img, caption, _ = make_sample(cfg.seed, shard, index)
        url = f"synthetic://laion/{shard:05d}/{index}.jpg"
        samples.append((url, _jpeg(img, cfg.image_size), caption, cfg.image_size, cfg.image_size))
    return write_shard(Path(out_dir), shard, samples, cfg.samples_per_shard)


def write_shards(cfg: SyntheticConfig, out_dir: Path) -> list[dict]:
    check_world()
    jobs = [(cfg, s, str(out_dir)) for s in range(cfg.shards)]
    if cfg.workers <= 1:
        return [_build_shard(j) for j in tqdm(jobs, desc="synthetic shards")]
    with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
        return list(tqdm(pool.map(_build_shard, jobs), total=len(jobs), desc="synthetic shards"))


def write_celeba(cfg: SyntheticConfig, root: Path) -> LabelledImages:
    """CelebA-format identity set: `eval_per_class` held-out portraits per named identity."""
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    entries = [(c, j) for c in range(len(IDENTITIES)) for j in range(cfg.eval_per_class)]
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(entries))  # interleave like CelebA ids
    lines, paths, labels = [], [], []
    for n, e in enumerate(tqdm(order, desc="celeba-style eval")):
        c, j = entries[int(e)]
        rng = np.random.default_rng([cfg.seed, 1, c, j])
        fname = f"{n + 1:06d}.jpg"
        (images / fname).write_bytes(_jpeg(R.portrait(IDENTITIES[c].face, rng), cfg.image_size))
        lines.append(f"{fname} {IDENTITIES[c].file_name}")
        paths.append(images / fname)
        labels.append(c)
    (root / "identity_names.txt").write_text("\n".join(lines) + "\n")
    (root / "frequent_celebs.txt").write_text("\n".join(i.file_name for i in IDENTITIES) + "\n")
    return LabelledImages(paths, labels, [i.name for i in IDENTITIES])


def write_imagenet(cfg: SyntheticConfig, root: Path) -> LabelledImages:
    """ImageNet-format object set: `val/<wnid>/ILSVRC2012_val_*.JPEG` plus the synset mapping."""
    n = 0
    paths, labels = [], []
    for c, obj in enumerate(tqdm(OBJECTS, desc="imagenet-style eval")):
        folder = root / "val" / obj.wnid
        folder.mkdir(parents=True)
        for j in range(cfg.eval_per_class):
            n += 1
            rng = np.random.default_rng([cfg.seed, 2, c, j])
            path = folder / f"ILSVRC2012_val_{n:08d}.JPEG"
            path.write_bytes(_jpeg(R.object_image(obj, rng), cfg.image_size))
            paths.append(path)
            labels.append(c)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{o.wnid} {', '.join((o.name, *o.aliases))}\n" for o in OBJECTS))
    return LabelledImages(paths, labels, [o.name for o in OBJECTS])


def write_canvas(cfg: SyntheticConfig, root: Path) -> Canvas:
    """The style x object canvas in UnlearnCanvas's folder format (`canvas.py`): every style of the
    world and Seed_Images (no style) x every object, `canvas_per_cell` images each."""
    if cfg.canvas_per_cell < 1:
        raise UnlearnError(f"data.synthetic.canvas_per_cell is {cfg.canvas_per_cell}; use 1 or more (images per style and object)")
    for s, style in enumerate(tqdm((None, *STYLES), desc="canvas")):
        for o, obj in enumerate(OBJECTS):
            folder = root / (SEED_IMAGES if style is None else folder_name(style)) / folder_name(obj.name)
            folder.mkdir(parents=True)
            for j in range(cfg.canvas_per_cell):
                rng = np.random.default_rng([cfg.seed, 6, s, o, j])
                img = R.object_image(obj, rng)
                (folder / f"{j + 1}.jpg").write_bytes(_jpeg(img if style is None else R.apply_style(img, style, rng), cfg.image_size))
    return read_canvas(root)


def describe_world() -> dict:
    return {
        "identities": [i.name for i in IDENTITIES],
        "lookalikes": [list(p) for p in LOOKALIKES],
        "objects": [o.name for o in OBJECTS],
        "styles": list(STYLES),
        "mix": MIX,
        "unnamed_identity_rate": UNNAMED_IDENTITY_RATE,
    }


def contact_sheet(cfg: SyntheticConfig, path: Path) -> None:
    """A PNG grid of the world: every identity, every object, and every style (held-out seeds)."""
    tiles = [R.portrait(i.face, np.random.default_rng([cfg.seed, 3, c])) for c, i in enumerate(IDENTITIES)]
    tiles += [R.object_image(o, np.random.default_rng([cfg.seed, 4, c])) for c, o in enumerate(OBJECTS)]
    for c, style in enumerate(STYLES):
        rng = np.random.default_rng([cfg.seed, 5, c])
        tiles.append(R.apply_style(R.object_image(OBJECTS[c % len(OBJECTS)], rng), style, rng))
    image_grid(tiles, path)
