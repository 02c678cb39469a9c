"""Forget and retain sets for one concept, cut from image-caption shards.

The forget set holds the pairs whose caption mentions the concept: a case-insensitive match on
word boundaries of its display name or an alias, where spaces, underscores and hyphens between
the words are interchangeable ("Elon Musk", "elon_musk.jpg", "ELON MUSK's car"), but "Elon
Muskrat" is not the concept, and phrases listed under `exclude` ("Musk ox") are taken out of a
caption before it is matched.  Accents, HTML entities, Unicode forms and typographic quotes do not
hide a mention; joined forms ("ElonMusk", "#elonmusk") count only with `curate.joined` (the rules
are in `unlearn.data.match`, and the forget manifest counts the captions per rule and per phrase).
The retain set, shared by every concept, is a seeded sample of pairs whose captions mention no
concept of the table (joined forms too when `curate.joined` is on).  Both are written as
webdataset tars with a manifest.
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

from unlearn.data.images import image_fault
from unlearn.data.match import RULES, Match, find, find_joined
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

    def match(self, caption: str, joined: bool = False) -> Match | None:
        """How `caption` names this concept (the rule and the phrase), or None."""
        return find(caption, self.phrases, self.exclude, joined)

    def mentioned_in(self, caption: str, joined: bool = False) -> bool:
        return self.match(caption, joined) is not None

    def joined_in(self, caption: str) -> bool:
        """Whether `caption` names this concept only in a joined form ("#ElonMusk")."""
        return find_joined(caption, self.phrases, self.exclude) is not None


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


def _image_skipped(sample: Sample, tar: Path, counts: dict) -> bool:
    """Whether the sample's image is unreadable (zero bytes, truncated...): then it is skipped and
    listed by key in ``counts["skipped_images"]``."""
    why = image_fault(sample.jpg)
    if why is not None:
        counts["skipped_images"][f"{tar.name}:{sample.key}"] = why
        log.warning("sample %s in %s is not a readable image (%s): skipped", sample.key, tar, why)
    return why is not None


def _caption_faults(sample: Sample, counts: dict) -> None:
    if not sample.caption.strip():
        counts["empty"] += 1
    if sample.encoding != "utf-8":
        counts["not_utf8"] += 1
        if counts["not_utf8"] <= 3:
            log.warning("caption of %s is not valid UTF-8: read as %s", sample.key, sample.encoding)


@dataclass
class ForgetSelection:
    """One concept's forget set as the scan selected it: its rows (a seeded subset), how many
    captions matched, how many were left out for naming another concept too, and the counts of
    the manifest's `match`."""
    rows: list[dict]
    matched: int
    shared: int
    stats: dict
    rivals: bool


def select_forget(shard_dir: str | Path, concepts: Sequence[Concept], forget_max: int, seed: int, solo_among: Sequence[Concept] = (),
                  joined: bool = False) -> tuple[dict[str, ForgetSelection], dict[str, Sample]]:
    """The forget set of every concept in `concepts`, in one scan of the shards (see
    `curate_forget`), and the selected samples by key (their image bytes and captions).  A
    concept that no caption mentions is an error."""
    if forget_max < 1:
        raise UnlearnError(f"curate.forget_max is {forget_max}; it must be >= 1 (the committed default is 1000)")
    shard_dir = Path(shard_dir)
    common = {"captions": 0, "empty": 0, "not_utf8": 0}  # the same for every concept: every caption is read once
    per = {c.name: {"rows": [], "shared": 0, "rivals": [r for r in solo_among if r.name != c.name],
                    "stats": {"joined_only": 0, "skipped_images": {}, "rules": dict.fromkeys(RULES if joined else RULES[:-1], 0),
                              "phrases": dict.fromkeys(c.phrases, 0)}} for c in concepts}
    samples: dict[str, Sample] = {}
    faults: dict = {}
    for tar in list_shards(shard_dir):
        for sample in iter_shard(tar, faults):
            common["captions"] += 1
            _caption_faults(sample, common)
            for c in concepts:
                state, stats = per[c.name], per[c.name]["stats"]
                m = c.match(sample.caption, joined)
                if m is None:
                    stats["joined_only"] += (not joined) and c.joined_in(sample.caption)
                    continue
                if any(r.mentioned_in(sample.caption, joined) for r in state["rivals"]):
                    state["shared"] += 1
                    continue
                if _image_skipped(sample, tar, stats):
                    continue
                stats["rules"][m.rule] += 1
                stats["phrases"][m.phrase] += 1
                state["rows"].append(_row(sample, tar.name))
                samples.setdefault(sample.key, sample)
    out = {}
    for c in concepts:
        state = per[c.name]
        stats = common | state["stats"] | ({"duplicate_keys": list(faults["duplicate_keys"])} if "duplicate_keys" in faults else {})
        if not state["rows"]:
            hint = (f"; {stats['joined_only']} caption(s) name it only joined (\"#ElonMusk\"): set curate.joined: true to count them"
                    if stats["joined_only"] else "")
            raise UnlearnError(f"no caption in {shard_dir} mentions concept {c.name!r}{' alone' if state['shared'] else ''} "
                               f"(phrases: {', '.join(c.phrases)}); add aliases or pick another concept{hint}")
        rows = _seeded_subset(state["rows"], forget_max, np.random.default_rng(seed))
        out[c.name] = ForgetSelection(rows, len(state["rows"]), state["shared"], stats | {"joined": joined}, bool(state["rivals"]))
    keep = {r["key"] for sel in out.values() for r in sel.rows}
    return out, {k: v for k, v in samples.items() if k in keep}


