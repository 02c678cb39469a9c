"""The gradient of a set-mean loss over a data set, family-independent (the adapter gives the
loss).  Data-parallel under torchrun (`unlearn.distributed`): each rank sums its slice of the
batches in float64 and the sums are all-reduced."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm

from unlearn import distributed
from unlearn.errors import UnlearnError
from unlearn.models.adapter import Adapter


def mean_gradient(adapter: Adapter, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]], desc: str | None = None) -> tuple[dict[str, torch.Tensor], int, float]:
    """The gradient of the set-mean loss, from batch-mean losses: each batch's gradient (zeroed
    before it) is weighted by its size, the sum divided by the set size.  Returns (gradient per
    parameter, set size, mean loss)."""
    model = adapter.model
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count, loss_sum = 0, 0.0
    show = desc is not None and distributed.rank() == 0
    for images, tokens in tqdm(distributed.my_slice(batches), desc=desc, disable=not show):
        model.zero_grad(set_to_none=True)
        value = loss(images, tokens)
        if not torch.isfinite(value):
            raise UnlearnError(f"{desc or 'loss'} is {value.item()} on a batch: check the data (corrupt images?) and the model weights")
        value.backward()
        b = images.shape[0]
        for n, p in params.items():
            if p.grad is not None:
                total[n] += b * p.grad.double()
        count += b
        loss_sum += b * float(value.detach())
    model.zero_grad(set_to_none=True)
    distributed.check_every_rank_has_data(count, desc or "gradient pass")
    scalars = torch.tensor([count, loss_sum], dtype=torch.float64, device=next(iter(total.values())).device if total else "cpu")
    distributed.all_reduce_sum([*total.values(), scalars])
    count, loss_sum = int(scalars[0].item()), float(scalars[1].item())
    if count == 0:
        raise UnlearnError(f"{desc or 'gradient pass'}: the set is empty")
    grads = {n: (g / count).float().contiguous().cpu() for n, g in total.items()}
    for n, g in grads.items():
        if not torch.isfinite(g).all():
            raise UnlearnError(f"{desc or 'gradient'} of {n} has NaN or inf entries: check the data and the model weights")
    return grads, count, loss_sum / count
