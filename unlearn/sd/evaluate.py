"""What a pipeline draws, judged: every (object, style) prompt over fixed seeds, one sampler for
every stage (DDIM steps, guidance and seeds are params), each image classified by the judges."""

from __future__ import annotations

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


@torch.no_grad()
def generate(pipe, prompts: list[str], cfg: SampleConfig, seed: int, size: int) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, size, size); batch k draws its noise from generator seed + k, so
    an image depends only on its prompt's position, not on what else is drawn (up to float rounding:
    a smaller batch may round differently in BLAS)."""
    out = []
    for k, s in enumerate(range(0, len(prompts), cfg.batch_size)):
        gen = torch.Generator(device="cpu").manual_seed(seed + k)
        images = pipe(prompts[s : s + cfg.batch_size], height=size, width=size, num_inference_steps=cfg.steps,
                      guidance_scale=cfg.guidance, generator=gen, output_type="pt").images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out)


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
