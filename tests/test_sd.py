"""The diffusion track's parts on tiny configs: the canvas it draws, the judges, and a
StableDiffusionPipeline built from the CLIP's text tower that saves and loads itself offline."""

import copy
import dataclasses

import pytest
import torch

from unlearn.errors import UnlearnError
from unlearn.models.export import to_hf_clip
from unlearn.sd import data as D
from unlearn.sd.evaluate import SampleConfig, answer_set, generate, judge_images, judged_accuracy
from unlearn.sd.judges import JudgeConfig, Judges, load_judges, save_judges, train_judge
from unlearn.sd.model import load_pipeline, load_text_encoder


def test_templates_need_their_fields():
    assert D.Templates().prompt("apple", "Sepia") == "An apple image in Sepia style."
    assert D.Templates().prompt("apple", D.PHOTO) == "A photo of a apple."
    with pytest.raises(UnlearnError, match=r"^sd.templates.style 'An \{object\} image\.' lacks \{style\}"):
        D.Templates(style="An {object} image.")
    with pytest.raises(UnlearnError, match=r"^sd.templates.photo 'A photo\.' lacks \{object\}"):
        D.Templates(photo="A photo.")


def test_rendered_canvas_is_seeded_and_labelled():
    a, b, c = D.render_images(0, 7, 1, 16), D.render_images(0, 7, 1, 16), D.render_images(0, 8, 1, 16)
    assert a.pixels.shape == (len(D.OBJECT_AXIS) * len(D.STYLE_AXIS), 3, 16, 16) and a.pixels.dtype == torch.uint8
    assert torch.equal(a.pixels, b.pixels) and not torch.equal(a.pixels, c.pixels)
    assert sorted(set(a.styles.tolist())) == list(range(len(D.STYLE_AXIS))) and a.as_float().min() >= -1


def test_canvas_images_read_the_unlearncanvas_layout(tmp_path):
    from unlearn.data import synthetic as S

    S.write_canvas(S.SyntheticConfig(seed=3, image_size=32, canvas_per_cell=1), tmp_path / "canvas")
    images = D.canvas_images(tmp_path / "canvas", 16, D.WORLD)
    assert len(images) == len(D.OBJECT_AXIS) * len(D.STYLE_AXIS) and images.pixels.shape[-1] == 16
    assert int((images.styles == D.STYLE_AXIS.index(D.PHOTO)).sum()) == len(D.OBJECT_AXIS)  # Seed_Images is the photo style
    (tmp_path / "canvas" / "Cubism" / "apple").mkdir(parents=True)
    (tmp_path / "canvas" / "Sepia" / "apple" / "1.jpg").rename(tmp_path / "canvas" / "Cubism" / "apple" / "1.jpg")
    with pytest.raises(UnlearnError, match=r"style 'Cubism' / object 'apple' is not on the judges' axes"):
        D.canvas_images(tmp_path / "canvas", 16, D.WORLD)


def test_judges_learn_save_load_and_refuse_a_corrupt_file(tmp_path):
    images = D.render_images(0, D.JUDGE_STREAM, 2, 16)
    x = images.as_float()
    cfg = JudgeConfig(channels=[8, 16], steps=60, batch_size=64, lr=5e-3)
    judge, losses = train_judge(x, images.styles, list(D.STYLE_AXIS), cfg)
    assert sum(losses[-10:]) < sum(losses[:10])  # it learns
    save_judges(tmp_path, {"style": judge}, 16, {"held_out": {}})
    loaded = load_judges(tmp_path)
    assert loaded.image_size == 16 and loaded["style"].classes == list(D.STYLE_AXIS)
    assert torch.equal(loaded["style"].predict(x), judge.predict(x))
    weights = tmp_path / "style.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(UnlearnError, match=r"style.safetensors does not load .*re-run `dvc repro sd_judges`"):
        load_judges(tmp_path)
    with pytest.raises(UnlearnError, match="no judges at"):
        load_judges(tmp_path / "none")
    with pytest.raises(UnlearnError, match=r"sd.judges.steps is 0"):
        JudgeConfig(steps=0)


