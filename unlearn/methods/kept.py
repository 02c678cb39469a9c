"""The kept set's input moments: SLUG's retain-preconditioned step g_f (C + lam I)^-1 with C the
input moments of the retain pairs pooled with those of the pairs of every concept of the table
that is not being removed (docs/methods.md, "The kept moments").

The retain set holds pairs that name no concept of the table, so the shared moments C_r say
nothing about the inputs of the other identities, objects and styles, exactly what the guard
and the retain figures measure.  The kept moments add them: every pair counted once,

    C_kept = (n_r C_r + n_k C_k) / (n_r + n_k),   C_k over the pairs of the concepts that stay.

They are computed from one pass over every concept's pairs (stage `concept_moments`, once per
model and table, `TableMoments`) less the target's own pairs (`moments_without`), which the
search reads for the layers it plans only (`TableMoments.kept_source`): a per-concept cost of one
forward pass over the forget set, with no backward.  `forget_many`'s kept mode removes several
concepts at once the same way (`KeptMoments.without`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from unlearn.errors import UnlearnError
from unlearn.io import read_hashed_tensors, sha256_file
from unlearn.methods.retain_stats import RetainStats
from unlearn.models.adapter import Adapter, check_made_for, fingerprint

MOMENTS, SIDECAR = "moments.safetensors", "sidecar.json"
FIX = "re-run `dvc repro concept_moments`"
Pairs = tuple[torch.Tensor, torch.Tensor]


def pool_moments(retain: dict[str, torch.Tensor], n_retain: int, kept: dict[str, torch.Tensor], n_kept: int) -> dict[str, torch.Tensor]:
    """The input moments of the retain pairs and the kept concepts' pairs together, each pair
    counted once: (n_retain C_retain + n_kept C_kept) / (n_retain + n_kept) per tensor (a pair
    gives every tensor the same number of rows, so this is the moment over the union's rows)."""
    if n_retain < 1 or n_kept < 1 or set(retain) != set(kept):
        raise ValueError(f"pool_moments needs pairs on both sides and the same tensors (retain {n_retain}, kept {n_kept})")
    w = n_kept / (n_retain + n_kept)
    return {n: (1 - w) * retain[n] + w * kept[n].to(retain[n]) for n in retain}


def moments_without(every: dict[str, torch.Tensor], n_every: int, part: dict[str, torch.Tensor], n_part: int) -> dict[str, torch.Tensor]:
    """The input moments of a concatenation of pairs less one part of it (`part`'s moments over its
    `n_part` pairs): (n_every C_every - n_part C_part) / (n_every - n_part) per tensor, so the
    kept set of every concept but one costs one pass over that concept's pairs."""
    if not 0 < n_part < n_every or set(every) != set(part):
        raise ValueError(f"moments_without needs a part of the pairs and the same tensors (every {n_every}, part {n_part})")
    return {n: (n_every * every[n] - n_part * part[n].to(every[n])) / (n_every - n_part) for n in every}


def pairs_digest(pairs: Pairs) -> str:
    """sha256 of a pair set's preprocessed images and tokens: which pairs a concept's moments hold."""
    h = hashlib.sha256()
    for t in pairs:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class KeptMoments:
    """The input moments of every concept's pairs (`pairs`: name -> (images, tokens), as curate
    selects each forget set), read in one pass; `without(names)` gives those of all but the named
    concepts' pairs at the cost of one pass over theirs (`moments_without`): the kept set of a
    removal, for the kept mode (every k), stage `concept_moments` and `bench/kept_moments.py`."""

    def __init__(self, adapter: Adapter, layers: Sequence[str], pairs: dict[str, Pairs], batch_size: int):
        self.adapter, self.layers, self.pairs, self.batch_size = adapter, list(layers), pairs, batch_size
        self.every, self.n_every = self._moments(list(pairs))

    def _moments(self, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], int]:
        from unlearn.methods.registry import chunks
        from unlearn.models.inputs import input_moments

        union = tuple(torch.cat([self.pairs[n][j] for n in names]) for j in (0, 1))
        return input_moments(self.adapter, self.layers, chunks(union, self.batch_size))

    def without(self, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], int]:
        """The moments of every concept's pairs but those of `names`, and their pair count."""
        unknown = [n for n in names if n not in self.pairs]
        if unknown:
            raise ValueError(f"KeptMoments has no pairs for {unknown}")
        part, n_part = self._moments(names)
        return moments_without(self.every, self.n_every, part, n_part), self.n_every - n_part


