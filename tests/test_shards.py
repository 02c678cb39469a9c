import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import TINY
from unlearn.data import synthetic as S
from unlearn.data.shards import count_successes, iter_samples, iter_shard, list_shards
from unlearn.errors import UnlearnError


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_gives_byte_identical_shards(tmp_path):
    cfg = S.SyntheticConfig(seed=11, shards=2, samples_per_shard=25, workers=1)
    for name, c in (("a", cfg), ("b", S.SyntheticConfig(**{**cfg.__dict__, "workers": 2})), ("c", S.SyntheticConfig(**{**cfg.__dict__, "seed": 12}))):
        (tmp_path / name).mkdir()
        S.write_shards(c, tmp_path / name)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b, "worker count must not change a single byte"
    assert set(a) == {"00000.tar", "00000.parquet", "00000_stats.json", "00001.tar", "00001.parquet", "00001_stats.json"}
    assert a["00000.tar"] != c["00000.tar"]


def test_img2dataset_layout(tiny_world):
    shard_dir = tiny_world / "laion"
    for tar in list_shards(shard_dir):
        stem = tar.stem
        stats = json.loads((shard_dir / f"{stem}_stats.json").read_text())
        table = pq.read_table(shard_dir / f"{stem}.parquet").to_pylist()
        samples = list(iter_shard(tar))
        assert stats["successes"] == stats["count"] == len(table) == len(samples) == TINY.samples_per_shard
        with tarfile.open(tar) as t:
            names = t.getnames()
        assert names[:3] == [f"{stem}00.jpg", f"{stem}00.txt", f"{stem}00.json"]
        for row, s in zip(table, samples):
            assert row["key"] == s.key == s.meta["key"] and s.key.startswith(stem)
            assert row["caption"] == s.caption and row["status"] == "success"
            assert Image.open(io.BytesIO(s.jpg)).size == (TINY.image_size, TINY.image_size)
    assert count_successes(shard_dir) == TINY.shards * TINY.samples_per_shard


def test_shards_read_by_webdataset(tiny_world):
    urls = [str(p) for p in list_shards(tiny_world / "laion")]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pilrgb").to_tuple("jpg", "txt", "json")
    items = list(ds)
    assert len(items) == TINY.shards * TINY.samples_per_shard
    img, txt, meta = items[0]
    assert img.size == (64, 64) and isinstance(txt, str) and meta["caption"] == txt


def test_shards_read_by_open_clip_data_pipeline(tiny_world):
    from argparse import Namespace

    import open_clip
    from open_clip_train.data import get_wds_dataset

    from unlearn.models.openclip import TINY_ARCH

    _, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH)
    tok = open_clip.get_tokenizer(TINY_ARCH)
    n = TINY.shards * TINY.samples_per_shard
    args = Namespace(val_data=str(tiny_world / "laion" / "{00000..00001}.tar"), val_num_samples=n, batch_size=16, workers=0, world_size=1, train_data=None, seed=0)
    info = get_wds_dataset(args, preprocess, is_train=False, tokenizer=tok)
    seen = 0
    for images, texts in info.dataloader:
        assert images.shape[1:] == (3, 64, 64) and texts.shape[1] == 24
        seen += images.shape[0]
    assert seen == n


def test_truncated_shard_is_a_clear_error(tiny_world, tmp_path):
    src = list_shards(tiny_world / "laion")[0]
    bad = tmp_path / "00000.tar"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2 + 100])
    with pytest.raises(UnlearnError, match="truncated or corrupt"):
        list(iter_samples(tmp_path))


def test_empty_or_missing_shard_folder(tmp_path):
    with pytest.raises(UnlearnError, match="holds no .tar"):
        list_shards(tmp_path)
    with pytest.raises(UnlearnError, match="does not exist"):
        list_shards(tmp_path / "nope")
