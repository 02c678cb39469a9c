"""SSD, selective synaptic dampening (docs/methods.md, "Baselines"): importances are mean squared
gradients on the forget and the retain set; coordinates much more important to the forget set
are scaled down.  One shot, no training."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from unlearn.errors import UnlearnError
from unlearn.methods.registry import Context, Outcome, Pairs, register
from unlearn.models.adapter import Adapter


@dataclass(frozen=True)
class SSDConfig:
    alpha: float = 10.0       # select coordinates with imp_f > alpha * imp_r
    dampening: float = 1.0    # lambda: scale selected coordinates by min(1, lambda * imp_r / imp_f)
    batch_size: int = 32      # batches of the two importance passes

    RANGES: ClassVar[dict[str, str]] = {"alpha": "> 0", "dampening": ">= 0", "batch_size": "> 0"}  # checked by as_config


def squared_gradients(adapter: Adapter, loss: Callable, pairs: Pairs, batch_size: int) -> dict[str, torch.Tensor]:
    """Mean over batches (weighted by size) of the squared gradient: SSD's importance."""
    model = adapter.model
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    images, tokens = pairs
    n = images.shape[0]
    for s in range(0, n, batch_size):
        model.zero_grad(set_to_none=True)
        value = loss(images[s : s + batch_size], tokens[s : s + batch_size])
        if not torch.isfinite(value):
            raise UnlearnError(f"SSD importance: the loss is {value.item()}; check the data and the weights")
        value.backward()
        b = min(batch_size, n - s)
        for name, p in params.items():
            if p.grad is not None:
                total[name] += b * p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {name: t / n for name, t in total.items()}


@torch.no_grad()
def ssd(adapter: Adapter, imp_forget: dict[str, torch.Tensor], imp_retain: dict[str, torch.Tensor], alpha: float = 10.0,
        dampening: float = 1.0) -> int:
    """Selective synaptic dampening: where imp_f > alpha * imp_r, scale theta by
    min(1, dampening * imp_r / imp_f).  Returns the number of coordinates selected."""
    selected = 0
    for name, p in adapter.model.named_parameters():
        f, r = imp_forget[name].to(p), imp_retain[name].to(p)
        chosen = f > alpha * r
        factor = torch.clamp(dampening * r / torch.where(chosen, f, torch.ones_like(f)), max=1.0)
        p.mul_(torch.where(chosen, factor, torch.ones_like(p)))
        selected += int(chosen.sum())
    return selected


@register("ssd", SSDConfig, "selective synaptic dampening (one shot)")
def run(ctx: Context, cfg: SSDConfig) -> Outcome:
    t0 = time.perf_counter()
    imp_f = squared_gradients(ctx.adapter, ctx.adapter.forget_loss, ctx.forget, cfg.batch_size)
    imp_r = squared_gradients(ctx.adapter, ctx.adapter.retain_loss, ctx.retain, cfg.batch_size)
    selected = ssd(ctx.adapter, imp_f, imp_r, cfg.alpha, cfg.dampening)
    t1 = time.perf_counter()
    result = ctx.evaluator.evaluate()
    t2 = time.perf_counter()
    return Outcome("ok" if result["forget_top1"] <= 0.0 else "not_forgotten", {"unlearn": round(t1 - t0, 3), "eval": round(t2 - t1, 3)},
                   epochs=[{"epoch": 1, "train_s": round(t1 - t0, 3), **result}], details={"selected": selected})
