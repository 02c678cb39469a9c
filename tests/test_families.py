"""The family registry, the transformers family's own loading rules, and the export of an
open_clip model to a transformers CLIPModel (embeddings, tokenizer, preprocessing)."""

import copy
import json

import pytest
import torch

from unlearn.data.evalsets import read_celeba, read_imagenet
from unlearn.data.shards import iter_samples
from unlearn.errors import UnlearnError
from unlearn.eval.zeroshot import IDENTITY_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from unlearn.methods import slug
from unlearn.models import adapter as A
from unlearn.models import openclip as oc
from unlearn.models.export import TOLERANCE, compare_adapters, to_hf_clip
from unlearn.models.hf_clip import HFClipAdapter


@pytest.fixture(scope="module")
def exported(tiny_clip):
    return to_hf_clip(copy.deepcopy(tiny_clip))


def _world_inputs(tiny_world):
    celeba, imagenet = read_celeba(tiny_world / "eval" / "celeba"), read_imagenet(tiny_world / "eval" / "imagenet")
    texts = ([t.format(c) for c in celeba.classnames for t in IDENTITY_TEMPLATES]
             + [t.format(c) for c in imagenet.classnames for t in SIMPLE_IMAGENET_TEMPLATES]
             + [s.caption for s in iter_samples(tiny_world / "laion")])
    return list(celeba.paths) + list(imagenet.paths), texts


def test_unknown_family_and_missing_or_broken_family_records(tiny_clip, tmp_path):
    with pytest.raises(UnlearnError, match=r"^unknown model family 'timm'; known families: open_clip, hf_clip"):
        A.check_family("timm")
    tiny_clip.save(tmp_path / "m")
    (tmp_path / "m" / A.FAMILY_FILE).unlink()
    with pytest.raises(UnlearnError, match=r"has no unlearn_model.json, so its model family is unknown; re-create it"):
        A.load(tmp_path / "m")
    (tmp_path / "m" / A.FAMILY_FILE).write_text(json.dumps({"family": "timm"}))
    with pytest.raises(UnlearnError, match="unknown model family 'timm'"):
        A.load(tmp_path / "m")
    with pytest.raises(UnlearnError, match="does not exist; run the base_model stage"):
        A.load(tmp_path / "absent")


def test_a_transformers_checkpoint_that_is_not_a_clip_is_refused(tmp_path):
    import transformers

    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnlearnError, match=r"'gpt2' checkpoint, not a CLIP .*model.family: open_clip"):
        HFClipAdapter.from_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(UnlearnError, match="could not read a transformers config"):
        HFClipAdapter.from_pretrained(str(tmp_path / "empty"))


def test_export_equals_open_clip_on_the_world(tiny_clip, exported, tiny_world, tmp_path):
    paths, texts = _world_inputs(tiny_world)
    exported.save(tmp_path / "hf")
    reloaded = A.load(tmp_path / "hf")
    figures = compare_adapters(tiny_clip, reloaded, paths, texts)
    assert figures["image_embedding_max_abs_diff"] <= TOLERANCE and figures["text_embedding_max_abs_diff"] <= TOLERANCE
    assert figures["token_mismatches"] == 0 and figures["preprocess_max_abs_diff"] < 1e-5
    # the folder is a plain transformers folder
    import transformers

    model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok(texts[:5], padding="max_length", max_length=model.config.text_config.max_position_embeddings, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
        ref = tiny_clip.encode_texts(texts[:5], normalize=False)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_an_edit_exports_to_the_same_edit(tiny_clip):
    """Patch then export == export then the same edit on the split tensors: the q/k/v rows of a
    fused in_proj edit land on q_proj, k_proj and v_proj."""
    source = copy.deepcopy(tiny_clip)
    name = "transformer.resblocks.0.attn.in_proj_weight"
    w = dict(source.model.named_parameters())[name]
    delta = 0.3 * w.detach().norm() * torch.randn_like(w) / w.numel() ** 0.5
    slug.apply_edit(source, name, delta)
    hf = to_hf_clip(source)
    params = dict(hf.model.named_parameters())
    q, k, v = (params[f"text_model.encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    torch.testing.assert_close(torch.cat([q, k, v]).detach(), w.detach())


def test_configs_that_do_not_export_are_one_line(tiny_clip):
    broken = copy.deepcopy(tiny_clip)
    broken.model.visual.pool_type = "avg"
    with pytest.raises(UnlearnError, match=r"does not export to a transformers CLIPModel: the image tower is not pooled on its class token"):
        to_hf_clip(broken)
    quick = oc.create(oc.TINY_ARCH, quick_gelu=True, seed=4)
    assert to_hf_clip(quick).model.config.text_config.hidden_act == "quick_gelu"  # QuickGELU exports (and passes the probe check)


def test_hf_candidates_split_q_k_v(exported, tiny_clip):
    names = exported.candidate_layers()
    assert len(names) == len(tiny_clip.candidate_layers()) + 2 * (4 + 3)  # every fused in_proj became three tensors
    assert exported.short_name("vision_model.encoder.layers.3.self_attn.q_proj.weight") == "v3.self_attn.q_proj"
    assert exported.short_name("text_projection.weight") == "text_projection"
    assert exported.tower("visual_projection.weight") == "image" and exported.tower("text_model.final_layer_norm.weight") == "text"
    assert exported.image_block_of("vision_model.post_layernorm.weight") == 4 and exported.image_block_of("vision_model.pre_layrnorm.weight") is None


def test_a_hub_id_through_the_hub_cache_offline(exported, tmp_path, monkeypatch):
    """`model.pretrained: org/name` with `model.family: hf_clip`, offline: transformers resolves the
    id from a local huggingface_hub cache; an id not in the cache is one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--unlearn-test--tiny-hf-clip"
    snapshot = repo / "snapshots" / ("0" * 40)
    exported.save(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    loaded = HFClipAdapter.from_pretrained("unlearn-test/tiny-hf-clip", cache_dir=str(tmp_path))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(exported.encode_images(images), loaded.encode_images(images))
    with pytest.raises(UnlearnError, match="could not read a transformers config from 'unlearn-test/absent'"):
        HFClipAdapter.from_pretrained("unlearn-test/absent", cache_dir=str(tmp_path))
