"""GA: gradient ascent on the forget loss over the forget pairs."""

from __future__ import annotations

from unlearn.methods.baselines import OnEpoch, TrainConfig, batches, train_loop
from unlearn.methods.registry import Context, Outcome, Pairs, register, run_training
from unlearn.models.adapter import Adapter


def gradient_ascent(adapter: Adapter, forget: Pairs, retain: Pairs, cfg: TrainConfig, on_epoch: OnEpoch | None = None) -> list[float]:
    """GA: ascend the forget loss, i.e. minimise -L_f on the forget pairs."""
    return train_loop(adapter, "ga", cfg, lambda g: batches(forget, cfg.batch_size, g), lambda b: -adapter.forget_loss(*b), on_epoch)


@register("ga", TrainConfig, "gradient ascent on L_f")
def run(ctx: Context, cfg: TrainConfig) -> Outcome:
    return run_training(ctx, lambda on_epoch: gradient_ascent(ctx.adapter, ctx.forget, ctx.retain, cfg, on_epoch))