@dataclass(frozen=True)
class TableMoments:
    """The moments of every concept's pairs of the table (float64, CPU), their pair count, and per
    concept its pair count and `pairs_digest` (so a forget set is matched to its own part)."""
    every: dict[str, torch.Tensor]
    n_every: int
    concepts: dict[str, dict]

    def kept_source(self, adapter: Adapter, retain: RetainStats, concept: str, own: Pairs, batch_size: int,
                    where: str = "the forget set") -> Callable[[Sequence[str]], dict[str, torch.Tensor]]:
        """The kept moments of `concept` (the retain moments pooled with every other concept's),
        for the layers the search asks for: `own` are the concept's forget pairs, checked against
        the pairs the table holds for it, and read once per call for the asked layers only."""
        if concept not in self.concepts:
            raise UnlearnError(f"the concept moments hold no pairs of {concept!r} (they cover {len(self.concepts)} concepts of another table); {FIX}")
        if pairs_digest(own) != self.concepts[concept]["digest"]:
            raise UnlearnError(f"{where} of {concept} is not the pair set the concept moments hold for it (another curation); {FIX}")

        def source(layers: Sequence[str]) -> dict[str, torch.Tensor]:
            from unlearn.methods.registry import chunks
            from unlearn.models.inputs import input_moments

            layers = list(layers)
            lacking = [n for n in layers if n not in self.every or n not in retain.moments]
            if lacking:
                raise UnlearnError(f"the retain or concept moments hold no input moments of {lacking[:3]}; re-run `dvc repro retain_stats concept_moments`")
            part, n_part = input_moments(adapter, layers, chunks(own, batch_size))
            kept = moments_without({n: self.every[n] for n in layers}, self.n_every, part, n_part)
            return pool_moments({n: retain.moments[n] for n in layers}, retain.n_retain, kept, self.n_every - n_part)

        return source


def compute_table_moments(adapter: Adapter, layers: Sequence[str], pairs: dict[str, Pairs], batch_size: int) -> TableMoments:
    """One pass over every concept's pairs (in the order of `pairs`)."""
    table = KeptMoments(adapter, layers, pairs, batch_size)
    return TableMoments({k: v.cpu().contiguous() for k, v in table.every.items()}, table.n_every,
                        {n: {"pairs": int(p[0].shape[0]), "digest": pairs_digest(p)} for n, p in pairs.items()})


def save_table_moments(directory: Path, table: TableMoments, model_dir: str | Path, family: str, batch_size: int) -> dict:
    safetensors.torch.save_file(table.every, directory / MOMENTS)
    sidecar = {"family": family, "model_sha256": fingerprint(model_dir), "n_every": table.n_every, "batch_size": batch_size,
               "concepts": table.concepts, "moment_tensors": len(table.every), "files": {MOMENTS: sha256_file(directory / MOMENTS)}}
    (directory / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return sidecar


def load_table_moments(directory: str | Path, model_dir: str | Path) -> TableMoments:
    """The moments in `directory`, checked: present, unchanged (their hash), made for the model in
    `model_dir`, finite.  Any mismatch is a one-line error."""
    directory = Path(directory)
    sidecar, tensors = read_hashed_tensors(directory, SIDECAR, (MOMENTS,), lambda s: s["files"], "concept moments", FIX)
    try:
        n_every, concepts = int(sidecar["n_every"]), dict(sidecar["concepts"])
    except (ValueError, KeyError, TypeError) as e:
        raise UnlearnError(f"{directory / SIDECAR} is not a concept moments record ({type(e).__name__}: {e}); {FIX}") from None
    check_made_for(f"concept moments in {directory}", sidecar, model_dir, FIX)
    return TableMoments(tensors[MOMENTS], n_every, concepts)
