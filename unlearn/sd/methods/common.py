"""What the diffusion methods share: prompts naming the target and their anchors, the latents of
real images, the noise prediction under classifier-free guidance, the UNet tensors a method
trains, a loss check, and the training loop's optimiser."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unlearn.sd.data import PHOTO, Images
from unlearn.sd.methods import Diverged
from unlearn.sd.model import text_states


def cells_of(target) -> list[tuple[int, int]]:
    """The (object, style) cells of the target's axes whose prompt names the target."""
    return [c for c in target.axes.cells() if c[0 if target.axis == "object" else 1] == target.index]


def anchor_cell(target, cell: tuple[int, int]) -> tuple[int, int]:
    """The cell a target's cell is steered to: a style target's cell as a photo of the same object
    (UnlearnCanvas's Seed_Images), an object target's cell as the next object in the same style."""
    o, s = cell
    if target.axis == "style":
        return o, target.axes.styles.index(PHOTO)
    return (o + 1) % len(target.axes.objects), s


def prompt_of(templates, target, cell: tuple[int, int]) -> str:
    """The prompt of a cell of the target's axes."""
    return target.axes.prompt(templates, cell)


def states(pipe, prompts: list[str]) -> torch.Tensor:
    return text_states(pipe.text_encoder, pipe.tokenizer, prompts)


@torch.no_grad()
def latents_of(pipe, images: Images, batch_size: int = 256) -> torch.Tensor:
    """Scaled latent means of real images (what the UNet was trained on)."""
    x = images.as_float()
    dev = pipe.vae.device
    z = torch.cat([pipe.vae.encode(x[s : s + batch_size].to(dev)).latent_dist.mode() for s in range(0, x.shape[0], batch_size)])
    return z * pipe.vae.config.scaling_factor


def attn2_params(unet, projections: tuple[str, ...] | None = None) -> dict[str, torch.nn.Parameter]:
    """The UNet's cross-attention tensors (`attn2`, the ones that read the text), all of them or
    only the given projections (e.g. ("to_k", "to_v"))."""
    out = {}
    for name, p in unet.named_parameters():
        if ".attn2." not in name:
            continue
        if projections is None or any(f".attn2.{proj}." in name for proj in projections):
            out[name] = p
    if not out:
        raise ValueError("the UNet has no cross-attention (attn2) tensors")
    return out


def train_only(unet, params: dict[str, torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())


def finite(loss: torch.Tensor, method: str, step: int) -> torch.Tensor:
    if not math.isfinite(float(loss.detach())):
        raise Diverged(f"{method}: the loss is {float(loss.detach())} at step {step}; lower its lr")
    return loss


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a, b)


def changed_unet(unet, names) -> dict[str, torch.Tensor]:
    sd = dict(unet.named_parameters())
    return {f"unet.{n}": sd[n].detach().cpu().clone() for n in names}
