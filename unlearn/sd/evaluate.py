"""What a pipeline draws, judged: every (object, style) prompt over fixed seeds, one sampler for
every stage (DDIM steps, guidance and seeds are params), each image classified by the judges."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from unlearn.sd.data import Axes, Templates
from unlearn.sd.judges import Judges


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 20
    guidance: float = 7.5
    images_per_prompt: int = 4     # test seeds per prompt
    seed: int = 1000               # the test seeds; validation uses seed + 1_000_000 (never the same generator)
    batch_size: int = 252


def initial_noise(pipe, n: int, cfg: SampleConfig, seed: int, size: int) -> torch.Tensor:
    """The starting latents of `n` drawings: batch k of `cfg.batch_size` from generator seed + k,
    drawn as the pipeline draws them itself (`randn_tensor` on a CPU generator, the text
    encoder's dtype), so a drawing depends only on its position, not on how the set is cut."""
    from diffusers.utils.torch_utils import randn_tensor

    side = size // pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, side, side)
    return torch.cat([randn_tensor((min(cfg.batch_size, n - s), *shape), generator=torch.Generator(device="cpu").manual_seed(seed + k),
                                   device=torch.device("cpu"), dtype=pipe.text_encoder.dtype)
                      for k, s in enumerate(range(0, n, cfg.batch_size))])


@torch.no_grad()
def draw(pipe, prompts: list[str], cfg: SampleConfig, seed: int, size: int, cuts: list[int] | None = None) -> Iterator[torch.Tensor]:
    """The drawings of `generate`, one pipeline call per part: images in [-1, 1] (n, 3, size,
    size) for the prompts between consecutive `cuts` (default: every `cfg.batch_size`).  The noise
    is `initial_noise`'s whatever the cuts; a call of another size may round differently in BLAS,
    so callers that stop early cut the same way whether or not they stop."""
    noise = initial_noise(pipe, len(prompts), cfg, seed, size)
    cuts = cuts if cuts is not None else [*range(0, len(prompts), cfg.batch_size), len(prompts)]
    # `load_pipeline`'s / `build_pipeline`'s precision; a pipeline made by diffusers directly draws in its own weights' dtype
    dtype = getattr(pipe, "drawing_dtype", pipe.unet.dtype)
    for a, b in zip(cuts[:-1], cuts[1:]):
        with torch.autocast(pipe._execution_device.type, dtype=dtype, enabled=dtype != torch.float32):
            images = pipe(prompts[a:b], height=size, width=size, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                          latents=noise[a:b].to(pipe._execution_device), output_type="pt").images
        yield images.float().cpu() * 2 - 1


def generate(pipe, prompts: list[str], cfg: SampleConfig, seed: int, size: int) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, size, size), `cfg.batch_size` per pipeline call; batch k draws
    its noise from generator seed + k (`initial_noise`)."""
    return torch.cat(list(draw(pipe, prompts, cfg, seed, size)))


def answer_set(templates: Templates, per_prompt: int, axes: Axes) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every (object, style) prompt of `axes` `per_prompt` times: (prompts, object index, style index)."""
    cells = axes.cells() * per_prompt
    prompts = [axes.prompt(templates, c) for c in cells]
    return prompts, torch.tensor([o for o, _ in cells]), torch.tensor([s for _, s in cells])


def judge_images(judges: Judges, images: torch.Tensor, objects: torch.Tensor, styles: torch.Tensor) -> dict:
    """Per axis: accuracy over every image, per class, and the predictions."""
    out = {}
    for axis, y in (("object", objects), ("style", styles)):
        pred = judges[axis].predict(images)
        names = judges[axis].classes
        out[axis] = {"accuracy": round(float((pred == y).float().mean()), 4),
                     "per_class": {c: round(float((pred[y == k] == k).float().mean()), 4) for k, c in enumerate(names) if (y == k).any()},
                     "pred": pred}
    return out


def judged_accuracy(pipe, judges: Judges, templates: Templates, cfg: SampleConfig, per_prompt: int, seed: int, size: int) -> tuple[dict, torch.Tensor]:
    prompts, objects, styles = answer_set(templates, per_prompt, judges.axes)
    images = generate(pipe, prompts, cfg, seed, size)
    res = judge_images(judges, images, objects, styles)
    return {axis: {k: v for k, v in r.items() if k != "pred"} for axis, r in res.items()} | {"images": len(prompts)}, images
