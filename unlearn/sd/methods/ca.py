"""Concept ablation, model-based (Kumari et al., "Ablating Concepts in Text-to-Image Diffusion
Models", ICCV 2023), its cross-attention variant: fine-tune the key and value projections of the
UNet's cross-attention so that the prediction for a prompt naming the target matches the frozen
model's prediction for an anchor prompt, on x_t noised from what the frozen model draws for the
anchor:

    min || eps_theta(x_t, c*, t) - sg(eps*(x_t, c_anchor, t)) ||^2,   x ~ pipeline(c_anchor).

The anchor of a style target's prompt is the photo of the same object; of an object target's, the
next object in the same style (`common.anchor_cell`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from unlearn.sd.methods import Context, Result, register
from unlearn.sd.methods.common import anchor_cell, attn2_params, cells_of, changed_unet, finite, mse, prompt_of, states, train_only


@dataclass(frozen=True)
class CaConfig:
    lr: float = 1e-4
    iterations: int = 200
    batch_size: int = 8
    anchor_images: int = 4      # drawings of every anchor prompt by the frozen pipeline
    seed: int = 0

    RANGES: ClassVar[dict[str, str]] = {"lr": "> 0", "iterations": "> 0", "batch_size": "> 0", "anchor_images": "> 0"}


@register("ca", CaConfig, "concept ablation (model-based): the target's prediction matched to an anchor concept's")
def run(ctx: Context, cfg: CaConfig) -> Result:
    pipe, unet = ctx.pipe, ctx.pipe.unet
    cells = cells_of(ctx.target)
    targets = [prompt_of(ctx.templates, ctx.target, c) for c in cells]
    anchors = [prompt_of(ctx.templates, ctx.target, anchor_cell(ctx.target, c)) for c in cells]
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        pool = pipe(anchors * cfg.anchor_images, height=ctx.size, width=ctx.size, num_inference_steps=ctx.sample.steps,
                    guidance_scale=ctx.sample.guidance, generator=torch.Generator().manual_seed(cfg.seed), output_type="latent").images
        c_target, c_anchor = states(pipe, targets), states(pipe, anchors)
    which = torch.arange(len(cells)).repeat(cfg.anchor_images)
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    params = attn2_params(unet, ("to_k", "to_v"))
    opt = torch.optim.Adam(train_only(unet, params), lr=cfg.lr)
    sched = pipe.scheduler
    n_train = sched.config.num_train_timesteps
    losses = []
    unet.train()
    for step in range(cfg.iterations):
        pick = torch.randint(0, pool.shape[0], (cfg.batch_size,), generator=gen)
        z0, w = pool[pick], which[pick]
        t = torch.randint(0, n_train, (cfg.batch_size,), generator=gen).to(z0.device)
        noise = torch.randn(z0.shape, generator=gen).to(z0.device)
        zt = sched.add_noise(z0, noise, t)
        with torch.no_grad():
            goal = frozen(zt, t, encoder_hidden_states=c_anchor[w]).sample
        loss = finite(mse(unet(zt, t, encoder_hidden_states=c_target[w]).sample, goal), "ca", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    unet.eval().requires_grad_(False)
    return Result(changed_unet(unet, params), {"tensors": len(params), "anchor_images": int(pool.shape[0]),
                                               "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5)})
