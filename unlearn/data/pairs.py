"""Image-caption pairs from shards as model inputs: decoded, preprocessed, tokenized, batched."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image

from unlearn.data.images import read_image
from unlearn.data.shards import Sample, iter_samples
from unlearn.errors import UnlearnError


def decode(sample: Sample, where: str | Path) -> Image.Image:
    """The sample's image as RGB; an unreadable image is a one-line error naming it."""
    try:
        return read_image(sample.jpg)
    except (OSError, ValueError) as e:
        raise UnlearnError(f"sample {sample.key} in {where} is not a readable image ({e}); re-create {where} "
                           "(curation skips such samples: re-run the curate stages)") from None


def pair_batches(shard_dir: str | Path, preprocess: Callable, tokenizer: Callable, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, tokens) batches in stored order, streamed: memory holds one batch at a time."""
    return sample_batches(iter_samples(shard_dir), shard_dir, preprocess, tokenizer, batch_size)


def sample_batches(samples: Iterable[Sample], where: str | Path, preprocess: Callable, tokenizer: Callable,
                   batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, tokens) batches of `samples` in their order (`where`: what they came from, for errors)."""
    images: list[torch.Tensor] = []
    captions: list[str] = []
    for sample in samples:
        images.append(preprocess(decode(sample, where)))
        captions.append(sample.caption)
        if len(images) == batch_size:
            yield torch.stack(images), tokenizer(captions)
            images, captions = [], []
    if images:
        yield torch.stack(images), tokenizer(captions)
