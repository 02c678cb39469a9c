"""ESD-x (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023), as its paper
intends: fine-tune the UNet's cross-attention (every `attn2` tensor) so that its prediction for a
prompt naming the target follows the frozen UNet's negatively guided one,

    eps_theta(x_t | c)  ->  eps*(x_t) - eta * (eps*(x_t | c) - eps*(x_t)),

on x_t the model itself draws for that prompt: each step samples a DDIM step k uniformly, runs the
current UNet (classifier-free guided) from noise for k steps under c, and regresses at that
timestep.  The prompts are those of the canvas naming the target (every style of an object,
every object of a style)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from unlearn.sd.methods import Context, Result, register
from unlearn.sd.methods.common import attn2_params, cells_of, changed_unet, finite, mse, prompt_of, states, train_only


@dataclass(frozen=True)
class EsdConfig:
    lr: float = 1e-4
    iterations: int = 200
    batch_size: int = 4
    eta: float = 1.0            # negative guidance (the paper's 1.0)
    start_guidance: float = 3.0  # of the drawing that gives x_t (the paper's 3)
    seed: int = 0

    RANGES: ClassVar[dict[str, str]] = {"lr": "> 0", "iterations": "> 0", "batch_size": "> 0", "eta": "> 0", "start_guidance": ">= 0"}


def ddim_until(unet, sched, z: torch.Tensor, c: torch.Tensor, u: torch.Tensor, k: int, guidance: float) -> torch.Tensor:
    """`k` DDIM steps from z under prompt states c (u: the empty prompt's), guided."""
    for t in sched.timesteps[:k]:
        e = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([u, c])).sample
        eu, ec = e.chunk(2)
        z = sched.step(eu + guidance * (ec - eu), t, z).prev_sample
    return z


@register("esd", EsdConfig, "ESD-x: the cross-attention fine-tuned to follow the frozen model's negatively guided prediction")
def run(ctx: Context, cfg: EsdConfig) -> Result:
    from diffusers import DDIMScheduler

    pipe, unet = ctx.pipe, ctx.pipe.unet
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    params = attn2_params(unet)
    opt = torch.optim.Adam(train_only(unet, params), lr=cfg.lr)
    prompts = [prompt_of(ctx.templates, ctx.target, c) for c in cells_of(ctx.target)]
    with torch.no_grad():
        c_all, u = states(pipe, prompts), states(pipe, [""])
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(ctx.sample.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    dev = unet.device
    losses = []
    unet.train()
    for step in range(cfg.iterations):
        pick = torch.randint(0, len(prompts), (cfg.batch_size,), generator=gen)
        c, ub = c_all[pick], u.expand(cfg.batch_size, -1, -1)
        k = int(torch.randint(0, ctx.sample.steps, (1,), generator=gen))
        z = torch.randn(shape, generator=gen).to(dev) * sched.init_noise_sigma
        with torch.no_grad():
            z = ddim_until(unet, sched, z, c, ub, k, cfg.start_guidance)
            t = sched.timesteps[k]
            e0, ep = frozen(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([ub, c])).sample.chunk(2)
            goal = e0 - cfg.eta * (ep - e0)
        loss = finite(mse(unet(z, t, encoder_hidden_states=c).sample, goal), "esd", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    unet.eval().requires_grad_(False)
    return Result(changed_unet(unet, params), {"tensors": len(params), "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 5)})