def test_pipeline_saves_and_loads_offline_drawing_the_same(pipeline, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = SampleConfig(steps=2, images_per_prompt=1, batch_size=5)
    prompts = ["An apple image in Sepia style.", "A photo of a car.", "", "An apple image in Neon style.", "A photo of a mug.", "A photo of a fish."]
    before = generate(pipeline, prompts, cfg, seed=5, size=16)
    assert before.shape == (6, 3, 16, 16) and before.min() >= -1 and before.max() <= 1
    # an image depends on its position only: the same noise, and a batch of 3 instead of 5 changes only the BLAS rounding
    torch.testing.assert_close(before[:3], generate(pipeline, prompts[:3], cfg, seed=5, size=16), rtol=0, atol=1e-5)
    assert not torch.allclose(before[:3], generate(pipeline, prompts[:3], cfg, seed=6, size=16), atol=1e-2)  # the seed does matter
    pipeline.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    assert list((tmp_path / "pipe" / "unet").glob("*.safetensors")) and (tmp_path / "pipe" / "model_index.json").exists()
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    again.set_progress_bar_config(disable=True)
    assert torch.equal(before, generate(again, prompts, cfg, seed=5, size=16))
    assert torch.equal(generate(load_pipeline(tmp_path / "pipe"), prompts, cfg, seed=5, size=16), before)


def test_a_pipeline_draws_in_the_precision_asked_with_its_weights_left_float32(pipeline, tmp_path):
    """`sd.precision`: `auto` is float32 on a CPU (the same bits as a pipeline never told) and
    float16 on a GPU; another dtype draws under autocast, so the UNet computes in it while every
    weight stays float32 (the text encoder is the CLIP tower SLUG edits), and the images stay
    close; a name that is not one of the dtypes is one line."""
    from unlearn.sd.model import drawing_dtype

    assert (drawing_dtype("auto", "cpu"), drawing_dtype("auto", "cuda"), drawing_dtype("bfloat16", "cpu")) == (torch.float32, torch.float16, torch.bfloat16)
    with pytest.raises(UnlearnError, match=r"^sd.precision is 'half'; use one of auto, float32, float16, bfloat16 "):
        drawing_dtype("half", "cpu")
    pipeline.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    cfg = SampleConfig(steps=2, images_per_prompt=1, batch_size=4)
    prompts = ["An apple image in Sepia style.", "A photo of a car.", "An apple image in Neon style.", "A photo of a mug."]
    full = generate(load_pipeline(tmp_path / "pipe", "cpu", "auto"), prompts, cfg, seed=3, size=16)
    assert torch.equal(full, generate(pipeline, prompts, cfg, seed=3, size=16))
    low = load_pipeline(tmp_path / "pipe", "cpu", "bfloat16")
    computed = []
    low.unet.register_forward_hook(lambda module, args, out: computed.append(out[0].dtype))
    drawn = generate(low, prompts, cfg, seed=3, size=16)
    assert set(computed) == {torch.bfloat16} and len(computed) == cfg.steps
    assert {p.dtype for part in (low.unet, low.vae, low.text_encoder) for p in part.parameters()} == {torch.float32}
    assert drawn.dtype == torch.float32 and not torch.equal(drawn, full) and float((drawn - full).abs().max()) < 0.3


def test_pipeline_folder_errors_are_one_line(pipeline, tmp_path):
    with pytest.raises(UnlearnError, match="is not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    pipeline.save_pretrained(tmp_path / "pipe")
    import shutil

    shutil.rmtree(tmp_path / "pipe" / "text_encoder")
    with pytest.raises(UnlearnError, match=r"has no text_encoder/ folder"):
        load_pipeline(tmp_path / "pipe")
    with pytest.raises(UnlearnError, match="no transformers CLIP at"):
        load_text_encoder(tmp_path / "nothing")


def test_judged_answer_set_counts_every_prompt(pipeline, tmp_path):
    images = D.render_images(0, D.JUDGE_STREAM, 1, 16)
    cfg = JudgeConfig(channels=[8], steps=2, batch_size=16)
    objects, _ = train_judge(images.as_float(), images.objects, list(D.OBJECT_AXIS), cfg)
    styles, _ = train_judge(images.as_float(), images.styles, list(D.STYLE_AXIS), cfg)
    save_judges(tmp_path, {"object": objects, "style": styles}, 16, {})
    judges = load_judges(tmp_path)
    prompts, o, s = answer_set(D.Templates(), 2, D.WORLD)
    assert len(prompts) == len(o) == len(s) == 2 * len(D.OBJECT_AXIS) * len(D.STYLE_AXIS)
    assert prompts[1] == D.Templates().prompt(D.OBJECT_AXIS[int(o[1])], D.STYLE_AXIS[int(s[1])]) == f"An {D.OBJECT_AXIS[0]} image in Watercolor style."
    res = judge_images(judges, images.as_float(), images.objects, images.styles)
    for axis in ("object", "style"):
        pred = res[axis]["pred"]
        truth = images.objects if axis == "object" else images.styles
        assert res[axis]["accuracy"] == round(float((pred == truth).float().mean()), 4)
    # the pipeline's answer set: one drawing per prompt, each judged against its own prompt's labels
    acc, drawn = judged_accuracy(pipeline, judges, D.Templates(), SampleConfig(steps=2, batch_size=64), 1, 5, 16)
    assert acc["images"] == drawn.shape[0] == len(D.OBJECT_AXIS) * len(D.STYLE_AXIS)
    for axis, labels in (("object", o[: len(prompts) // 2]), ("style", s[: len(prompts) // 2])):
        assert acc[axis]["accuracy"] == round(float((judges[axis].predict(drawn) == labels).float().mean()), 4)


def test_the_search_evaluator_draws_the_rest_set_once_per_text_encoder_state(pipeline, monkeypatch):
    from unlearn.sd import unlearn as U

    images = D.render_images(0, D.JUDGE_STREAM, 1, 16)
    cfg = JudgeConfig(channels=[8], steps=2, batch_size=16)
    judges = Judges({"object": train_judge(images.as_float(), images.objects, list(D.OBJECT_AXIS), cfg)[0],
                     "style": train_judge(images.as_float(), images.styles, list(D.STYLE_AXIS), cfg)[0]}, 16, {})
    drawn = []
    real_draw = U.draw
    monkeypatch.setattr(U, "draw", lambda pipe, prompts, *a, **k: drawn.append(len(prompts)) or real_draw(pipe, prompts, *a, **k))
    pipe = copy.deepcopy(pipeline)
    ev = U.SdEvaluator(pipe, judges, U.target_of("Sepia", "style", D.WORLD), D.Templates(), SampleConfig(steps=2, batch_size=64), 1, 3, 16)
    rest = ev.sizes["retain"]
    both = ev.evaluate(sets=("retain", "utility"))
    assert ev.evaluate(sets=("retain",))["retain_top1"] == both["retain_top1"]
    assert ev.evaluate(sets=("utility",))["utility_top1"] == both["utility_top1"]
    assert drawn == [rest]  # one drawing of the rest set served three calls
    first = ev.images["rest"].clone()
    name, param = next((n, p) for n, p in pipe.text_encoder.named_parameters() if "fc2.weight" in n)
    with torch.no_grad():
        param.add_(torch.randn_like(param))
    ev.evaluate(sets=("retain",))
    assert drawn == [rest, rest] and not torch.equal(ev.images["rest"], first)  # a changed text encoder draws again
    fresh = U.SdEvaluator(copy.deepcopy(pipe), judges, U.target_of("Sepia", "style", D.WORLD), D.Templates(), SampleConfig(steps=2, batch_size=64), 1, 3, 16)
    fresh.evaluate(sets=("retain",))
    assert torch.equal(fresh.images["rest"], ev.images["rest"]), name  # the cache holds what a fresh drawing gives


def test_drawings_start_from_the_pipelines_own_noise_however_the_set_is_cut(pipeline):
    """`generate` hands the pipeline the noise it would draw itself (`initial_noise`: the same
    bits as the pipeline's own generator); cut into other parts, each drawing starts from the same
    noise, so the images agree up to BLAS rounding."""
    from unlearn.eval.parts import equal_cuts
    from unlearn.sd.evaluate import draw, initial_noise

    prompts = [D.Templates().prompt(o, s) for o in D.OBJECT_AXIS[:3] for s in D.STYLE_AXIS[:3]]  # 9 prompts
    cfg = SampleConfig(steps=2, batch_size=4)
    own = torch.cat([pipeline(prompts[s : s + 4], height=16, width=16, num_inference_steps=2, guidance_scale=cfg.guidance,
                              generator=torch.Generator().manual_seed(7 + k), output_type="pt").images.float() * 2 - 1
                     for k, s in enumerate(range(0, 9, 4))])
    assert torch.equal(generate(pipeline, prompts, cfg, 7, 16), own)
    noise = initial_noise(pipeline, 9, cfg, 7, 16)
    assert noise.shape == (9, pipeline.unet.config.in_channels, 16 // pipeline.vae_scale_factor, 16 // pipeline.vae_scale_factor)
    assert equal_cuts(9, 4) == [0, 3, 6, 9] and equal_cuts(8, 4) == [0, 4, 8] and equal_cuts(3, 8) == [0, 3]
    parts = list(draw(pipeline, prompts, cfg, 7, 16, equal_cuts(9, 2)))
    assert [len(x) for x in parts] == [2, 2, 2, 2, 1]
    torch.testing.assert_close(torch.cat(parts), own, atol=1e-4, rtol=0)
    assert not torch.equal(generate(pipeline, prompts, cfg, 8, 16), own)  # another seed, other noise


def _always(judge, k: int):
    """The judge made to answer class `k` for every image (its head: no weights, bias on `k`)."""
    with torch.no_grad():
        judge.head.weight.zero_()
        judge.head.bias.zero_()
        judge.head.bias[k] = 10.0
    return judge


def test_the_search_evaluator_gives_a_set_up_part_way_and_scores_a_whole_set_the_same(pipeline, monkeypatch):
    """Forget set: drawn one round of its prompts per call; with `at_most` it stops at the first
    round that already shows the target more often than the ceiling allows (`forget_at_least`:
    the share seen).  Retain set: in equal parts of at most `chunk`; with `at_least` it stops as
    soon as the floor is out of reach.  A set drawn whole has the same figures with or without."""
    from unlearn.sd import unlearn as U

    images = D.render_images(0, D.JUDGE_STREAM, 1, 16)
    cfg = JudgeConfig(channels=[8], steps=2, batch_size=16)
    target = U.target_of("Sepia", "style", D.WORLD)
    judges = Judges({"object": train_judge(images.as_float(), images.objects, list(D.OBJECT_AXIS), cfg)[0],
                     "style": _always(train_judge(images.as_float(), images.styles, list(D.STYLE_AXIS), cfg)[0], target.index)}, 16, {})
    calls = []
    real_draw = U.draw
    monkeypatch.setattr(U, "draw", lambda *a, **k: (calls.append(len(x)) or x for x in real_draw(*a, **k)))
    ev = U.SdEvaluator(copy.deepcopy(pipeline), judges, target, D.Templates(), SampleConfig(steps=1, batch_size=64), 1, 3, 16,
                       forget_per_prompt=3, chunk=20)
    n_forget, n_rest = ev.sizes["forget"], ev.sizes["retain"]
    assert ev.cuts("forget") == [0, len(D.OBJECT_AXIS), 2 * len(D.OBJECT_AXIS), n_forget]  # one round of the 14 prompts per call
    assert n_rest == len(D.OBJECT_AXIS) * (len(D.STYLE_AXIS) - 1) and ev.cuts("rest") == U.equal_cuts(n_rest, 20)
    whole = ev.evaluate(sets=("forget",))
    assert whole["forget_top1"] == 1.0 and calls == [14, 14, 14]  # the judge sees Sepia in every drawing
    calls.clear()
    assert ev.evaluate(sets=("forget",), at_most={"forget": 1.0}) == whole and calls == [14, 14, 14]  # never above: drawn whole
    calls.clear()
    drawn = ev.drawn
    given_up = ev.evaluate(sets=("forget",), at_most={"forget": 0.05})
    assert given_up == {"forget_top1": None, "forget_top5": None, "forget_at_least": 14 / n_forget} and calls == [14]
    assert drawn == 2 * n_forget and ev.drawn == drawn + 14  # the count of drawings made: a search's cost
    # the retain set (the style judge's accuracy on other styles): 0, so a floor above 0 is out of reach once
    # more than (1 - floor) of the set has been seen wrong
    calls.clear()
    below = ev.evaluate(sets=("retain",), at_least={"retain": 0.6})
    cuts = ev.cuts("rest")
    parts = len(cuts) - 1
    needed = next(k for k in range(1, parts + 1) if (n_rest - cuts[k]) / n_rest < 0.6)  # the first part after which 0.6 is out of reach
    assert 1 < needed < parts and below == {"retain_top1": None, "retain_top5": None, "retain_below": True}
    assert calls == [cuts[k] - cuts[k - 1] for k in range(1, needed + 1)]
    assert "rest" not in ev.images  # nothing cached from a set given up
    calls.clear()
    full = ev.evaluate(sets=("retain", "utility"), at_least={"retain": 0.0})
    assert full["retain_top1"] == 0.0 and len(calls) == parts and sum(calls) == n_rest
    calls.clear()
    assert ev.evaluate(sets=("retain", "utility")) == full and calls == []  # the same text encoder: not drawn again
    assert ev.drawn == 2 * n_forget + 14 + sum(cuts[k] - cuts[k - 1] for k in range(1, needed + 1)) + n_rest
    fresh = U.SdEvaluator(copy.deepcopy(pipeline), judges, target, D.Templates(), SampleConfig(steps=1, batch_size=64), 1, 3, 16,
                          forget_per_prompt=3, chunk=20)
    assert fresh.evaluate(sets=("retain", "utility")) == full and torch.equal(fresh.images["rest"], ev.images["rest"])


def test_target_prompts_and_other_names():
    from unlearn.sd.unlearn import prompt_sets, target_of

    t = target_of("Sepia", "style", D.WORLD)
    sets = prompt_sets(t, D.Templates(), 2)
    assert len(sets["forget"][0]) == 2 * len(D.OBJECT_AXIS) and all("Sepia" in q for q in sets["forget"][0])
    assert len(sets["rest"][0]) == 2 * len(D.OBJECT_AXIS) * (len(D.STYLE_AXIS) - 1) and not any("Sepia" in q for q in sets["rest"][0])
    renamed = prompt_sets(t, D.Templates(), 1, "sepia-toned")["forget"][0]
    assert all("sepia-toned style" in q for q in renamed)
    mickey = prompt_sets(target_of("Mickey", "object", D.WORLD), D.Templates(), 1, "Micky")["forget"]
    assert len(mickey[0]) == len(D.STYLE_AXIS) and mickey[0][0] == "A photo of a Micky." and set(mickey[1].tolist()) == {0}
    with pytest.raises(UnlearnError, match=r"sd.concept 'Elon Musk' \(identity\) is not drawn by the pipeline"):
        target_of("Elon Musk", "identity", D.WORLD)
    more = prompt_sets(target_of("Mickey", "object", D.WORLD), D.Templates(), 1, forget_per_prompt=4)
    assert len(more["forget"][0]) == 4 * len(D.STYLE_AXIS) and len(more["rest"][0]) == (len(D.OBJECT_AXIS) - 1) * len(D.STYLE_AXIS)


def test_prompt_moments_mix_into_the_text_tensors_only(tiny_clip):
    from unlearn.models.inputs import input_moments
    from unlearn.sd.unlearn import mix_prompt_moments, retain_prompts, target_of

    clip = to_hf_clip(copy.deepcopy(tiny_clip))
    prompts = retain_prompts(target_of("Mickey", "object", D.WORLD), D.Templates())
    assert "" in prompts and not any("Mickey" in q for q in prompts) and len(prompts) == (len(D.OBJECT_AXIS) - 1) * len(D.STYLE_AXIS) + 1
    text = next(c for c in clip.candidate_layers() if c.startswith("text_model.") and "fc2" in c)
    image = next(c for c in clip.candidate_layers() if c.startswith("vision_model.") and "fc2" in c)
    captions = {n: torch.eye(dict(clip.model.named_parameters())[n].shape[1], dtype=torch.float64) for n in (text, image)}
    ours, _ = input_moments(clip, [text], [(torch.zeros(len(prompts), 3, 1, 1), clip.tokenize(prompts))])
    mixed = mix_prompt_moments(clip, captions, prompts, 0.25)
    assert torch.allclose(mixed[text], 0.75 * captions[text] + 0.25 * ours[text]) and not torch.allclose(mixed[text], captions[text])
    assert mixed[image] is captions[image]  # the vision tower is not what the pipeline reads
    assert mix_prompt_moments(clip, captions, prompts, 0.0) is captions
    with pytest.raises(UnlearnError, match=r"sd.search.prompt_moments is 1.5; give a weight in \[0, 1\]"):
        mix_prompt_moments(clip, captions, prompts, 1.5)


def test_search_moments_adds_the_embedding_only_when_it_is_searched_and_mixes_every_text_tensor(tiny_clip, tiny_world):
    """What both diffusion callers hand `find_edit`: with `none` the retain statistics' text moments
    mixed with the prompts and no extra candidate; with `first` or `ranked` the token embedding's
    caption frequencies too, mixed the same way; the statistics passed in are left as they were."""
    from types import SimpleNamespace

    from unlearn.methods.retain_stats import compute_retain_stats
    from unlearn.sd.unlearn import (
        TOKEN_EMBEDDING,
        caption_token_moments,
        mix_prompt_moments,
        outcome,
        retain_prompts,
        search_moments,
        target_of,
    )

    clip = to_hf_clip(copy.deepcopy(tiny_clip))
    g = torch.Generator().manual_seed(0)
    stats = compute_retain_stats(clip, lambda: iter([(torch.randn(3, 3, 64, 64, generator=g), clip.tokenize(["a red car", "a tree", "a fish"]))]))
    before = dict(stats.moments)
    prompts = retain_prompts(target_of("Mickey", "object", D.WORLD), D.Templates())
    none, extra, first = search_moments(clip, stats, tiny_world / "laion", prompts, 0.5, "none", "k")
    assert (extra, first) == ([], []) and TOKEN_EMBEDDING not in none.moments
    assert none.moments.keys() == mix_prompt_moments(clip, before, prompts, 0.5).keys()
    assert all(torch.equal(none.moments[n], v) for n, v in mix_prompt_moments(clip, before, prompts, 0.5).items())
    for rule, searched_first in (("first", [TOKEN_EMBEDDING]), ("ranked", [])):
        mixed, extra, first = search_moments(clip, stats, tiny_world / "laion", prompts, 0.5, rule, "k")
        assert extra == [TOKEN_EMBEDDING] and first == searched_first
        expected = mix_prompt_moments(clip, {**before, **caption_token_moments(clip, tiny_world / "laion")}, prompts, 0.5)[TOKEN_EMBEDDING]
        assert torch.equal(mixed.moments[TOKEN_EMBEDDING], expected)
    assert stats.moments.keys() == before.keys() and all(stats.moments[n] is v for n, v in before.items())
    with pytest.raises(UnlearnError, match=r"^params.yaml unlearncanvas.slug.token_embedding is 'yes'"):
        search_moments(clip, stats, tiny_world / "laion", prompts, 0.5, "yes", "unlearncanvas.slug.token_embedding")
    edit = SimpleNamespace(layer="text_model.x", rho=0.5, converged=True, choice={"fallback": "guard"})
    assert outcome(edit) == {"layer": "text_model.x", "rho": 0.5, "converged": True}
    assert list(outcome(SimpleNamespace(**{**vars(edit), "converged": False}))) == ["layer", "rho", "converged", "fallback"]


def test_the_token_embedding_is_a_candidate_on_request_and_its_step_moves_only_forget_tokens(tiny_clip, tiny_world):
    """`token_embedding: first | ranked` adds the embedding table to the ranked candidates (first:
    searched before them); its moments are
    the token frequencies of the retain captions mixed with the pipeline's prompts; its
    preconditioned step moves only rows of tokens the forget captions hold, the target's row more
    than the start-of-text row every caption and prompt holds.  Any other value is one line."""
    from unlearn.methods.slug import RankConfig, SearchConfig, forget_gradient, rank, step_directions
    from unlearn.sd.unlearn import (
        TOKEN_EMBEDDING,
        caption_token_moments,
        extra_candidates,
        mix_prompt_moments,
        reads,
        retain_prompts,
        target_of,
    )

    assert extra_candidates("none", "k") == ([], []) and extra_candidates("ranked", "k") == ([TOKEN_EMBEDDING], [])
    assert extra_candidates("first", "k") == ([TOKEN_EMBEDDING], [TOKEN_EMBEDDING])
    for bad in (True, "yes"):
        with pytest.raises(UnlearnError, match=r"^params.yaml sd.search.token_embedding is .*; use first \(the token embedding searched before "
                                               r"the ranked layers\), ranked \(a candidate like the others\) or none$"):
            extra_candidates(bad, "sd.search.token_embedding")
    clip = to_hf_clip(copy.deepcopy(tiny_clip))
    g = torch.Generator().manual_seed(0)
    forget = clip.tokenize(["Mickey at the beach", "a Mickey toy", "Mickey waving"])
    g_f, _, _ = forget_gradient(clip, [(torch.randn(3, 3, 64, 64, generator=g), forget)])
    g_r, _, _ = forget_gradient(clip, [(torch.randn(3, 3, 64, 64, generator=g), clip.tokenize(["a red car", "a tree", "a fish"]))])
    keep = lambda n: reads(n, 99)  # noqa: E731
    assert TOKEN_EMBEDDING not in rank(clip, g_f, g_r, RankConfig(towers=["text"]), keep).order["text"]
    assert TOKEN_EMBEDDING in rank(clip, g_f, g_r, RankConfig(towers=["text"]), keep, [TOKEN_EMBEDDING]).order["text"]
    with pytest.raises(UnlearnError, match=r"has no tensor 'text_model.embeddings.nothing.weight' to add to the candidates"):
        rank(clip, g_f, g_r, RankConfig(towers=["text"]), keep, ["text_model.embeddings.nothing.weight"])
    captions = caption_token_moments(clip, tiny_world / "laion")
    freq = captions[TOKEN_EMBEDDING]
    assert freq.shape == (dict(clip.model.named_parameters())[TOKEN_EMBEDDING].shape[0],) and abs(float(freq.sum()) - 1) < 1e-9
    prompts = retain_prompts(target_of("Mickey", "object", D.WORLD), D.Templates())
    mixed = mix_prompt_moments(clip, captions, prompts, 0.5)
    assert not torch.equal(mixed[TOKEN_EMBEDDING], freq) and abs(float(mixed[TOKEN_EMBEDDING].sum()) - 1) < 1e-9
    d = step_directions(clip, g_f, [TOKEN_EMBEDDING], SearchConfig(), mixed)[TOKEN_EMBEDDING]
    moved = set(d.ne(0).any(dim=1).nonzero().flatten().tolist())
    assert moved and moved <= set(forget.flatten().tolist())
    mickey, start = int(clip.tokenize(["Mickey"])[0, 1]), int(forget[0, 0])
    assert d[start].norm() > 0 and d[mickey].norm() > 10 * d[start].norm()


class _ForgetsAnyEdit:
    """An evaluator whose every edited step forgets the target and keeps the rest."""

    def reset(self):
        pass

    def prepare(self, edited=None):
        pass

    def evaluate(self, edited=None, sets=("forget", "retain", "utility"), reference=False):
        forget = 1.0 if reference else 0.0
        return {"forget_top1": forget, "forget_top5": forget, "retain_top1": 0.9, "retain_top5": 0.9, "utility_top1": 0.9, "utility_top5": 0.9}


def test_token_embedding_first_is_searched_first_and_its_patch_stores_the_rows_it_moves(tiny_clip, tiny_world, tmp_path):
    """With `first`, the embedding is the first searched layer within `max_layers` (and with
    `stop: first` the only one when it passes); its edit moves only forget tokens' rows, and the
    patch stores those rows, a fraction of the table's bytes, applied back to the same tensor."""
    from unlearn.methods.retain_stats import compute_retain_stats
    from unlearn.methods.slug import RankConfig, SearchConfig, find_edit, read_patch, save_patch
    from unlearn.sd.unlearn import TOKEN_EMBEDDING, caption_token_moments, extra_candidates

    clip = to_hf_clip(copy.deepcopy(tiny_clip))
    g = torch.Generator().manual_seed(1)
    forget = (torch.randn(3, 3, 64, 64, generator=g), clip.tokenize(["Mickey at the beach", "a Mickey toy", "Mickey waving"]))
    stats = compute_retain_stats(clip, lambda: iter([(torch.randn(3, 3, 64, 64, generator=g), clip.tokenize(["a red car", "a tree", "a fish"]))]))
    stats = dataclasses.replace(stats, moments={**stats.moments, **caption_token_moments(clip, tiny_world / "laion")})
    rank_cfg, cfg = RankConfig(towers=["text"]), SearchConfig(max_layers=3, evals_per_layer=2, rho_max=0.4, stop="all")
    extra, first = extra_candidates("first", "k")
    edit, _ = find_edit(clip, lambda: iter([forget]), stats, _ForgetsAnyEdit(), "object", rank_cfg, cfg, extra=extra, first=first)
    ranked, _ = find_edit(clip, lambda: iter([forget]), stats, _ForgetsAnyEdit(), "object", rank_cfg, cfg)
    assert edit.layers[0] == TOKEN_EMBEDDING and edit.layers[1:] == ranked.layers[:2] and len(edit.layers) == 3
    alone, _ = find_edit(clip, lambda: iter([forget]), stats, _ForgetsAnyEdit(), "object", rank_cfg, dataclasses.replace(cfg, stop="first"),
                         extra=extra, first=first)
    assert alone.layers == [TOKEN_EMBEDDING] and alone.layer == TOKEN_EMBEDDING and alone.converged
    moved = alone.delta.ne(0).any(dim=1).nonzero().flatten()
    assert 0 < len(moved) <= len(set(forget[1].flatten().tolist()))
    save_patch(tmp_path, alone.layer, alone.delta, {"track": "sd"})
    meta, tensors = read_patch(tmp_path, "re-run")
    assert meta["rows"] == len(moved) and torch.equal(tensors[TOKEN_EMBEDDING], alone.delta)
    assert (tmp_path / "patch.safetensors").stat().st_size < alone.delta.numel() * 4 / 20


def test_tied_text_encoder_edit_reaches_the_pipeline_and_nothing_else(pipeline, tiny_clip, tmp_path):
    from unlearn.methods.slug import save_patch
    from unlearn.sd.unlearn import apply_sd_patch, reads, tie_text_encoder, used_layers

    clip = to_hf_clip(copy.deepcopy(tiny_clip))
    pipe = copy.deepcopy(pipeline)
    tie_text_encoder(pipe, clip.model, "the pipeline", "the CLIP")
    n = used_layers(pipe)
    assert n == clip.model.config.text_config.num_hidden_layers
    cands = [c for c in clip.candidate_layers() if reads(c, n)]
    assert cands and all(c.startswith("text_model.") for c in cands) and not reads("text_projection.weight", n)
    assert not reads(f"text_model.encoder.layers.{n - 1}.mlp.fc1.weight", n - 1)  # a pipeline reading the penultimate layer
    layer = next(c for c in cands if "mlp.fc2" in c)
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items()} | {f"vae.{k}": v.clone() for k, v in pipe.vae.state_dict().items()}
    prompts, cfg = ["A photo of a car.", "An apple image in Neon style."], SampleConfig(steps=2, batch_size=2)
    before = generate(pipe, prompts, cfg, seed=1, size=16)
    delta = 0.5 * torch.randn_like(dict(clip.model.named_parameters())[layer])
    with torch.no_grad():
        dict(clip.model.named_parameters())[layer].add_(delta)
    after = generate(pipe, prompts, cfg, seed=1, size=16)
    assert not torch.equal(before, after)  # the pipeline reads the CLIP's tensor
    assert all(torch.equal(v, frozen[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, frozen[f"vae.{k}"]) for k, v in pipe.vae.state_dict().items())
    # the patch applied to an untouched pipeline in one call draws the same
    save_patch(tmp_path, layer, delta, {"track": "sd"})
    fresh = copy.deepcopy(pipeline)
    apply_sd_patch(fresh, tmp_path)
    assert torch.equal(generate(fresh, prompts, cfg, seed=1, size=16), after)
    save_patch(tmp_path, "text_model.encoder.layers.0.mlp.fc2.weight", torch.zeros(3, 3), {"track": "sd"})
    with pytest.raises(UnlearnError, match=r"which this pipeline's text encoder lacks \(a patch for another encoder\)"):
        apply_sd_patch(fresh, tmp_path)
    save_patch(tmp_path, layer, delta, {"track": "clip"})
    with pytest.raises(UnlearnError, match="is not a Stable Diffusion SLUG patch"):
        apply_sd_patch(fresh, tmp_path)


def test_text_encoder_of_another_clip_is_refused(pipeline):
    from transformers import CLIPConfig, CLIPModel

    from unlearn.sd.unlearn import tie_text_encoder

    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    other = CLIPModel(CLIPConfig(text_config=small, vision_config=small | {"image_size": 32, "patch_size": 8}))
    pipe = copy.deepcopy(pipeline)
    with pytest.raises(UnlearnError, match=r"the text encoder of P does not match the CLIP C \(first difference: .*\); give the CLIPModel"):
        tie_text_encoder(pipe, other, "P", "C")


def test_a_pipeline_reading_fewer_layers_ties_them_and_refuses_an_edit_of_the_rest(pipeline, tiny_clip, tmp_path):
    from unlearn.methods.slug import save_patch
    from unlearn.sd.unlearn import apply_sd_patch, reads, tie_text_encoder, used_layers

    clip = to_hf_clip(copy.deepcopy(tiny_clip))
    pipe = copy.deepcopy(pipeline)
    n = len(pipe.text_encoder.encoder.layers)
    pipe.text_encoder.encoder.layers = pipe.text_encoder.encoder.layers[: n - 1]  # the penultimate layer's output, as SD 2.x
    tie_text_encoder(pipe, clip.model, "P", "C")
    assert used_layers(pipe) == n - 1 and pipe.text_encoder.encoder.layers[0] is clip.model.text_model.encoder.layers[0]
    last = f"text_model.encoder.layers.{n - 1}.mlp.fc2.weight"
    assert not reads(last, used_layers(pipe)) and reads(last.replace(f".{n - 1}.", ".0."), used_layers(pipe))
    save_patch(tmp_path, last, torch.zeros_like(dict(clip.model.named_parameters())[last]), {"track": "sd"})
    with pytest.raises(UnlearnError, match="which this pipeline's text encoder lacks"):
        apply_sd_patch(pipe, tmp_path)


class _Opaque:
    """An object a full pickle would rebuild by running code: what weights_only refuses."""


def _foreign_classifier(folder, classes, arch="vit_tiny_patch16_224", rows=None, axis="style", wrapped=True):
    """A timm classifier saved as UnlearnCanvas ships its own (torch.save({"model_state_dict": ...}),
    or a bare state dict), its class order in classes.json."""
    import json

    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=rows or len(classes)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3} if wrapped else model.state_dict(), folder / f"{axis}_classifier.pth")
    listed = folder / "classes.json"
    listed.write_text(json.dumps((json.loads(listed.read_text()) if listed.is_file() else {}) | {axis: classes}))
    return model


def test_a_classifier_trained_elsewhere_is_read_weights_only_reordered_to_the_axis_and_saved_as_safetensors(tmp_path, monkeypatch):
    """UnlearnCanvas's real path: its classifier answers in its own class order (Seed_Images for
    the photos, classes the canvas lacks); imported, it answers in the axis's order, drawings it
    puts on a class beyond the axis count as wrong, and it round-trips through models/sd_judges."""
    from unlearn.sd.fid import frechet_distance
    from unlearn.sd.judges import Judges, classifier_classes, import_classifier

    axis = list(D.STYLE_AXIS)
    theirs = ["Cubism", *reversed(axis[1:]), "Seed_Images"]  # another order, one class beyond the axis, photo by its canvas name
    model = _foreign_classifier(tmp_path / "uc", theirs)
    judge = import_classifier(tmp_path / "uc" / "style_classifier.pth", classifier_classes(tmp_path / "uc", "style"), axis,
                              "vit_tiny_patch16_224", 224, D.PHOTO)
    assert judge.classes == [*axis, "Cubism"] and judge.num_features == 192
    x = D.render_images(0, D.JUDGE_STREAM, 1, 16).as_float()[:12]
    with torch.no_grad():
        their_pred = model(torch.nn.functional.interpolate(x, size=224, mode="bilinear", antialias=True)).argmax(-1)
    expected = torch.tensor([judge.classes.index(D.PHOTO if theirs[k] == "Seed_Images" else theirs[k]) for k in their_pred.tolist()])
    assert torch.equal(judge.predict(x), expected)
    (tmp_path / "judges").mkdir()
    save_judges(tmp_path / "judges", {"style": judge}, 16, {"held_out": {}})
    loaded = load_judges(tmp_path / "judges")
    assert sorted(p.name for p in (tmp_path / "judges").iterdir()) == ["judges.json", "style.safetensors"]
    assert loaded["style"].classes == judge.classes and torch.equal(loaded["style"].predict(x), expected)
    assert frechet_distance(Judges({"style": loaded["style"]}, 16, {}), x[:6], x[6:]) > 0
    # without classes.json the order is UnlearnCanvas's: its folder names sorted, Seed_Images among them
    (tmp_path / "uc" / "classes.json").unlink()
    uc = classifier_classes(tmp_path / "uc", "style")
    assert len(uc) == 51 and uc == sorted(uc) and "Seed_Images" in uc and len(classifier_classes(tmp_path / "uc", "object")) == 20


@pytest.mark.parametrize("fault, message", [
    ("pickle", r"is not a weights-only torch checkpoint \(UnpicklingError\); re-save its state dict"),
    ("classes", r"does not know Sepia of the canvas .*give judges of this canvas's classes"),
    ("rows", r"answers over 5 classes but its class list has 9; give classes.json"),
    ("arch", r"is not a resnet10t .*set sd.judges.timm.arch to its architecture"),
    ("missing", r"no classifier at .*object_classifier.pth"),
])
def test_a_classifier_by_path_that_does_not_fit_is_one_line(tmp_path, fault, message):
    from unlearn.sd.judges import classifier_classes, import_classifier

    axis = list(D.STYLE_AXIS)
    folder = tmp_path / "uc"
    theirs = [c for c in axis if c != "Sepia"] + ["Cubism"] if fault == "classes" else axis
    _foreign_classifier(folder, theirs, rows=5 if fault == "rows" else None)
    path = folder / ("object_classifier.pth" if fault == "missing" else "style_classifier.pth")
    if fault == "pickle":  # a full pickle (an object, not tensors): weights_only refuses to run it
        torch.save({"model_state_dict": _Opaque()}, path)
    with pytest.raises(UnlearnError, match=message):
        import_classifier(path, classifier_classes(folder, "style"), axis, "resnet10t" if fault == "arch" else "vit_tiny_patch16_224", 224, D.PHOTO)


def test_stage_sd_judges_converts_classifiers_by_path_and_tests_them_on_the_canvas(tmp_path, monkeypatch):
    """`sd.judges.pretrained: folder`: both axes' classifiers (here timm resnet10t, whose head is
    `fc`) converted into models/sd_judges and tested on the held-out canvas like trained judges."""
    import json
    import time

    from stages import sd_judges
    from unlearn.data import synthetic as S
    from unlearn.sd.judges import TimmConfig

    S.write_canvas(S.SyntheticConfig(seed=3, image_size=32, canvas_per_cell=1), tmp_path / "data" / "eval" / "canvas")
    folder = tmp_path / "uc"
    _foreign_classifier(folder, list(D.STYLE_AXIS), arch="resnet10t")
    _foreign_classifier(folder, list(D.OBJECT_AXIS), arch="resnet10t", axis="object", wrapped=False)
    monkeypatch.chdir(tmp_path)
    for d in ("models", "metrics"):
        (tmp_path / d).mkdir()
    sd_judges.imported(folder, TimmConfig("resnet10t", 32), 16, time.perf_counter())
    judges = load_judges(tmp_path / "models" / "sd_judges")
    assert {a: j.classes for a, j in judges.by_axis.items()} == {"object": list(D.OBJECT_AXIS), "style": list(D.STYLE_AXIS)}
    assert judges.config["axes"]["style"]["kind"] == "timm" and judges.config["pretrained"] == str(folder)
    metrics = json.loads((tmp_path / "metrics" / "sd_judges.json").read_text())
    assert metrics["held_out_images"] == len(D.OBJECT_AXIS) * len(D.STYLE_AXIS)
    assert 0 <= metrics["held_out_real"]["object"]["accuracy"] <= 1 and judges.config["held_out"]["style"] == metrics["held_out_real"]["style"]["accuracy"]
    with pytest.raises(UnlearnError, match=r"sd.judges.pretrained .*none is not a folder"):
        sd_judges.imported(tmp_path / "none", TimmConfig("resnet10t", 32), 16, time.perf_counter())


# A canvas that is not the world's: UnlearnCanvas's folder names (underscores for spaces), its
# Seed_Images, three objects and two styles; the axes, the judges and every prompt follow it.
UC_OBJECTS, UC_STYLES = ["Dogs", "Cats", "Towers"], ["Van_Gogh", "Ukiyoe"]


def _uc_canvas(root, per_cell=1):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for s in ["Seed_Images", *UC_STYLES]:
        for o in UC_OBJECTS:
            (root / s / o).mkdir(parents=True)
            for n in range(1, per_cell + 1):
                pix = (torch.rand(20, 20, 3, generator=rng) * 255).to(torch.uint8).numpy()
                Image.fromarray(pix).save(root / s / o / f"{n}.jpg")
    return root


def test_axes_are_read_from_the_canvas_and_label_its_images(tmp_path):
    from unlearn.data import synthetic as S

    axes = D.canvas_axes(_uc_canvas(tmp_path / "uc"))
    assert axes == D.Axes(("Cats", "Dogs", "Towers"), (D.PHOTO, "Ukiyoe", "Van Gogh")) and axes != D.WORLD
    assert axes.cells()[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)] and axes.prompt(D.Templates(), (2, 2)) == "An Towers image in Van Gogh style."
    images = D.canvas_images(tmp_path / "uc", 8, axes)
    assert len(images) == 9 and sorted(set(zip(images.objects.tolist(), images.styles.tolist()))) == sorted(axes.cells())
    cells = axes.cell_of(images)  # an index into cells(), whose styles axis is 3 long (not the highest label + 1)
    assert [axes.cells()[i] for i in cells.tolist()] == list(zip(images.objects.tolist(), images.styles.tolist()))
    drawn = images.subset(images.styles < 2)  # no image of the last style: the index must not shrink with it
    assert [axes.cells()[i] for i in axes.cell_of(drawn).tolist()] == list(zip(drawn.objects.tolist(), drawn.styles.tolist()))
    with pytest.raises(UnlearnError, match=r"style 'photo' / object 'Cats' is not on the judges' axes \(styles .*; objects Mickey"):
        D.canvas_images(tmp_path / "uc", 8, D.WORLD)
    S.write_canvas(S.SyntheticConfig(seed=3, image_size=32, canvas_per_cell=1), tmp_path / "world")
    assert D.canvas_axes(tmp_path / "world") is D.WORLD  # the world's canvas keeps the world's order
    import shutil

    shutil.rmtree(tmp_path / "uc" / "Seed_Images")
    with pytest.raises(UnlearnError, match=r"has no Seed_Images/ folder"):
        D.canvas_axes(tmp_path / "uc")
    with pytest.raises(UnlearnError, match=r"with 'photo' first"):
        D.Axes(("a",), ("Sepia", D.PHOTO))
    with pytest.raises(UnlearnError, match=r"the object axis names a class twice"):
        D.Axes(("a", "a"), (D.PHOTO,))


def test_judges_by_path_on_another_canvas_carry_its_axes_to_every_prompt(tmp_path, monkeypatch, pipeline):
    """UnlearnCanvas's real path end to end on the library: classifiers that know more classes
    than the canvas (and name them with underscores) become judges over the canvas's axes; targets,
    prompt sets, answer sets and the search's evaluator all follow those axes."""
    import time

    from stages import sd_judges
    from unlearn.sd.canvas import answer_set as canvas_answers
    from unlearn.sd.canvas import check_targets
    from unlearn.sd.judges import TimmConfig
    from unlearn.sd.unlearn import SdEvaluator, prompt_sets, target_of

    _uc_canvas(tmp_path / "data" / "eval" / "canvas")
    folder = tmp_path / "uc"
    _foreign_classifier(folder, ["Seed_Images", "Monet", *reversed(UC_STYLES)], arch="resnet10t")
    _foreign_classifier(folder, ["Birds", *UC_OBJECTS], arch="resnet10t", axis="object")
    monkeypatch.chdir(tmp_path)
    for d in ("models", "metrics"):
        (tmp_path / d).mkdir()
    sd_judges.imported(folder, TimmConfig("resnet10t", 32), 16, time.perf_counter())
    judges = load_judges(tmp_path / "models" / "sd_judges")
    axes = judges.axes
    assert axes == D.Axes(("Cats", "Dogs", "Towers"), (D.PHOTO, "Ukiyoe", "Van Gogh"))
    assert judges["style"].classes == [D.PHOTO, "Ukiyoe", "Van Gogh", "Monet"] and judges["object"].classes[-1] == "Birds"
    target = target_of("Van Gogh", "style", axes)
    sets = prompt_sets(target, D.Templates(), 1)
    assert sets["forget"][0] == [f"An {o} image in Van Gogh style." for o in axes.objects] and len(sets["rest"][0]) == 6
    assert len(canvas_answers(D.Templates(), 2, False, axes)) == 12
    assert [t.index for t in check_targets(["Dogs", "Van Gogh"], "k", axes)] == [1, 2]
    with pytest.raises(UnlearnError, match=r"sd.concept 'Sepia' \(style\) is not drawn by the pipeline; .*styles Ukiyoe, Van Gogh"):
        target_of("Sepia", "style", axes)
    ev = SdEvaluator(pipeline, judges, target, D.Templates(), SampleConfig(steps=1, batch_size=64), 1, 3, 16)
    r = ev.evaluate()
    assert ev.sizes == {"forget": 3, "retain": 6, "utility": 6} and 0 <= r["forget_top1"] <= 1
    assert ev.images["forget"].shape == (3, 3, 16, 16)
    with pytest.raises(UnlearnError, match=r"the judges answer over other axes than the target 'Sepia'"):
        SdEvaluator(pipeline, judges, target_of("Sepia", "style", D.WORLD), D.Templates(), SampleConfig(steps=1), 1, 3, 16)


def test_a_diffusers_folder_is_adopted_as_the_base_pipeline_and_a_foreign_text_encoder_refused(tmp_path, monkeypatch, pipeline, clip_dir):
    """`sd.pretrained: path`: sd_base checks the folder's text encoder against the CLIP (values
    too: a fine-tuned encoder would be silently replaced when tied), switches it to DDIM, draws and
    judges every prompt of the judges' axes, and saves it as models/sd_base, loadable offline."""
    import json
    import shutil
    import time

    from stages import sd_base

    judges = {"object": train_judge(torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0]), list(D.OBJECT_AXIS), JudgeConfig(steps=1, batch_size=4))[0],
              "style": train_judge(torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0]), list(D.STYLE_AXIS), JudgeConfig(steps=1, batch_size=4))[0]}
    for d in ("models/sd_judges", "models/hf", "metrics", "plots"):
        (tmp_path / d).mkdir(parents=True)
    save_judges(tmp_path / "models" / "sd_judges", judges, 16, {"held_out": {"object": 0.5, "style": 0.5}})
    shutil.copytree(clip_dir, tmp_path / "models" / "hf" / "base")
    pipeline.save_pretrained(tmp_path / "elsewhere", safe_serialization=True)
    monkeypatch.chdir(tmp_path)
    params = {"model.device": "cpu", "sd.image_size": 16, "sd.precision": "auto", "sd.templates": {}, "sd.sample": {"steps": 2, "images_per_prompt": 1, "batch_size": 256}}
    outs = ("models/sd_base", "metrics/sd_base.json", "plots/sd_base.png", "plots/sd_base_curve.csv")
    sd_base.adopt(tmp_path / "elsewhere", params.get, *outs, "sd_base", time.perf_counter())
    metrics = json.loads((tmp_path / "metrics" / "sd_base.json").read_text())
    assert metrics["test"]["images"] == len(D.WORLD.cells()) and metrics["pretrained"] == str(tmp_path / "elsewhere")
    assert metrics["sampler"]["scheduler"] == "DDIMScheduler" and (tmp_path / "plots" / "sd_base_curve.csv").read_text().strip() == "step,object,style"
    adopted = load_pipeline(tmp_path / "models" / "sd_base")
    assert type(adopted.scheduler).__name__ == "DDIMScheduler"
    assert all(torch.equal(v, pipeline.unet.state_dict()[k]) for k, v in adopted.unet.state_dict().items())
    # a text encoder with the CLIP's names and shapes but other values: refused, nothing overwritten
    before = {p: (tmp_path / p).stat().st_mtime_ns for p in outs[1:]}
    moved = copy.deepcopy(pipeline)
    with torch.no_grad():
        moved.text_encoder.encoder.layers[0].mlp.fc1.weight.add_(0.01)
    moved.save_pretrained(tmp_path / "finetuned", safe_serialization=True)
    with pytest.raises(UnlearnError, match=r"has the CLIP models/hf/base's names and shapes but other values \(1 tensors, first: "
                                           r"encoder.layers.0.mlp.fc1.weight\); give the CLIPModel the pipeline was trained with"):
        sd_base.adopt(tmp_path / "finetuned", params.get, *outs, "sd_base", time.perf_counter())
    assert {p: (tmp_path / p).stat().st_mtime_ns for p in outs[1:]} == before


