"""SalUn for diffusion (Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight
Saliency", ICLR 2024), as its paper intends and unlike the public UnlearnCanvas port, which never
applies its mask:

1. saliency: the gradient of the classifier-free-guided noise MSE on the forget images (real
   images of the target's cells, each with its own prompt), summed over them; the mask keeps the
   global top `mask_fraction` of |gradient| over every UNet tensor;
2. training, with the mask enforced on the weights (gradients multiplied by it, Adam without
   weight decay, so an unmasked weight never moves: checked after training):

       || eps_theta(x_t | c) - sg(eps_theta(x_t | c')) ||^2  +  alpha * || eps_theta(r_t | c_r) - noise ||^2

   x_t noised forget images under their prompt c, c' the anchor prompt (the same object as a
   photo for a style target, the next object in the same style for an object target), r_t noised
   retain images (other cells) under their prompts; forget and retain batches drawn shuffled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from unlearn.methods.salun import saliency_threshold
from unlearn.sd.methods import Context, Result, register
from unlearn.sd.methods.common import anchor_cell, finite, latents_of, mse, prompt_of, states


@dataclass(frozen=True)
class SalunConfig:
    lr: float = 1e-4
    iterations: int = 200
    batch_size: int = 8
    alpha: float = 1.0
    mask_fraction: float = 0.5
    mask_batches: int = 4       # forget batches whose gradients make the saliency
    seed: int = 0

    RANGES: ClassVar[dict[str, str]] = {"lr": "> 0", "iterations": "> 0", "batch_size": "> 0", "mask_batches": "> 0", "alpha": ">= 0",
                                        "mask_fraction": "(0, 1]"}


def saliency_mask(grads: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """The global top `fraction` of |gradient| over every tensor (the CLIP SalUn's threshold): 1
    kept, 0 frozen."""
    threshold = saliency_threshold(grads, fraction)
    return {n: (g.abs() >= threshold).to(g.dtype) for n, g in grads.items()}


@register("salun", SalunConfig, "SalUn: a saliency mask over the UNet, forget prompts steered to anchors, retain denoising")
def run(ctx: Context, cfg: SalunConfig) -> Result:
    pipe, unet = ctx.pipe, ctx.pipe.unet
    axes = ctx.target.axes
    all_cells = axes.cells()
    with torch.no_grad():
        cell_states = states(pipe, [prompt_of(ctx.templates, ctx.target, c) for c in all_cells])
        anchor_of = torch.tensor([all_cells.index(anchor_cell(ctx.target, c)) for c in all_cells])
        u = states(pipe, [""])
    zf, cf = latents_of(pipe, ctx.forget), axes.cell_of(ctx.forget)
    zr, cr = latents_of(pipe, ctx.retain), axes.cell_of(ctx.retain)
    sched = pipe.scheduler
    n_train = sched.config.num_train_timesteps
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = unet.device
    params = dict(unet.named_parameters())
    unet.requires_grad_(True)

    def noised(z0):
        t = torch.randint(0, n_train, (z0.shape[0],), generator=gen).to(dev)
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        return sched.add_noise(z0, noise, t), t, noise

    # 1. the saliency of the guided noise MSE on forget images
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for _ in range(cfg.mask_batches):
        pick = torch.randint(0, zf.shape[0], (cfg.batch_size,), generator=gen)
        zt, t, noise = noised(zf[pick])
        eu, ec = unet(torch.cat([zt, zt]), torch.cat([t, t]), encoder_hidden_states=torch.cat([u.expand(len(pick), -1, -1), cell_states[cf[pick]]])).sample.chunk(2)
        loss = mse(eu + ctx.sample.guidance * (ec - eu), noise)
        unet.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in params.items():
            grads[n] += p.grad
    mask = saliency_mask(grads, cfg.mask_fraction)
    del grads
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    losses = []
    unet.train()
    for step in range(cfg.iterations):
        pick = torch.randint(0, zf.shape[0], (cfg.batch_size,), generator=gen)
        zt, t, _ = noised(zf[pick])
        with torch.no_grad():
            goal = unet(zt, t, encoder_hidden_states=cell_states[anchor_of[cf[pick]]]).sample
        forget = mse(unet(zt, t, encoder_hidden_states=cell_states[cf[pick]]).sample, goal)
        rpick = torch.randint(0, zr.shape[0], (cfg.batch_size,), generator=gen)
        rt, tr, rnoise = noised(zr[rpick])
        retain = mse(unet(rt, tr, encoder_hidden_states=cell_states[cr[rpick]]).sample, rnoise)
        loss = finite(forget + cfg.alpha * retain, "salun", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in params.items():
            p.grad.mul_(mask[n])
        opt.step()
        losses.append(float(loss.detach()))
    unet.eval().requires_grad_(False)
    moved_outside = sum(int(((p.detach() != before[n]) & (mask[n] == 0)).sum()) for n, p in params.items())
    if moved_outside:
        raise RuntimeError(f"salun: {moved_outside} weights outside the saliency mask moved")
    kept = sum(int(m.sum()) for m in mask.values())
    total = sum(m.numel() for m in mask.values())
    changed = {f"unet.{n}": p.detach().cpu().clone() for n, p in params.items() if bool(mask[n].any())}
    return Result(changed, {"mask_kept": kept, "mask_total": total, "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5)})
