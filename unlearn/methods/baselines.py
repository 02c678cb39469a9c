"""What the training baselines share (docs/methods.md, "Baselines"): their config, the AdamW
optimiser, the batching, and the one training loop.  Each baseline is its own file (ft.py, ga.py,
ga_ft.py, salun.py, ssd.py) that registers itself.

Training baselines call `on_epoch(epoch)` after every epoch (the caller evaluates there and
returns True to stop), so every method is judged by the same evaluator at the same points.
A non-finite loss stops the method with `Diverged`, which the registry records as failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from unlearn.methods.registry import Diverged, Pairs
from unlearn.models.adapter import Adapter

OnEpoch = Callable[[int], bool]


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-5
    epochs: int = 5
    batch_size: int = 32
    weight_decay: float = 0.1
    alpha: float = 1.0  # weight of the retain loss in GA+FT and SalUn
    seed: int = 0

    # checked by as_config (unlearn/ranges.py): lr 0 or epochs 0 would train nothing and report the base model as unlearned
    RANGES: ClassVar[dict[str, str]] = {"lr": "> 0", "epochs": "> 0", "batch_size": "> 0", "weight_decay": ">= 0", "alpha": ">= 0"}


def _optimizer(adapter: Adapter, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (0.9/0.98, eps 1e-6), weight decay on >= 2-d weights only (the reference setting)."""
    decay, rest = [], []
    for name, p in adapter.model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else rest).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def batches(pairs: Pairs, batch_size: int, gen: torch.Generator):
    images, tokens = pairs
    order = torch.randperm(images.shape[0], generator=gen)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield images[idx], tokens[idx]


def cycle(pairs: Pairs, batch_size: int, gen: torch.Generator):
    while True:
        yield from batches(pairs, batch_size, gen)


def train_loop(adapter: Adapter, name: str, cfg: TrainConfig, steps_of_epoch: Callable[[torch.Generator], list | object],
           loss_of: Callable[[tuple], torch.Tensor], on_epoch: OnEpoch | None, after_step: Callable[[], None] | None = None) -> list[float]:
    """The one training loop of every baseline: AdamW steps over `steps_of_epoch(gen)`."""
    model = adapter.model
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = _optimizer(adapter, cfg)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        losses = []
        for batch in steps_of_epoch(gen):
            loss = loss_of(batch)
            if not torch.isfinite(loss):
                model.eval()
                raise Diverged(f"{name} diverged: loss {loss.item()} at epoch {epoch}; lower its learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
        model.eval()
        history.append(sum(losses) / max(1, len(losses)))
        if on_epoch is not None and on_epoch(epoch):
            break
    return history


def joint(forget: Pairs, retain: Pairs, batch_size: int):
    def steps(gen: torch.Generator):
        r = cycle(retain, batch_size, gen)
        return ((f, next(r)) for f in batches(forget, batch_size, gen))
    return steps