def test_the_diffusion_search_config_is_the_clip_one_with_the_sd_keys_over_it():
    from tests.conftest import ROOT
    from unlearn.methods.slug import SearchConfig
    from unlearn.params import as_config, load_yaml
    from unlearn.sd.unlearn import search_config

    params = load_yaml(ROOT / "params.yaml")
    sd = dict(params["sd"]["search"]) | {"forget_rate": 0.1, "max_drop": 0.07, "rho_tolerance": 0.25, "max_layers": 3}
    cfg = search_config(dict(params["slug"]["search"]), sd, "sd.search")
    assert cfg.forget_top1 == cfg.forget_top5 == 0.1 and cfg.max_identity_drop == cfg.max_object_drop == cfg.max_style_drop == 0.07
    assert (cfg.rho_tolerance, cfg.max_layers, cfg.widen_to, cfg.moments) == (0.25, 3, 0, "shared")
    clip = as_config(SearchConfig, dict(params["slug"]["search"]), "slug.search")
    assert (cfg.stop, cfg.rho_start, cfg.rho_max, cfg.direction) == (clip.stop, clip.rho_start, clip.rho_max, clip.direction)  # what sd does not name
    assert search_config(dict(params["slug"]["search"]), sd, "sd.search", stop="first").stop == "first"
    for fallback in ("guard", "forget"):  # the diffusion track's own fallback, not the CLIP track's
        assert search_config(dict(params["slug"]["search"]) | {"fallback": "forget"}, sd | {"fallback": fallback}, "sd.search").fallback == fallback
    with pytest.raises(UnlearnError, match=r"^sd.search.fallback is 'none'; use forget \(when no layer passes.* or guard"):
        search_config(dict(params["slug"]["search"]), sd | {"fallback": "none"}, "sd.search")
    with pytest.raises(UnlearnError, match=r"slug.search.stop is 'last'"):
        search_config(dict(params["slug"]["search"]), sd, "sd.search", stop="last")


