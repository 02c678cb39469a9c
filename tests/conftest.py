"""Shared fixtures: a tiny synthetic world and a tiny model, built once per test session."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on two cores: each worker, and every stage it starts
    # (tests/dvc_repo.py), takes one thread, since two processes of two threads each on two cores
    # run several times slower than one thread each
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

from unlearn.data import synthetic as S  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = S.SyntheticConfig(seed=3, image_size=64, shards=2, samples_per_shard=60, eval_per_class=3, workers=1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The tiny DVC project after `dvc repro` (tests/dvc_repo.py); one per test module."""
    from tests.dvc_repo import build_tiny_repo

    return build_tiny_repo(tmp_path_factory)


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


@pytest.fixture(scope="session")
def clip_dir(tiny_clip, tmp_path_factory):
    from unlearn.models.export import to_hf_clip

    folder = tmp_path_factory.mktemp("hf_clip")
    to_hf_clip(copy.deepcopy(tiny_clip)).save(folder)
    return folder


@pytest.fixture(scope="session")
def pipeline(clip_dir):
    """A StableDiffusionPipeline trained for a few steps on one image per (object, style) at 16 px,
    its text encoder the tiny CLIP's text tower (a test that edits it works on a deep copy)."""
    from unlearn.sd import data as D
    from unlearn.sd.model import UnetConfig, VaeConfig, build_pipeline, load_text_encoder, text_states
    from unlearn.sd.train import encode_latents, train_unet, train_vae

    images = D.render_images(0, D.TRAIN_STREAM, 1, 16)
    x = images.as_float()
    vae, _ = train_vae(x, VaeConfig(channels=[8, 16], steps=3, batch_size=16), seed=0)
    latents, scale = encode_latents(vae, x)
    vae.register_to_config(scaling_factor=scale)
    te, tok = load_text_encoder(clip_dir)
    templates = D.Templates()
    prompts = [templates.prompt(o, s) for o in D.OBJECT_AXIS for s in D.STYLE_AXIS] + [""]
    states = text_states(te, tok, prompts)
    calls = []
    unet, losses = train_unet(latents, images.objects * len(D.STYLE_AXIS) + images.styles, states, len(prompts) - 1,
                              UnetConfig(channels=[16, 32], attention_head_dim=4, steps=4, batch_size=8, checkpoints=2), seed=0,
                              checkpoint=lambda ema, step, s: calls.append(step))
    assert calls == [2, 4] and len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    return build_pipeline(vae, unet, te, tok)
