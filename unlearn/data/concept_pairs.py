"""Several concepts' forget pairs as model inputs at once: each concept's set as curate selects
it and `load_pairs` reads it (the same tensors), from one scan of the shards and without writing
the sets (stage `concept_moments`, the benches that read every concept's pairs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from unlearn.data.curate import select_forget
from unlearn.data.pairs import sample_batches


def forget_pairs(adapter, shard_dir: str | Path, concepts: Sequence, forget_max: int, seed: int, solo_among=(), joined: bool = False,
                 batch_size: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every concept's forget pairs, as curate selects and `load_pairs` reads each forget set (the
    same tensors), from one scan of the shards (`select_forget`) and without writing them."""
    selected, samples = select_forget(shard_dir, concepts, forget_max, seed, solo_among, joined)
    out = {}
    for c in concepts:
        batches = list(sample_batches((samples[r["key"]] for r in selected[c.name].rows), shard_dir, adapter.preprocess, adapter.tokenize, batch_size))
        out[c.name] = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return out
