"""The baselines SLUG is measured against (METHODS.md 2), as functions of (model adapter, forget
pairs, retain pairs, config) that edit the model in place: FT, GA, GA+FT, SalUn and SSD.

Training baselines call `on_epoch(epoch)` after every epoch (the caller evaluates there and
returns True to stop), so every method is judged by the same evaluator at the same points.
A non-finite loss stops the method with an UnlearnError naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from unlearn.errors import UnlearnError
from unlearn.models.openclip import ClipAdapter

Pairs = tuple[torch.Tensor, torch.Tensor]  # (preprocessed images, tokens)
OnEpoch = Callable[[int], bool]


class Diverged(UnlearnError):
    """A baseline's loss became NaN or inf: the run stops and is recorded as failed."""


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-5
    epochs: int = 5
    batch_size: int = 32
    weight_decay: float = 0.1
    alpha: float = 1.0  # weight of the retain loss in GA+FT and SalUn
    seed: int = 0


@dataclass(frozen=True)
class SSDConfig:
    alpha: float = 10.0       # select coordinates with imp_f > alpha * imp_r
    dampening: float = 1.0    # lambda: scale selected coordinates by min(1, lambda * imp_r / imp_f)
    batch_size: int = 32      # batches of the two importance passes


def _optimizer(adapter: ClipAdapter, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (0.9/0.98, eps 1e-6), weight decay on >= 2-d weights only (the reference setting)."""
    decay, rest = [], []
    for name, p in adapter.model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else rest).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def _batches(pairs: Pairs, batch_size: int, gen: torch.Generator):
    images, tokens = pairs
    order = torch.randperm(images.shape[0], generator=gen)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield images[idx], tokens[idx]


def _cycle(pairs: Pairs, batch_size: int, gen: torch.Generator):
    while True:
        yield from _batches(pairs, batch_size, gen)


def _train(adapter: ClipAdapter, name: str, cfg: TrainConfig, steps_of_epoch: Callable[[torch.Generator], list | object],
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


def finetune(adapter: ClipAdapter, forget: Pairs, retain: Pairs, cfg: TrainConfig, on_epoch: OnEpoch | None = None) -> list[float]:
    """FT: fine-tune on the retain set with the CLIP loss (forgetting by interference only)."""
    return _train(adapter, "ft", cfg, lambda g: _batches(retain, cfg.batch_size, g), lambda b: adapter.retain_loss(*b), on_epoch)


def gradient_ascent(adapter: ClipAdapter, forget: Pairs, retain: Pairs, cfg: TrainConfig, on_epoch: OnEpoch | None = None) -> list[float]:
    """GA: ascend the forget loss, i.e. minimise -L_f on the forget pairs."""
    return _train(adapter, "ga", cfg, lambda g: _batches(forget, cfg.batch_size, g), lambda b: -adapter.forget_loss(*b), on_epoch)


def _joint(forget: Pairs, retain: Pairs, batch_size: int):
    def steps(gen: torch.Generator):
        r = _cycle(retain, batch_size, gen)
        return ((f, next(r)) for f in _batches(forget, batch_size, gen))
    return steps


def ga_ft(adapter: ClipAdapter, forget: Pairs, retain: Pairs, cfg: TrainConfig, on_epoch: OnEpoch | None = None) -> list[float]:
    """GA+FT (GradDiff): the joint loss -L_f + alpha * L_r, one forget and one retain batch a step."""
    return _train(adapter, "ga_ft", cfg, _joint(forget, retain, cfg.batch_size),
                  lambda b: -adapter.forget_loss(*b[0]) + cfg.alpha * adapter.retain_loss(*b[1]), on_epoch)


def saliency_mask(forget_grads: dict[str, torch.Tensor], fraction: float = 0.5) -> dict[str, torch.Tensor]:
    """SalUn's mask: 1 where |grad L_f| is at least the global (1 - fraction) quantile over all
    tensors (the median for the top 50 %).  A coordinate whose gradient is exactly zero (unused
    token embeddings, say) is never salient, so the mask may hold less than `fraction`."""
    flat = torch.cat([g.abs().flatten() for g in forget_grads.values()])
    k = max(1, int(round(fraction * flat.numel())))
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    return {n: (g.abs() >= threshold) & (g != 0) for n, g in forget_grads.items()}


def salun(adapter: ClipAdapter, forget: Pairs, retain: Pairs, cfg: TrainConfig, mask: dict[str, torch.Tensor],
          on_epoch: OnEpoch | None = None) -> list[float]:
    """SalUn for CLIP: forget images paired with captions of retain pairs (random labelling) under
    the CLIP contrastive loss, plus alpha * L_r; only masked coordinates move.  The mask is
    enforced on the weights after every step, so neither weight decay nor Adam's momentum can move
    a masked-out coordinate (the public code's leak)."""
    params = dict(adapter.model.named_parameters())
    missing = sorted(set(params) - set(mask))
    if missing:
        raise UnlearnError(f"the SalUn mask lacks tensors {missing[:3]}; recompute it for this model")
    frozen = {n: p.detach().clone() for n, p in params.items()}
    masks = {n: mask[n].to(p.device) for n, p in params.items()}

    def restore() -> None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(torch.where(masks[n], p, frozen[n]))

    def relabelled(batch) -> torch.Tensor:
        (images, _), (r_images, r_tokens) = batch
        wrong = r_tokens[torch.randperm(r_tokens.shape[0])[: images.shape[0]]]
        if wrong.shape[0] < images.shape[0]:
            wrong = wrong.repeat((images.shape[0] + wrong.shape[0] - 1) // wrong.shape[0], 1)[: images.shape[0]]
        # random labelling, the CLIP way: a contrastive loss that makes each forget image pick its
        # wrong caption out of the batch (the analogue of cross-entropy on a random label)
        return adapter.retain_loss(images, wrong) + cfg.alpha * adapter.retain_loss(r_images, r_tokens)

    return _train(adapter, "salun", cfg, _joint(forget, retain, cfg.batch_size), relabelled, on_epoch, after_step=restore)


def squared_gradients(adapter: ClipAdapter, loss: Callable, pairs: Pairs, batch_size: int) -> dict[str, torch.Tensor]:
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
def ssd(adapter: ClipAdapter, imp_forget: dict[str, torch.Tensor], imp_retain: dict[str, torch.Tensor], alpha: float = 10.0,
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