def _unet_steps(**kw):
    """The EMA weights after each of 3 UNet steps on random latents (ema 0: the EMA is the weights),
    the losses, and the freshly built UNet the seed gives."""
    from unlearn.sd.model import UnetConfig, build_unet
    from unlearn.sd.train import train_unet

    gen = torch.Generator().manual_seed(1)
    lat, pi, st = torch.randn(16, 4, 8, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen), torch.randn(4, 5, 16, generator=gen)
    cfg = UnetConfig(channels=[16, 32], attention_head_dim=4, steps=3, batch_size=8, ema=0.0, checkpoints=3, **kw)
    seen = []
    _, losses = train_unet(lat, pi, st, 3, cfg, seed=0, checkpoint=lambda ema, step, s: seen.append(copy.deepcopy(ema.state_dict())))
    torch.manual_seed(0)
    return seen, losses, build_unet(cfg, 8, 4, 16).state_dict()


def test_the_unet_schedule_options_change_what_training_does():
    plain, plain_losses, init = _unet_steps()
    assert not all(torch.equal(v, init[k]) for k, v in plain[0].items())  # a constant rate moves the weights at the first step
    warm, _, _ = _unet_steps(lr_schedule="cosine", warmup_steps=1)
    assert all(torch.equal(v, init[k]) for k, v in warm[0].items())  # the warm-up starts at rate 0: the first step leaves them
    assert not all(torch.equal(v, init[k]) for k, v in warm[1].items())
    _, snr_losses, _ = _unet_steps(snr_gamma=5.0)
    # the same weights, batch and noise at step 1; Min-SNR weights are <= 1 and < 1 at the low-noise steps drawn
    assert snr_losses[0] < plain_losses[0]


@pytest.mark.parametrize("values, message", [
    ({"lr_schedule": "linear"}, r"lr_schedule .* is 'linear'; use constant or cosine"),
    ({"steps": 10, "lr_schedule": "cosine", "warmup_steps": 10}, r"warmup_steps .* is 10, not below its steps \(10\)"),
    ({"warmup_steps": 5}, r"warmup_steps .* is 5 but its lr_schedule is constant, which has no warm-up"),
    ({"snr_gamma": -1.0}, r"^params.yaml sd.base.unet.snr_gamma is -1.0; it must be a number >= 0"),
    ({"ema": 1.0}, r"^params.yaml sd.base.unet.ema is 1.0; it must be"),
])
def test_a_unet_config_out_of_range_is_one_line(values, message):
    from unlearn.params import as_config
    from unlearn.sd.model import UnetConfig

    with pytest.raises(UnlearnError, match=message):
        as_config(UnetConfig, values, "sd.base.unet")
