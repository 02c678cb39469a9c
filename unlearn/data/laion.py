"""The real data path: img2dataset over LAION parquet metadata (URL and TEXT columns), written in
the same webdataset layout as the synthetic shards; and linking real CelebA / ImageNet folders
into the evaluation-set layout."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from unlearn.data.canvas import read_canvas
from unlearn.data.evalsets import read_celeba, read_imagenet
from unlearn.errors import UnlearnError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home


@dataclass(frozen=True)
class LaionConfig:
    parquet_dir: str
    shards: int = 1  # how many input parquet files (sorted by name) to download
    samples_per_shard: int = 10000
    image_size: int = 224
    resize_mode: str = "border"
    processes: int = 2
    threads: int = 16
    timeout: int = 10
    retries: int = 0


def input_parquets(cfg: LaionConfig) -> list[Path]:
    folder = Path(cfg.parquet_dir)
    if not folder.is_dir():
        raise UnlearnError(f"LAION parquet folder {folder} not found: set data.laion.parquet_dir to a folder of LAION-400M metadata .parquet files")
    files = sorted(folder.glob("*.parquet"))[: cfg.shards]
    if not files:
        raise UnlearnError(f"no .parquet file in {folder}: download LAION-400M metadata parquet files there")
    for f in files:
        try:
            names = set(pq.read_schema(f).names)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise UnlearnError(f"{f} is not a readable parquet file ({type(e).__name__}); replace it") from None
        if not {"URL", "TEXT"} <= names:
            raise UnlearnError(f"{f} lacks the URL/TEXT columns (has: {', '.join(sorted(names))}); use LAION metadata parquet files")
    return files


def download_laion(cfg: LaionConfig, out_dir: Path) -> None:
    """Run img2dataset into `out_dir` (which must be empty); failures are counted in the stats."""
    files = input_parquets(cfg)
    from img2dataset import download

    with tempfile.TemporaryDirectory(prefix="laion-input-") as tmp:
        for f in files:
            os.symlink(f.resolve(), Path(tmp) / f.name)
        download(
            url_list=tmp,
            input_format="parquet",
            url_col="URL",
            caption_col="TEXT",
            output_format="webdataset",
            output_folder=str(out_dir),
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            number_sample_per_shard=cfg.samples_per_shard,
            timeout=cfg.timeout,
            retries=cfg.retries,
            enable_wandb=False,
            distributor="multiprocessing",
            encode_format="jpg",
        )
    if not list(out_dir.glob("*.tar")):
        raise UnlearnError(f"img2dataset wrote no shard from {cfg.parquet_dir}: check the URLs and the network")


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy, across file systems) every file of `src` under `dst`."""
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def link_eval_sets(celeba_dir: str, imagenet_dir: str, out_dir: Path, canvas_dir: str | None = None) -> dict:
    """Check real CelebA / ImageNet (and, if given, UnlearnCanvas) folders are in the expected
    formats and link them in.  Without a canvas folder no concept of the `style` kind can be
    evaluated (the stages that need it say so)."""
    celeba, imagenet = read_celeba(celeba_dir), read_imagenet(imagenet_dir)
    canvas = read_canvas(canvas_dir) if canvas_dir else None
    _link_tree(Path(celeba_dir), out_dir / "celeba")
    _link_tree(Path(imagenet_dir), out_dir / "imagenet")
    if canvas_dir:
        _link_tree(Path(canvas_dir), out_dir / "canvas")
    return {"celeba_images": len(celeba), "imagenet_images": len(imagenet), "canvas_images": len(canvas) if canvas else 0}