def curate_forget(shard_dir: str | Path, concept: Concept, forget_max: int, seed: int, forget_dir: Path,
                  solo_among: Sequence[Concept] = (), joined: bool = False) -> dict:
    """Write the forget set of `concept` (the pairs whose caption mentions it, a seeded subset of
    at most `forget_max`); returns its manifest.  With `solo_among` (the other concepts of the
    table), a caption that also names one of them ("Keanu Reeves with a Mickey") is left out: its
    image carries the other concept's features into the forget gradient.  With `joined`, joined
    forms ("#ElonMusk") count too.  The manifest's `match` says how the captions were matched:
    per rule and per phrase, how many captions only a joined form names, and how many captions
    were empty or not valid UTF-8.  Several concepts' sets in one scan: `select_forget`."""
    sel = select_forget(shard_dir, [concept], forget_max, seed, solo_among, joined)[0][concept.name]
    shard_dir = Path(shard_dir)
    f = _write_set(shard_dir, sel.rows, forget_dir, {"concept": concept.name, "kind": concept.kind, "source": str(shard_dir), "seed": seed,
                                                     "set": "forget", "phrases": list(concept.phrases), "exclude": list(concept.exclude),
                                                     "matched": sel.matched, "cap": forget_max, "solo": sel.rivals, "left_out_shared": sel.shared,
                                                     "match": sel.stats})
    log.info("forget: %d of %d captions that mention %s (rules: %s)", len(sel.rows), sel.matched, concept.name,
             ", ".join(f"{k} {v}" for k, v in sel.stats["rules"].items() if v))
    if sel.stats["joined_only"]:
        log.info("%d caption(s) name %s only in a joined form; curate.joined: true would add them", sel.stats["joined_only"], concept.name)
    return f


def curate_retain(shard_dir: str | Path, table: Sequence[Concept], retain_size: int, seed: int, retain_dir: Path,
                  joined: bool = False) -> dict:
    """Write the retain set: a seeded sample of `retain_size` pairs whose captions mention no
    concept of the table (the reference's one LAION shard).  With `joined` (param
    `curate.joined`, as for the forget sets) a joined form ("#ElonMusk") is a mention too and
    excludes the caption; without, the manifest counts the retain candidates that name a concept
    only so (`joined_only`; the default world's "Jeffbezos" captions are such traps, on anonymous
    faces).  It depends on no target, so every concept, method and track shares it and its
    statistics (stage `retain_stats`)."""
    if retain_size < 1:
        raise UnlearnError(f"curate.retain_size is {retain_size}; it must be >= 1 (the committed default is 2000)")
    shard_dir = Path(shard_dir)
    stats = {"captions": 0, "empty": 0, "not_utf8": 0, "joined": joined, "joined_only": 0, "skipped_images": {}}
    others = []
    for tar in list_shards(shard_dir):
        for sample in iter_shard(tar, stats):
            stats["captions"] += 1
            _caption_faults(sample, stats)
            if any(c.mentioned_in(sample.caption, joined) for c in table):
                continue
            stats["joined_only"] += (not joined) and any(c.joined_in(sample.caption) for c in table)
            if _image_skipped(sample, tar, stats):
                continue
            others.append(_row(sample, tar.name))
    if not others:
        raise UnlearnError(f"every caption in {shard_dir} mentions a concept of the table: no retain pair; add data without them")
    retain = _seeded_subset(others, retain_size, np.random.default_rng([seed, 1]))
    r = _write_set(shard_dir, retain, retain_dir, {"concept": None, "source": str(shard_dir), "seed": seed, "set": "retain",
                                                   "excludes": sorted(c.name for c in table), "candidates": len(others), "size": retain_size,
                                                   "match": stats})
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
