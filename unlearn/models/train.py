"""Contrastive (CLIP) training of a model on image-caption shards: the synthetic base model.
Talks to the model through the adapter protocol only."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from unlearn.data.pairs import pair_batches
from unlearn.errors import UnlearnError
from unlearn.models.adapter import Adapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 12
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0


def load_pairs(adapter: Adapter, shard_dir: str, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """All (preprocessed image, tokenized caption) pairs of the shards, in stored order."""
    batches = list(tqdm(pair_batches(shard_dir, adapter.preprocess, adapter.tokenize, batch_size), desc="decode shards"))
    if not batches:
        raise UnlearnError(f"no samples in {shard_dir}")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name and "logit_scale" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_contrastive(adapter: Adapter, images: torch.Tensor, tokens: torch.Tensor, cfg: TrainConfig) -> list[float]:
    """Train in place with the symmetric CLIP loss (the adapter's `retain_loss`), AdamW and a
    warmup-cosine schedule, exp(logit_scale) clamped to [1, 100] after every step; returns the
    mean loss of each epoch.  Any model family."""
    model = adapter.model
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    n = images.shape[0]
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / cfg.warmup_steps if s < cfg.warmup_steps else 0.5 * (1 + math.cos(math.pi * (s - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))
    )
    history = []
    bar = tqdm(total=total, desc="train CLIP")
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        losses = []
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            loss = adapter.retain_loss(images[idx], tokens[idx])
            if not torch.isfinite(loss):
                raise UnlearnError(f"training loss became {loss.item()} at epoch {epoch}; lower model.train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            adapter.clamp_logit_scale(100.0)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        history.append(sum(losses) / len(losses))
        log.info("epoch %d: mean loss %.4f", epoch, history[-1])
    bar.close()
    model.eval()
    return history
