"""Zero-shot classification: class embeddings from prompt templates, top-k accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from unlearn.errors import UnlearnError
from unlearn.models.adapter import Adapter

IDENTITY_TEMPLATES = ("{}.",)
# Styles, classified without naming the object drawn (the captions of the world's styled images
# name both; these keep only the style's part).
STYLE_TEMPLATES = ("{} art.", "{} painting.", "An image in {} style.", "{} style illustration.")
# The 7 "simple" ImageNet templates (docs/methods.md, "Evaluation").
SIMPLE_IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def class_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class's prompts, class by class (the order `class_means` reads)."""
    return [t.format(c) for c in classnames for t in templates]


def class_means(prompt_emb: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, D) from the normalised embeddings of `class_prompts`: per class their mean,
    renormalised."""
    emb = prompt_emb.reshape(n_classes, prompt_emb.shape[0] // n_classes, -1).mean(dim=1)
    return emb / emb.norm(dim=-1, keepdim=True)


@torch.no_grad()
def class_embeddings(adapter: Adapter, classnames: Sequence[str], templates: Sequence[str], tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(C, D): per class, the mean of its normalised prompt embeddings, renormalised.  `tokens`:
    `class_prompts` already tokenized (a caller that encodes the same classes often)."""
    if tokens is None:
        tokens = adapter.tokenize(class_prompts(classnames, templates))
    return class_means(adapter.encode_tokens(tokens), len(classnames))


def load_images(adapter: Adapter, paths: Sequence[Path]) -> torch.Tensor:
    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                out.append(adapter.preprocess(img.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise UnlearnError(f"image {p} cannot be read ({type(e).__name__}); replace or remove it") from None
    return torch.stack(out)


@torch.no_grad()
def image_embeddings(adapter: Adapter, paths: Sequence[Path], batch_size: int = 256, progress: str | None = None) -> torch.Tensor:
    chunks = []
    starts = range(0, len(paths), batch_size)
    for s in tqdm(starts, desc=progress, disable=progress is None):
        chunks.append(adapter.encode_images(load_images(adapter, paths[s : s + batch_size])).cpu())
    return torch.cat(chunks)


def topk_hits(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per k, per image, whether its label is among the k highest logits (100 * v . W)."""
    logits = 100.0 * image_emb @ class_emb.T.to(image_emb)
    y = torch.as_tensor(list(labels))
    ranked = logits.topk(max(ks), dim=-1).indices
    return {k: (ranked[:, :k] == y[:, None]).any(dim=-1) for k in ks}


def topk_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of images whose label is among the k highest logits (100 * v . W)."""
    return {k: float(hits.float().mean()) for k, hits in topk_hits(image_emb, class_emb, labels, ks).items()}
