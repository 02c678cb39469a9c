"""FT: fine-tune on the retain set with the CLIP loss (forgetting by interference only)."""

from __future__ import annotations

from unlearn.methods.baselines import OnEpoch, TrainConfig, batches, train_loop
from unlearn.methods.registry import Context, Outcome, Pairs, register, run_training
from unlearn.models.adapter import Adapter


def finetune(adapter: Adapter, forget: Pairs, retain: Pairs, cfg: TrainConfig, on_epoch: OnEpoch | None = None) -> list[float]:
    """FT: fine-tune on the retain set with the CLIP loss (forgetting by interference only)."""
    return train_loop(adapter, "ft", cfg, lambda g: batches(retain, cfg.batch_size, g), lambda b: adapter.retain_loss(*b), on_epoch)


@register("ft", TrainConfig, "fine-tune on the retain set (CLIP loss)")
def run(ctx: Context, cfg: TrainConfig) -> Outcome:
    return run_training(ctx, lambda on_epoch: finetune(ctx.adapter, ctx.forget, ctx.retain, cfg, on_epoch))
