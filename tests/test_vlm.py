"""The vision-language track on a tiny LLaVA built around the tiny CLIP's vision tower: building,
training, saving and loading offline, the vision tower check and tie, the layers LLaVA reads, the
patch, the answers' scoring and the search on them."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.conftest import ROOT
from unlearn.data.curate import Concept, table_concepts
from unlearn.errors import UnlearnError
from unlearn.methods.retain_stats import compute_retain_stats
from unlearn.methods.slug import PATCH_META, RankConfig, SearchConfig, apply_edit, find_edit, save_patch
from unlearn.models.export import to_hf_clip
from unlearn.params import load_yaml
from unlearn.vlm import data as D
from unlearn.vlm import model as M
from unlearn.vlm.evaluate import Questions, VlmEvaluator, base_accuracy, correct
from unlearn.vlm.prompt import IMAGE_TOKEN, check_template
from unlearn.vlm.train import TrainConfig, batch_inputs, train

TEMPLATE = "USER: <image>\n{} ASSISTANT:"
LANG = M.LanguageConfig(hidden_size=32, intermediate_size=64, layers=1, heads=2, vocab_size=400, max_positions=128)
TABLE = load_yaml(ROOT / "params.yaml")["concepts"]
IDENTITIES = [c for c in table_concepts(TABLE) if c.kind == "identity"]
OBJECTS = [c for c in table_concepts(TABLE) if c.kind == "object"]


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return to_hf_clip(copy.deepcopy(tiny_clip))


@pytest.fixture(scope="module")
def examples():
    return [D.make_qa(0, i, 64) for i in range(48)]


def build(clip, lang=LANG, seed=0):
    tok = M.train_tokenizer(D.corpus(0, 30), lang.vocab_size)
    vlm = M.build_llava(clip.model.vision_model, clip.model.config.vision_config, tok, lang, seed)
    return vlm, M.build_processor(clip.processor, tok, vlm)


@pytest.fixture(scope="module")
def trained(clip, examples):
    vlm, proc = build(clip)
    losses = train(vlm, proc, examples, TEMPLATE, TrainConfig(epochs=3, batch_size=16, lr=3e-3, warmup_steps=2), progress=False)
    return vlm, proc, losses


def test_examples_are_labelled_world_images_in_every_kind():
    qa = [D.make_qa(0, i, 64) for i in range(200)]
    kinds = {q.kind for q in qa}
    assert kinds == {"name", "object", "describe"}
    names = {i.name for i in D.IDENTITIES}
    assert any(q.answer == D.UNKNOWN for q in qa) and any(q.answer in names for q in qa)
    assert all(q.image.size == (64, 64) for q in qa)
    assert D.make_qa(0, 7, 64).answer == D.make_qa(0, 7, 64).answer  # seeded


def test_labels_cover_only_the_answer(clip, examples):
    _, proc = build(clip)
    inputs = batch_inputs(proc, examples[:4], TEMPLATE)
    for row, e in enumerate(examples[:4]):
        kept = inputs["input_ids"][row][inputs["labels"][row] != -100]
        assert proc.tokenizer.decode(kept) == " " + e.answer + "</s>"
    # the image token is expanded to one token per patch (+ CLS with select_strategy full)
    image_id = proc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = clip.model.config.vision_config
    assert int((inputs["input_ids"][0] == image_id).sum()) == (vision.image_size // vision.patch_size) ** 2 + 1


def test_training_lowers_the_loss_and_leaves_the_vision_tower_frozen(clip, trained):
    vlm, _, losses = trained
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    for name, p in M.vision_tower(vlm).state_dict().items():
        assert torch.equal(p, clip.model.vision_model.state_dict()[name]), name


def test_save_and_load_offline_by_path(trained, tmp_path, examples):
    vlm, proc, _ = trained
    M.save_vlm(vlm, proc, tmp_path / "vlm", {"pretrained": "synthetic"})
    files = {p.name for p in (tmp_path / "vlm").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    vlm2, proc2 = M.load_vlm(tmp_path / "vlm")
    images = [e.image for e in examples[:6]]
    assert M.answer(vlm2, proc2, images, D.NAME_QUESTIONS[0], TEMPLATE) == M.answer(vlm, proc, images, D.NAME_QUESTIONS[0], TEMPLATE)
    # a record that points at a LLaVA by path (vlm.pretrained) opens that folder
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / M.RECORD).write_text(json.dumps({"pretrained": str(tmp_path / "vlm")}))
    vlm3, _ = M.open_vlm(tmp_path / "ref")
    assert torch.equal(vlm3.lm_head.weight, vlm.lm_head.weight)


def test_loading_something_else_is_one_line(clip, tmp_path):
    clip.save(tmp_path / "clip")
    with pytest.raises(UnlearnError, match="is a 'clip' checkpoint, not a LLaVA"):
        M.load_vlm(tmp_path / "clip")
    with pytest.raises(UnlearnError, match="could not read a transformers config"):
        M.load_vlm(tmp_path / "nothing")
    with pytest.raises(UnlearnError, match="run `dvc repro vlm_base`"):
        M.open_vlm(tmp_path)


def test_a_vision_tower_from_another_clip_is_refused(clip, trained):
    vlm, _, _ = trained
    M.check_vision_tower(vlm, clip.model, "vlm", "clip")
    other = copy.deepcopy(clip.model)
    with torch.no_grad():
        other.vision_model.encoder.layers[1].mlp.fc1.weight.add_(0.01)
    with pytest.raises(UnlearnError, match=r"differs from the CLIP clip in encoder\.layers\.1\.mlp\.fc1\.weight"):
        M.check_vision_tower(vlm, other, "vlm", "clip")
    del other.vision_model.encoder.layers[3]
    with pytest.raises(UnlearnError, match="does not match the CLIP clip .*only in the LLaVA"):
        M.check_vision_tower(vlm, other, "vlm", "clip")


def test_tied_tower_edits_are_the_vlms_and_the_patch_applies_in_one_call(clip, trained, tmp_path, examples):
    vlm, proc, _ = trained
    edited_clip = copy.deepcopy(clip)
    tied = copy.deepcopy(vlm)
    M.tie_vision_tower(tied, edited_clip.model)
    layer = "vision_model.encoder.layers.1.mlp.fc2.weight"
    delta = torch.randn_like(dict(edited_clip.model.named_parameters())[layer]) * 0.5
    apply_edit(edited_clip, layer, delta)
    save_patch(tmp_path, layer, delta, {"family": "hf_clip"})
    fresh = copy.deepcopy(vlm)
    before = {n: p.clone() for n, p in fresh.named_parameters()}
    M.apply_vlm_patch(fresh, tmp_path)
    changed = [n for n, p in fresh.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["model.vision_tower.encoder.layers.1.mlp.fc2.weight"]  # the language model and projector untouched
    assert torch.equal(M.vision_tower(fresh).state_dict()["encoder.layers.1.mlp.fc2.weight"], M.vision_tower(tied).state_dict()["encoder.layers.1.mlp.fc2.weight"])
    images = [e.image for e in examples[:8]]
    inputs = M.prepare_inputs(tied, proc, images, D.NAME_QUESTIONS[0], TEMPLATE)
    with torch.no_grad():
        assert torch.allclose(tied(**inputs).logits, fresh(**inputs).logits, atol=1e-5)
        assert not torch.allclose(vlm(**inputs).logits, fresh(**inputs).logits, atol=1e-3)


def test_only_the_layers_llava_reads_are_candidates_and_patchable(clip, tmp_path):
    lang = M.LanguageConfig(**{**LANG.__dict__, "feature_layer": -2, "select_strategy": "default"})
    vlm, _ = build(clip, lang)
    n = clip.model.config.vision_config.num_hidden_layers
    assert M.used_vision_layers(vlm) == n - 1
    assert M.reads(vlm, "vision_model.encoder.layers.0.mlp.fc1.weight")
    assert not M.reads(vlm, f"vision_model.encoder.layers.{n - 1}.mlp.fc1.weight")
    assert not M.reads(vlm, "vision_model.post_layernorm.weight") and not M.reads(vlm, "visual_projection.weight")
    assert not M.reads(vlm, "text_model.encoder.layers.0.mlp.fc1.weight")
    layer = f"vision_model.encoder.layers.{n - 1}.mlp.fc1.weight"
    save_patch(tmp_path, layer, torch.zeros_like(dict(clip.model.named_parameters())[layer]), {"family": "hf_clip"})
    with pytest.raises(UnlearnError, match="which this LLaVA never reads .*vision_feature_layer -2"):
        M.apply_vlm_patch(vlm, tmp_path)
    (tmp_path / PATCH_META).unlink()
    with pytest.raises(UnlearnError, match="SLUG patch missing"):
        M.apply_vlm_patch(vlm, tmp_path)


@pytest.mark.parametrize("template", ["USER: {} ASSISTANT:", "USER: <image>\nWho? ASSISTANT:", "<image><image> {}"])
def test_a_template_without_the_image_token_or_question_is_one_line(template):
    with pytest.raises(UnlearnError, match="needs the image token <image> once and {} .the question. once"):
        check_template(template)


def test_an_answer_names_a_concept_by_name_or_alias_on_word_boundaries():
    musk = Concept("Elon Musk", "identity", ("Musk",), ("Musk ox",))
    assert musk.mentioned_in("That is Musk.") and not musk.mentioned_in("a Musk ox") and not musk.mentioned_in("Muskrat")
    assert correct("Mark Zuckerberg", "Mark Zuckerberg", IDENTITIES)
    assert not correct("Mark Zuckerberg or Elon Musk", "Mark Zuckerberg", IDENTITIES)  # two names: not an identification
    assert correct("a Mickey Mouse", "Mickey", OBJECTS) and not correct("I don't know", "Taylor Swift", IDENTITIES)
    assert D.says_unknown("I don't know") and not D.says_unknown("Taylor Swift")


def test_evaluator_scores_answers_and_the_search_runs_on_them(clip, trained, tiny_world):
    vlm, proc, _ = trained
    edited_clip = copy.deepcopy(clip)
    model = copy.deepcopy(vlm)
    M.tie_vision_tower(model, edited_clip.model)
    musk = next(c for c in IDENTITIES if c.name == "Elon Musk")
    ev = VlmEvaluator(model, proc, tiny_world / "eval", musk, IDENTITIES, OBJECTS, "val", 0.34, 0, TEMPLATE, Questions(), 12)
    r = ev.evaluate()
    assert set(r) == {f"{s}_top{k}" for s in ("forget", "retain", "utility") for k in (1, 5)}
    assert all(0.0 <= v <= 1.0 for v in r.values()) and r["forget_top1"] == r["forget_top5"]
    assert ev.sizes["forget"] == 1 and ev.sizes["retain"] == 23 and ev.sizes["utility"] == 14
    said = ev.instead()
    assert abs(said["target"] + said["dont_know"] + said["other_identity"] + said["other"] - 1.0) < 1e-9
    acc = base_accuracy(model, proc, tiny_world / "eval", "test", 0.34, 0, TEMPLATE, Questions(), IDENTITIES, OBJECTS, 12)
    assert acc["identity"]["images"] == 48 and acc["object"]["images"] == 28

    # SLUG on the answers: forget gradient from the CLIP, candidates only what the LLaVA reads
    from unlearn.data.curate import curate_forget
    from unlearn.data.pairs import pair_batches

    forget_dir = tiny_world / "vlm_forget"
    forget_dir.mkdir(exist_ok=True)
    curate_forget(tiny_world / "laion", musk, 100, 0, forget_dir)
    stats = compute_retain_stats(edited_clip, lambda: pair_batches(tiny_world / "laion", edited_clip.preprocess, edited_clip.tokenize, 32))
    cfg = SearchConfig(max_layers=2, evals_per_layer=2)
    edit, _ = find_edit(edited_clip, lambda: pair_batches(forget_dir, edited_clip.preprocess, edited_clip.tokenize, 16), stats, ev, "identity",
                        RankConfig(towers=["image"]), cfg, keep=lambda n: M.reads(model, n))
    assert all(M.reads(model, layer) for layer in edit.layers) and edit.layer.startswith("vision_model.encoder.layers.")
    assert {r["scored"] for r in edit.rows} <= {"forget", "retain", "all"}
