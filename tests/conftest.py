"""Shared fixtures: a tiny synthetic world and a tiny model, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
torch.set_num_threads(2)

from unlearn.data import synthetic as S  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = S.SyntheticConfig(seed=3, image_size=64, shards=2, samples_per_shard=60, eval_per_class=3, workers=1)


def direct_gradient(adapter, loss, images, tokens) -> dict:
    """The gradient of one loss on one batch, straight from autograd (what the one-pass gradient
    is compared with)."""
    adapter.model.zero_grad(set_to_none=True)
    loss(images, tokens).backward()
    out = {n: p.grad.detach().clone() for n, p in adapter.model.named_parameters() if p.grad is not None}
    adapter.model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """`laion/` shards and `eval/{celeba,imagenet}` of a 120-sample world."""
    root = tmp_path_factory.mktemp("world")
    (root / "laion").mkdir()
    S.write_shards(TINY, root / "laion")
    S.write_celeba(TINY, root / "eval" / "celeba")
    S.write_imagenet(TINY, root / "eval" / "imagenet")
    return root


@pytest.fixture(scope="session")
def tiny_clip(tiny_world):
    """The tiny model after a few steps on the tiny world, so that classes differ (shared: tests
    that edit it must restore it)."""
    from unlearn.models import openclip as oc
    from unlearn.models.train import TrainConfig, load_pairs, train_contrastive

    a = oc.create(oc.TINY_ARCH, seed=0)
    images, tokens = load_pairs(a, tiny_world / "laion")
    train_contrastive(a, images, tokens, TrainConfig(epochs=2, batch_size=40, lr=1e-3, warmup_steps=2))
    return a


@pytest.fixture(scope="module")
def data(tiny_clip, tiny_world):
    """Elon Musk's pairs of the tiny world (forget) and all others (retain), as tensors."""
    from unlearn.data.curate import Concept
    from unlearn.data.pairs import decode
    from unlearn.data.shards import iter_samples

    musk = Concept("Elon Musk", "identity", ("Musk",), ("Musk ox",))
    forget, retain = ([], []), ([], [])
    for s in iter_samples(tiny_world / "laion"):
        side = forget if musk.mentioned_in(s.caption) else retain
        side[0].append(tiny_clip.preprocess(decode(s, tiny_world / "laion")))
        side[1].append(s.caption)
    assert forget[0]
    pack = lambda d: (torch.stack(d[0]), tiny_clip.tokenize(d[1]))  # noqa: E731
    return pack(forget), pack(retain)
