import open_clip
import pytest
import safetensors.torch
import torch

from unlearn.data.evalsets import read_celeba, read_imagenet
from unlearn.errors import UnlearnError
from unlearn.eval.base import base_metrics
from unlearn.eval.zeroshot import topk_accuracy
from unlearn.models import openclip as oc
from unlearn.models.train import TrainConfig, load_pairs, train_contrastive


@pytest.fixture(scope="module")
def adapter():
    return oc.create(oc.TINY_ARCH, seed=0)


def test_snapshot_round_trip(adapter, tmp_path):
    adapter.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [oc.CONFIG_FILE, oc.WEIGHTS_FILE, "unlearn_model.json"]
    loaded = oc.load(tmp_path / "m")
    images = torch.randn(3, 3, 64, 64)
    texts = ["Elon Musk.", "a photo of the small mug.", "x"]
    with torch.no_grad():
        assert torch.equal(adapter.encode_images(images), loaded.encode_images(images))
        assert torch.equal(adapter.encode_texts(texts), loaded.encode_texts(texts))
    # open_clip's own loader reads the same folder
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'm'}")
    model.eval()  # open_clip returns it in training mode, where attention takes another (unfused) path
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images, normalize=True), loaded.encode_images(images))


def test_load_refuses_a_folder_without_safetensors(adapter, tmp_path):
    adapter.save(tmp_path / "m")
    (tmp_path / "m" / oc.WEIGHTS_FILE).unlink()
    torch.save(adapter.model.state_dict(), tmp_path / "m" / "open_clip_pytorch_model.bin")
    with pytest.raises(UnlearnError, match="not a saved model"):
        oc.load(tmp_path / "m")


def test_unknown_architecture_and_tag():
    with pytest.raises(UnlearnError, match="unknown open_clip architecture 'ViT-B-33'.*ViT-B-32"):
        oc.from_pretrained("ViT-B-33", "laion400m_e32", quick_gelu=False)
    with pytest.raises(UnlearnError, match="unknown pretrained tag 'laion401m'.*laion400m_e32"):
        oc.from_pretrained("ViT-B-32", "laion401m", quick_gelu=False)


def test_local_checkpoint(adapter, tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in adapter.model.state_dict().items()}, ckpt)
    loaded = oc.from_pretrained(oc.TINY_ARCH, str(ckpt), quick_gelu=False)
    for (k, a), b in zip(adapter.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k
    pt = tmp_path / "ckpt.pt"
    torch.save(adapter.model.state_dict(), pt)
    with pytest.raises(UnlearnError, match="not .safetensors"):
        oc.from_pretrained(oc.TINY_ARCH, str(pt), quick_gelu=False)
    with pytest.raises(UnlearnError, match="not found"):
        oc.from_pretrained(oc.TINY_ARCH, str(tmp_path / "missing.safetensors"), quick_gelu=False)


def test_quick_gelu_choice_is_explicit():
    plain = oc.create(oc.TINY_ARCH)
    quick = oc.create(oc.TINY_ARCH, quick_gelu=True)
    assert quick.config["model_cfg"].get("quick_gelu") is True and "quick_gelu" not in plain.config["model_cfg"]
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in quick.model.modules())
    assert not any(isinstance(m, open_clip.transformer.QuickGELU) for m in plain.model.modules())


def test_topk_accuracy():
    classes = torch.eye(4)
    images = torch.tensor([[1.0, 0.5, 0, 0], [0.2, 1.0, 0.9, 0], [0, 0, 0.4, 1.0]])
    acc = topk_accuracy(images, classes, [0, 2, 2], ks=(1, 2))
    assert acc[1] == pytest.approx(1 / 3) and acc[2] == pytest.approx(1.0)


def test_training_lowers_the_loss_and_metrics_are_fractions(tiny_world):
    a = oc.create(oc.TINY_ARCH, seed=1)
    images, tokens = load_pairs(a, str(tiny_world / "laion"))
    history = train_contrastive(a, images, tokens, TrainConfig(epochs=6, batch_size=40, lr=2e-3, warmup_steps=2))
    assert history[-1] < history[0] - 0.3
    m = base_metrics(a, tiny_world / "eval")
    assert m["identity_images"] == len(read_celeba(tiny_world / "eval" / "celeba"))
    assert m["object_images"] == len(read_imagenet(tiny_world / "eval" / "imagenet"))
    for k in ("identity_top1", "identity_top5", "object_top1", "object_top5"):
        assert 0.0 <= m[k] <= 1.0
    assert m["identity_top1"] <= m["identity_top5"]


def test_training_stops_on_nan(tiny_world):
    a = oc.create(oc.TINY_ARCH, seed=1)
    images, tokens = load_pairs(a, str(tiny_world / "laion"))
    images[:] = float("nan")
    with pytest.raises(UnlearnError, match="lower model.train.lr"):
        train_contrastive(a, images, tokens, TrainConfig(epochs=1, batch_size=40))


def test_pretrained_tag_through_the_hub_cache(adapter, tmp_path, monkeypatch):
    """The open_clip tag path, offline: a tag resolved by huggingface_hub from a local cache."""
    from open_clip import pretrained as P

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(P._PRETRAINED, oc.TINY_ARCH, {"unit_test": P._pcfg(hf_hub="unlearn-test/tiny-clip/", quick_gelu=False)})
    snapshot = tmp_path / "models--unlearn-test--tiny-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--unlearn-test--tiny-clip" / "refs").mkdir()
    (tmp_path / "models--unlearn-test--tiny-clip" / "refs" / "main").write_text("0" * 40)
    safetensors.torch.save_file({k: v.contiguous() for k, v in adapter.model.state_dict().items()}, snapshot / oc.WEIGHTS_FILE)
    loaded = oc.from_pretrained(oc.TINY_ARCH, "unit_test", quick_gelu=False, cache_dir=str(tmp_path))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(adapter.encode_images(images), loaded.encode_images(images))
    # a tag whose files are not in the cache fails with one line, offline
    monkeypatch.setitem(P._PRETRAINED, oc.TINY_ARCH, {"absent": P._pcfg(hf_hub="unlearn-test/absent/")})
    with pytest.raises(UnlearnError, match="could not load unlearn-tiny-vit weights 'absent'"):
        oc.from_pretrained(oc.TINY_ARCH, "absent", quick_gelu=False, cache_dir=str(tmp_path))
