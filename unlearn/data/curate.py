"""Forget and retain sets for one concept, cut from image-caption shards.

The forget set holds the pairs whose caption mentions the concept: a case-insensitive match on
word boundaries of its display name or an alias, where spaces, underscores and hyphens between
the words are interchangeable ("Elon Musk", "elon_musk.jpg", "ELON MUSK's car"), but "Elon
Muskrat" or "Elonmusk" are not the concept, and phrases listed under `exclude` ("Musk ox") are
taken out of a caption before it is matched.  The retain set, shared by every concept, is a seeded
sample of pairs whose captions mention no concept of the table.  Both are written as webdataset
tars with a manifest.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from unlearn.data.shards import Sample, iter_samples, iter_shard, list_shards
from unlearn.errors import UnlearnError
from unlearn.io import sha256_file, write_json

KINDS = ("identity", "object", "style")
MANIFEST = "manifest.json"
TAR = "00000.tar"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Concept:
    name: str
    kind: str
    aliases: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def slug(self) -> str:
        """A file-name form of the display name: "Elon Musk" -> "elon_musk"."""
        return re.sub(r"[^0-9a-z]+", "_", self.name.casefold()).strip("_") or "concept"

    @property
    def phrases(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def mentioned_in(self, caption: str) -> bool:
        if self.exclude:
            caption = _phrase_regex(self.exclude).sub(" ", caption)
        return _phrase_regex(self.phrases).search(caption) is not None


def _phrase_regex(phrases: tuple[str, ...]) -> re.Pattern:
    """Any of `phrases`, case-insensitive, not inside a longer word; the words of a phrase may be
    separated by spaces, underscores or hyphens."""
    alternatives = ["[\\s_\\-]+".join(re.escape(w) for w in re.split(r"[\s_\-]+", p.strip()) if w) for p in phrases]
    # [^\W_] is a letter or digit: the phrase may not continue a word on either side
    return re.compile(r"(?<![^\W_])(?:" + "|".join(alternatives) + r")(?![^\W_])", re.IGNORECASE)


def resolve_concept(name: str, table: dict) -> Concept:
    """The concept `name` from the params' concept table; unknown names get the closest ones."""
    if not isinstance(table, dict) or not table:
        raise UnlearnError("params.yaml has an empty concept table `concepts`; add the concept with its kind and aliases")
    entry = table.get(name)
    if entry is None:
        folded = {k.casefold(): k for k in table}
        close = difflib.get_close_matches(name.casefold(), list(folded), n=3, cutoff=0.5)
        hint = ", ".join(repr(folded[c]) for c in close) if close else "none"
        raise UnlearnError(f"concept {name!r} is not in the concept table; closest known: {hint}; "
                           f"all known (params.yaml `concepts`): {', '.join(table)}")
    entry = entry or {}
    kind = entry.get("kind")
    if kind not in KINDS:
        raise UnlearnError(f"concept {name!r} has kind {kind!r}; this pipeline handles kinds {', '.join(KINDS)}")
    unknown = set(entry) - {"kind", "aliases", "exclude"}
    if unknown:
        raise UnlearnError(f"concept {name!r} has unknown keys {', '.join(sorted(unknown))}; known keys: kind, aliases, exclude")
    return Concept(name, kind, tuple(entry.get("aliases") or ()), tuple(entry.get("exclude") or ()))


def table_concepts(table: dict) -> list[Concept]:
    """Every concept of the table (for `curate.solo`: the names a forget caption must not share)."""
    return [resolve_concept(name, table) for name in table]


def resolve_concepts(names: list, table: dict, key: str = "compare.concepts") -> list[Concept]:
    """A list of concepts from the table: non-empty, each known, none twice."""
    if not names:
        raise UnlearnError(f"{key} is empty; list the concepts in params.yaml")
    concepts = [resolve_concept(str(n), table) for n in names]
    seen = [c.slug for c in concepts]
    if len(set(seen)) != len(seen):
        raise UnlearnError(f"{key} names a concept twice: {', '.join(c.name for c in concepts)}")
    return concepts


def _row(sample: Sample, shard: str) -> dict:
    return {"key": sample.key, "caption": sample.caption, "shard": shard}


