"""GA+FT (GradDiff): gradient ascent on the forget pairs and the CLIP loss on the retain pairs."""

from __future__ import annotations

from unlearn.methods.baselines import OnEpoch, TrainConfig, joint, train_loop
from unlearn.methods.registry import Context, Outcome, Pairs, register, run_training
from unlearn.models.adapter import Adapter


def ga_ft(adapter: Adapter, forget: Pairs, retain: Pairs, cfg: TrainConfig, on_epoch: OnEpoch | None = None) -> list[float]:
    """GA+FT (GradDiff): the joint loss -L_f + alpha * L_r, one forget and one retain batch a step."""
    return train_loop(adapter, "ga_ft", cfg, joint(forget, retain, cfg.batch_size),
                      lambda b: -adapter.forget_loss(*b[0]) + cfg.alpha * adapter.retain_loss(*b[1]), on_epoch)


@register("ga_ft", TrainConfig, "-L_f + alpha L_r, one forget and one retain batch a step")
def run(ctx: Context, cfg: TrainConfig) -> Outcome:
    return run_training(ctx, lambda on_epoch: ga_ft(ctx.adapter, ctx.forget, ctx.retain, cfg, on_epoch))
