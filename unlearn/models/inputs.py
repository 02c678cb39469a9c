"""The second moments of the inputs each editable tensor multiplies, over a data set (for SLUG's
retain-preconditioned step, docs/methods.md "The edit direction").

Family-independent: the adapter runs its towers and reports each tensor's input
(`Adapter.feed_inputs`); this module sums x x^T per tensor (x_hat^2 for a LayerNorm weight) over
every position of every pair.  Data-parallel under torchrun (`unlearn.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from unlearn import distributed
from unlearn.errors import UnlearnError
from unlearn.models.adapter import Adapter


@torch.no_grad()
def input_moments(adapter: Adapter, layers: Sequence[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], int]:
    """E[x x^T] (float64) of the input x that each tensor in `layers` multiplies, over every
    position (token) of every pair in `batches` ((images, tokens)); E[x_hat^2] for a LayerNorm
    weight; for an embedding table (layout `rows`) the diagonal of E[x x^T] of the one-hot
    tokens, each token's frequency over every position (padding included).  A tower runs only when one of its tensors is asked for.  Returns the moments and the
    number of pairs."""
    layouts = {name: adapter.input_layout(name) for name in layers}
    table_rows = {name: p.shape[0] for name, p in adapter.model.named_parameters() if name in layouts and layouts[name] == "rows"}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def add(name: str, x: torch.Tensor) -> None:
        if layouts[name] == "rows":  # token ids: E[x x^T] of their one-hot vectors is diagonal, the tokens' frequencies
            ids = x.detach().reshape(-1)
            m = torch.bincount(ids, minlength=table_rows[name]).double()
            sums[name] = sums[name] + m if name in sums else m
            rows[name] = rows.get(name, 0) + ids.numel()
            return
        x = x.detach().reshape(-1, x.shape[-1]).double()
        m = (x * x).sum(0) if layouts[name] == "scale" else x.T @ x
        sums[name] = sums[name] + m if name in sums else m
        rows[name] = rows.get(name, 0) + x.shape[0]

    count = adapter.feed_inputs(list(layers), distributed.my_slice(batches), add)
    distributed.check_every_rank_has_data(count, "retain input moments")
    if count == 0:
        raise UnlearnError("the retain set is empty: no input statistics for the preconditioned step")
    missing = [n for n in layers if n not in sums]
    if missing:
        raise UnlearnError(f"no input of {missing[:3]} was seen in a forward pass; set slug.search.direction=gradient for these tensors")
    if distributed.active():
        counts = torch.tensor([count, *(rows[n] for n in layers)], dtype=torch.float64, device=next(iter(sums.values())).device)
        distributed.all_reduce_sum([*(sums[n] for n in layers), counts])
        count, rows = int(counts[0].item()), {n: int(c) for n, c in zip(layers, counts[1:].tolist())}
    return {n: sums[n] / rows[n] for n in layers}, count