def _seeded_subset(rows: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
    """At most `n` rows chosen with `rng`, kept in their stored order."""
    if len(rows) <= n:
        return rows
    keep = np.sort(rng.choice(len(rows), size=n, replace=False))
    return [rows[int(i)] for i in keep]


def _write_set(shard_dir: Path, rows: list[dict], out_dir: Path, manifest: dict) -> dict:
    wanted = {r["key"] for r in rows}
    with wds.TarWriter(str(out_dir / TAR), mtime=0.0, user="unlearn", group="unlearn") as sink:
        for sample in iter_samples(shard_dir):
            if sample.key in wanted:
                sink.write({"__key__": sample.key, "jpg": sample.jpg, "txt": sample.caption, "json": sample.meta or {"key": sample.key}})
    manifest = manifest | {"count": len(rows), "samples": rows, "tar": TAR, "tar_sha256": sha256_file(out_dir / TAR)}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def curate_forget(shard_dir: str | Path, concept: Concept, forget_max: int, seed: int, forget_dir: Path,
                  solo_among: Sequence[Concept] = ()) -> dict:
    """Write the forget set of `concept` (the pairs whose caption mentions it, a seeded subset of
    at most `forget_max`); returns its manifest.  With `solo_among` (the other concepts of the
    table), a caption that also names one of them ("Keanu Reeves with a Mickey") is left out: its
    image carries the other concept's features into the forget gradient."""
    if forget_max < 1:
        raise UnlearnError(f"curate.forget_max is {forget_max}; it must be >= 1 (the committed default is 1000)")
    shard_dir = Path(shard_dir)
    forget: list[dict] = []
    shared = 0
    rivals = [c for c in solo_among if c.name != concept.name]
    for tar in list_shards(shard_dir):
        for sample in iter_shard(tar):
            if not concept.mentioned_in(sample.caption):
                continue
            if any(c.mentioned_in(sample.caption) for c in rivals):
                shared += 1
            else:
                forget.append(_row(sample, tar.name))
    if not forget:
        raise UnlearnError(f"no caption in {shard_dir} mentions concept {concept.name!r}{' alone' if shared else ''} "
                           f"(phrases: {', '.join(concept.phrases)}); add aliases or pick another concept")
    matched = len(forget)
    forget = _seeded_subset(forget, forget_max, np.random.default_rng(seed))
    f = _write_set(shard_dir, forget, forget_dir, {"concept": concept.name, "kind": concept.kind, "source": str(shard_dir), "seed": seed,
                                                   "set": "forget", "phrases": list(concept.phrases), "exclude": list(concept.exclude),
                                                   "matched": matched, "cap": forget_max, "solo": bool(rivals), "left_out_shared": shared})
    log.info("forget: %d of %d captions that mention %s", len(forget), matched, concept.name)
    return f


def curate_retain(shard_dir: str | Path, table: Sequence[Concept], retain_size: int, seed: int, retain_dir: Path) -> dict:
    """Write the retain set: a seeded sample of `retain_size` pairs whose captions mention no
    concept of the table (the reference's one LAION shard).  It depends on no target, so every
    concept, method and track shares it and its statistics (stage `retain_stats`)."""
    if retain_size < 1:
        raise UnlearnError(f"curate.retain_size is {retain_size}; it must be >= 1 (the committed default is 2000)")
    shard_dir = Path(shard_dir)
    others = [_row(sample, tar.name) for tar in list_shards(shard_dir) for sample in iter_shard(tar)
              if not any(c.mentioned_in(sample.caption) for c in table)]
    if not others:
        raise UnlearnError(f"every caption in {shard_dir} mentions a concept of the table: no retain pair; add data without them")
    retain = _seeded_subset(others, retain_size, np.random.default_rng([seed, 1]))
    r = _write_set(shard_dir, retain, retain_dir, {"concept": None, "source": str(shard_dir), "seed": seed, "set": "retain",
                                                   "excludes": sorted(c.name for c in table), "candidates": len(others), "size": retain_size})
    log.info("retain: %d of %d captions that mention no concept of the table", len(retain), len(others))
    return r


def read_manifest(set_dir: str | Path) -> dict:
    """A curated set's manifest, checked against its tar (a changed or truncated tar is an error)."""
    set_dir = Path(set_dir)
    path = set_dir / MANIFEST
    if not path.is_file() or not (set_dir / TAR).is_file():
        raise UnlearnError(f"{set_dir} is not a curated set ({MANIFEST} + {TAR} expected): run the curate stage")
    manifest = json.loads(path.read_text())
    if sha256_file(set_dir / TAR) != manifest.get("tar_sha256"):
        raise UnlearnError(f"{set_dir / TAR} does not match its manifest (changed or truncated); re-run the curate stage")
    return manifest
