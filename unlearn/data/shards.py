"""Shards in img2dataset's webdataset layout, written by the synthetic world, read by everyone.

Layout of an output folder (what `img2dataset --output_format webdataset` writes):
    00000.tar            KEY.jpg, KEY.txt (caption), KEY.json (per-sample metadata)
    00000.parquet        one row per sample: key, url, caption, status, error_message, size...
    00000_stats.json     count, successes, failed_to_*, status_dict, timings
Keys are the shard id (5 digits) followed by the sample's index in the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from unlearn.errors import UnlearnError

log = logging.getLogger(__name__)

META_COLUMNS = ("key", "url", "caption", "status", "error_message", "width", "height", "original_width", "original_height", "exif", "sha256")


@dataclass(frozen=True)
class Sample:
    key: str
    jpg: bytes
    caption: str
    meta: dict
    encoding: str = "utf-8"  # of the caption's bytes: utf-8, or cp1252/latin-1 when they were not UTF-8


def decode_caption(data: bytes) -> tuple[str, str]:
    """A caption's text and the encoding it was read with: UTF-8 when valid; else Windows-1252
    (what most web text that is not UTF-8 is: "Beyonc\xe9" is "Beyoncé"); else Latin-1, which
    reads any bytes."""
    for encoding in ("utf-8", "cp1252", "latin-1"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte string")


def sample_key(shard_id: int, index: int, samples_per_shard: int) -> str:
    digits = max(1, math.ceil(math.log10(samples_per_shard)))
    return f"{shard_id:05d}{index:0{digits}d}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed so that the same seed gives byte-identical shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(out_dir: Path, shard_id: int, samples: list[tuple[str, bytes, str, int, int]], samples_per_shard: int) -> dict:
    """Write one shard from (url, jpeg bytes, caption, width, height) tuples; return its stats."""
    rows = []
    with tarfile.open(out_dir / f"{shard_id:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, (url, jpg, caption, width, height) in enumerate(samples):
            key = sample_key(shard_id, index, samples_per_shard)
            meta = {
                "key": key, "url": url, "caption": caption, "status": "success", "error_message": None,
                "width": width, "height": height, "original_width": width, "original_height": height,
                "exif": None, "sha256": hashlib.sha256(jpg).hexdigest(),
            }
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            rows.append(meta)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
        ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
        ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()), ("sha256", pa.string()),
    ]))
    pq.write_table(table, out_dir / f"{shard_id:05d}.parquet")
    stats = {
        "count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
        "duration": 0.0, "start_time": 0.0, "end_time": 0.0, "status_dict": {"success": len(rows)},
        "generator": "unlearn.data.synthetic",
    }
    (out_dir / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=4, sort_keys=True))
    return stats


def list_shards(shard_dir: str | Path) -> list[Path]:
    d = Path(shard_dir)
    if not d.is_dir():
        raise UnlearnError(f"shard folder {d} does not exist: run the download stage (dvc repro download)")
    tars = sorted(d.glob("*.tar"))
    if not tars:
        raise UnlearnError(f"shard folder {d} holds no .tar shards: run the download stage or point data at a folder of img2dataset shards")
    return tars


def iter_shard(tar_path: Path, faults: dict | None = None) -> Iterator[Sample]:
    """Samples of one shard in stored order; a truncated or corrupt shard raises UnlearnError.

    A key stored twice keeps its first copy; the later members are skipped, logged with the key,
    and listed in ``faults["duplicate_keys"]`` when `faults` is given.  A caption that is not valid
    UTF-8 is read as Windows-1252 (`decode_caption`; curation counts such captions)."""
    group: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    duplicates: list[str] = []
    try:
        with tarfile.open(tar_path, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                f = tar.extractfile(member)
                if f is None:
                    continue
                if key not in group:
                    group[key] = {}
                    order.append(key)
                if ext in group[key]:
                    duplicates.append(key)
                    continue
                group[key][ext] = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UnlearnError(f"shard {tar_path} is truncated or corrupt ({e}); re-run the download stage") from None
    for key in dict.fromkeys(duplicates):
        log.warning("shard %s stores key %s twice: the later copy is skipped", tar_path, key)
    if faults is not None:
        faults.setdefault("duplicate_keys", []).extend(f"{tar_path.name}:{k}" for k in dict.fromkeys(duplicates))
    for key in order:
        parts = group[key]
        if "jpg" not in parts:
            continue
        try:
            meta = json.loads(parts["json"]) if "json" in parts else {}
        except ValueError:
            log.warning("shard %s: the metadata of %s is not JSON; it is ignored", tar_path, key)
            meta = {}
        caption, encoding = decode_caption(parts["txt"]) if "txt" in parts else (meta.get("caption", "") or "", "utf-8")
        yield Sample(key=key, jpg=parts["jpg"], caption=caption, meta=meta, encoding=encoding)


def iter_samples(shard_dir: str | Path) -> Iterator[Sample]:
    for tar_path in list_shards(shard_dir):
        yield from iter_shard(tar_path)


def count_successes(shard_dir: str | Path) -> int:
    """Total sample count from the `_stats.json` files (img2dataset's `successes`)."""
    total = 0
    for stats in sorted(Path(shard_dir).glob("*_stats.json")):
        total += int(json.loads(stats.read_text())["successes"])
    return total


def shard_contact_sheet(shard_dir: str | Path, path: str | Path, n: int = 48) -> None:
    """A PNG grid of the first `n` images of the shards, to see what was downloaded."""
    from itertools import islice

    from PIL import Image

    from unlearn.plots import image_grid

    image_grid([Image.open(io.BytesIO(s.jpg)) for s in islice(iter_samples(shard_dir), n)], path)
