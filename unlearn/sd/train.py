"""Training the tiny pipeline on the world's canvas: the autoencoder on the images, then the UNet
on their latents with the prompts' text states (the text encoder frozen), caption dropout for
classifier-free guidance and an EMA of the weights, as Stable Diffusion is trained."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from tqdm import tqdm

from unlearn.sd.model import UnetConfig, VaeConfig, build_unet, build_vae, train_scheduler


def train_vae(x: torch.Tensor, cfg: VaeConfig, seed: int, progress: str | None = None) -> tuple[object, list[float]]:
    """Reconstruction (MSE per pixel value) + kl_weight * KL per pixel value (the latent KL summed,
    divided by the image's 3*S*S values), AdamW; `x` in [-1, 1]."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = build_vae(cfg).to(x.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr)
    losses = []
    for _ in tqdm(range(cfg.steps), desc=progress, disable=progress is None, mininterval=2.0):
        xb = x[torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen).to(x.device)]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        loss = F.mse_loss(rec, xb) + cfg.kl_weight * post.kl().mean() / xb[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return vae.eval().requires_grad_(False), losses


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, float]:
    """Latent means of `x` and the scaling factor that gives them unit variance (SD's 0.18215)."""
    z = torch.cat([vae.encode(x[s : s + batch_size]).latent_dist.mode() for s in range(0, x.shape[0], batch_size)])
    scale = 1.0 / float(z.std())
    return z * scale, scale


def train_unet(latents: torch.Tensor, prompt_index: torch.Tensor, states: torch.Tensor, empty: int, cfg: UnetConfig, seed: int,
               checkpoint: Callable[[object, int, float], None] | None = None, progress: str | None = None) -> tuple[object, list[float]]:
    """epsilon-prediction MSE at uniform timesteps (weighted by Min-SNR-gamma if `cfg.snr_gamma`;
    the learning rate constant or cosine-decayed, `cfg.lr_schedule`); each image's caption is
    `states[prompt_index]`, replaced by the empty prompt's (`empty`) with probability caption_dropout.  `checkpoint(ema,
    step, train_seconds)` is called `cfg.checkpoints` times, evenly spaced (its time not counted)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = latents.device
    unet = build_unet(cfg, latents.shape[-1], latents.shape[1], states.shape[-1]).to(dev).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = train_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    lr_sched = None
    if cfg.lr_schedule == "cosine":
        from diffusers.optimization import get_cosine_schedule_with_warmup

        lr_sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    marks = {round(cfg.steps * (k + 1) / cfg.checkpoints) for k in range(cfg.checkpoints)} if cfg.checkpoints > 0 else set()
    losses, trained = [], 0.0
    for step in tqdm(range(1, cfg.steps + 1), desc=progress, disable=progress is None, mininterval=2.0):
        t0 = time.perf_counter()
        idx = torch.randint(0, latents.shape[0], (cfg.batch_size,), generator=gen)
        z0, p = latents[idx.to(dev)], prompt_index[idx].clone()
        p[torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout] = empty
        noise = torch.randn(z0.shape, generator=gen).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen).to(dev)
        pred = unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=states[p.to(states.device)]).sample
        if cfg.snr_gamma > 0:  # Min-SNR-gamma: the easy low-noise steps weigh less (epsilon prediction: min(SNR, gamma) / SNR)
            s = compute_snr(sched, t)
            loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * (s.clamp(max=cfg.snr_gamma) / s)).mean()
        else:
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if lr_sched is not None:
            lr_sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - cfg.ema)
        losses.append(float(loss.detach()))
        trained += time.perf_counter() - t0
        if step in marks and checkpoint is not None:
            checkpoint(ema, step, trained)
    return ema, losses
