"""The UnlearnCanvas benchmark's parts on the tiny pipeline: one contract over every registered
diffusion method (it unlearns in place, changes only what it says it changed, is seeded), the
methods' own guarantees (SalUn's mask, UCE's closed form), and the protocol's aggregation."""

import copy

import pytest
import torch

from unlearn.errors import UnlearnError
from unlearn.sd import data as D
from unlearn.sd.canvas import PUBLISHED, answer_set, check_targets, leaderboard, means, named_mask, score
from unlearn.sd.evaluate import SampleConfig
from unlearn.sd.methods import Context, Diverged, check_methods, config_of, methods, run_method
from unlearn.sd.unlearn import Target

TINY = {"esd": {"iterations": 3, "batch_size": 2, "lr": 1e-3}, "salun": {"iterations": 3, "batch_size": 2, "mask_batches": 1, "lr": 1e-3},
        "ca": {"iterations": 3, "batch_size": 2, "anchor_images": 1, "lr": 1e-3}, "uce": {}}
UNET_METHODS = sorted(set(methods()) - {"slug"})  # every registered method but SLUG (its CLIP side: tests/test_pipeline.py)


@pytest.fixture(scope="module")
def real():
    return D.render_images(0, D.TRAIN_STREAM, 1, 16)


def _context(pipe, target: Target, real) -> Context:
    named = named_mask(real, target)
    return Context(pipe, target, D.Templates(), real.subset(named), real.subset(~named), SampleConfig(steps=2, images_per_prompt=1, batch_size=64), 16, 7)


def test_every_diffusion_method_is_registered_with_its_config():
    assert set(methods()) == {"slug", "esd", "salun", "uce", "ca"}
    assert config_of("esd", {"iterations": 5}, "unlearncanvas")["iterations"] == 5
    with pytest.raises(UnlearnError, match=r"unlearncanvas.esd has unknown keys steps"):
        config_of("esd", {"steps": 5}, "unlearncanvas")
    with pytest.raises(UnlearnError, match=r"^params.yaml unlearncanvas.salun.mask_fraction is 1.5; it must be a number in \(0, 1\]$"):
        config_of("salun", {"mask_fraction": 1.5}, "unlearncanvas")
    with pytest.raises(UnlearnError, match=r"^params.yaml unlearncanvas.esd.iterations is 0; it must be a number > 0$"):
        config_of("esd", {"iterations": 0}, "unlearncanvas")
    with pytest.raises(UnlearnError, match=r"^params.yaml unlearncanvas.slug.rho_tolerance is 1; it must be a number in \[0, 1\)$"):
        config_of("slug", {"rho_tolerance": 1}, "unlearncanvas")
    with pytest.raises(UnlearnError, match=r"^params.yaml unlearncanvas.slug.steps is 0; it must be a number > 0$"):
        config_of("slug", {"steps": 0}, "unlearncanvas")
    with pytest.raises(UnlearnError, match=r"unlearncanvas.slug.fallback is 'none'; use forget \(when no layer passes.* or guard"):
        config_of("slug", {"fallback": "none"}, "unlearncanvas")
    with pytest.raises(UnlearnError, match=r"^params.yaml unlearncanvas.slug.token_embedding is 1; use first .* or none$"):
        config_of("slug", {"token_embedding": 1}, "unlearncanvas")
    with pytest.raises(UnlearnError, match=r"^unlearncanvas.methods names an unknown method 'fmn'; known: ca, esd, salun, slug, uce$"):
        check_methods(["esd", "fmn"], "unlearncanvas.methods")


@pytest.mark.parametrize("method", UNET_METHODS)
@pytest.mark.parametrize("target", [Target("Sepia", "style", D.WORLD), Target("apple", "object", D.WORLD)], ids=["style", "object"])
def test_a_unet_method_changes_only_the_unet_tensors_it_returns_and_is_seeded(pipeline, real, method, target):
    pipe = copy.deepcopy(pipeline)
    before = {f"{part}.{n}": t.detach().clone() for part in ("unet", "vae", "text_encoder") for n, t in getattr(pipe, part).state_dict().items()}
    result = run_method(method, _context(pipe, target, real), TINY.get(method, {}), "unlearncanvas")
    after = {f"{part}.{n}": t for part in ("unet", "vae", "text_encoder") for n, t in getattr(pipe, part).state_dict().items()}
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.startswith("unet.") for n in moved)  # the text encoder and the autoencoder never move
    assert moved <= set(result.changed)  # what it ships covers every change ...
    assert all(torch.equal(result.changed[n], after[n]) for n in result.changed)  # ... with the new values
    again = copy.deepcopy(pipeline)
    run_method(method, _context(again, target, real), TINY.get(method, {}), "unlearncanvas")
    assert all(torch.equal(t, again.unet.state_dict()[n.removeprefix("unet.")]) for n, t in result.changed.items())
    if method in ("esd", "ca", "uce"):
        assert all(".attn2." in n for n in moved)  # cross-attention only
    if method in ("ca", "uce"):
        assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in moved)


def test_salun_moves_only_the_salient_half_of_the_unet(pipeline, real):
    pipe = copy.deepcopy(pipeline)
    before = {n: t.detach().clone() for n, t in pipe.unet.named_parameters()}
    result = run_method("salun", _context(pipe, Target("Sepia", "style", D.WORLD), real), TINY["salun"], "unlearncanvas")
    d = result.details
    assert d["mask_total"] == sum(t.numel() for t in before.values()) and abs(d["mask_kept"] / d["mask_total"] - 0.5) < 0.01
    moved = sum(int((t.detach() != before[n]).sum()) for n, t in pipe.unet.named_parameters())
    assert 0 < moved <= d["mask_kept"]


def test_uce_maps_the_target_onto_its_anchor_and_keeps_the_preserved(pipeline, real):
    from unlearn.sd.methods.common import attn2_params
    from unlearn.sd.methods.uce import name_states

    pipe = copy.deepcopy(pipeline)
    s, ends = name_states(pipe, ["Sepia", D.PHOTO, "Neon"])
    n = int(ends[:2].max()) + 1
    c, ca, cp = s[0, :n], s[1, :n], s[2, : int(ends[2]) + 1]
    old = {k: p.detach().clone() for k, p in attn2_params(pipe.unet, ("to_k", "to_v")).items()}
    run_method("uce", _context(pipe, Target("Sepia", "style", D.WORLD), real), {"lamb": 1e-3}, "unlearncanvas")
    for k, p in attn2_params(pipe.unet, ("to_k", "to_v")).items():
        w, w1 = old[k], p.detach()
        gap_before, gap_after = (c @ w.T - ca @ w.T).norm(), (c @ w1.T - ca @ w.T).norm()
        assert gap_after < 0.2 * gap_before  # the target now reads (nearly) as the anchor
        assert (cp @ w1.T - cp @ w.T).norm() < 0.2 * gap_before  # a preserved concept reads (nearly) as before


def test_a_diverging_method_raises_diverged(pipeline, real):
    with pytest.raises(Diverged, match=r"^esd: the loss is (nan|inf) at step \d+; lower its lr$"):
        run_method("esd", _context(copy.deepcopy(pipeline), Target("Sepia", "style", D.WORLD), real), {**TINY["esd"], "lr": 1e12, "iterations": 20},
                   "unlearncanvas")


def test_answer_set_and_scores():
    full, no_photo = answer_set(D.Templates(), 2, True, D.WORLD), answer_set(D.Templates(), 1, False, D.WORLD)
    cells = len(D.OBJECT_AXIS) * len(D.STYLE_AXIS)
    assert len(full) == 2 * cells and full.prompts[:cells] == full.prompts[cells:]
    assert len(no_photo) == len(D.OBJECT_AXIS) * (len(D.STYLE_AXIS) - 1) and not any(p.startswith("A photo") for p in no_photo.prompts)
    truth = {"object": full.objects.clone(), "style": full.styles.clone()}
    sepia = Target("Sepia", "style", D.WORLD)
    assert score(full, truth, sepia) == {"UA": 0.0, "IRA": 100.0, "CRA": 100.0}
    named = named_mask(full, sepia)
    assert int(named.sum()) == 2 * len(D.OBJECT_AXIS)
    pred = {"object": truth["object"].clone(), "style": truth["style"].clone()}
    pred["style"][named] = D.STYLE_AXIS.index("Neon")  # every Sepia drawing looks Neon: forgotten
    pred["style"][~named & (truth["style"] == D.STYLE_AXIS.index("Neon"))] = 0  # and the Neon ones lost
    pred["object"][named] = 0  # the object of a named drawing does not count in CRA
    s = score(full, pred, sepia)
    others = int((~named).sum())
    assert s["UA"] == 100.0 and s["IRA"] == round(100 * (others - 2 * len(D.OBJECT_AXIS)) / others, 2) and s["CRA"] == 100.0
    rows = [{"axis": "style", "status": "ok", "UA": 90.0, "IRA": 80.0, "CRA": 70.0, "fid": 1.0},
            {"axis": "style", "status": "failed", "UA": None, "IRA": None, "CRA": None, "fid": None},
            {"axis": "object", "status": "ok", "UA": 50.0, "IRA": 40.0, "CRA": 30.0, "fid": 3.0},
            {"axis": "object", "status": "ok", "UA": 70.0, "IRA": 60.0, "CRA": 50.0, "fid": 5.0}]
    m = means(rows)
    assert m["style"] == {"UA": 90.0, "IRA": 80.0, "CRA": 70.0, "fid": 1.0, "targets": 2, "failed": 1}
    assert m["object"]["UA"] == 60.0 and m["object"]["fid"] == 4.0
    table = leaderboard({"esd": m | {"stored_bytes": 2e6, "time_s": 3.0, "peak_memory_mb": 1024}}, timed=True)
    assert "| esd | 90.00 | 80.00 | 70.00 | 60.00 | 50.00 | 40.00 | 2.50 | 3.0 | 1.00 | 2.000 | 1 |" in table
    assert all(f"| {name} |" in table for name in PUBLISHED) and "time s" not in leaderboard({"esd": m | {"stored_bytes": None}}, timed=False).splitlines()[0]


def test_targets_must_be_styles_or_objects_of_the_canvas():
    assert [t.axis for t in check_targets(["Sepia", "apple"], "k", D.WORLD)] == ["style", "object"]
    every = check_targets("all", "k", D.WORLD)
    assert [t.name for t in every] == [*D.WORLD.styles[1:], *D.WORLD.objects] and D.PHOTO not in [t.name for t in every]
    assert check_targets(["Pixel_Art"], "k", D.WORLD)[0].name == "Pixel Art"  # UnlearnCanvas's folder spelling
    with pytest.raises(UnlearnError, match=r"^unlearncanvas.targets is 'Sepia'; list the targets \(\[Sepia, apple\]\) or write all"):
        check_targets("Sepia", "unlearncanvas.targets", D.WORLD)
    with pytest.raises(UnlearnError, match=r"^unlearncanvas.targets names 'Elon Musk', neither a style nor an object of the canvas \(styles .*; objects .*\)"):
        check_targets(["Elon Musk"], "unlearncanvas.targets", D.WORLD)
    with pytest.raises(UnlearnError, match="names a target twice"):
        check_targets(["Sepia", "Sepia"], "unlearncanvas.targets", D.WORLD)
    with pytest.raises(UnlearnError, match="photo"):
        check_targets([D.PHOTO], "unlearncanvas.targets", D.WORLD)


def test_a_canvas_with_a_missing_or_empty_cell_is_refused(tmp_path):
    from unlearn.data import synthetic as S
    from unlearn.sd.canvas import check_cells

    S.write_canvas(S.SyntheticConfig(seed=3, image_size=32, canvas_per_cell=1), tmp_path / "canvas")
    check_cells(D.canvas_images(tmp_path / "canvas", 16, D.WORLD), tmp_path / "canvas", D.WORLD)  # complete: no error
    for image in (tmp_path / "canvas" / "Sepia" / "apple").iterdir():
        image.unlink()  # an empty cell
    import shutil

    shutil.rmtree(tmp_path / "canvas" / "Seed_Images" / "car")  # a missing one
    with pytest.raises(UnlearnError, match=r"has no image in 2 cell\(s\): Seed_Images/car, Sepia/apple; every <Style>/<Object>/ folder"):
        check_cells(D.canvas_images(tmp_path / "canvas", 16, D.WORLD), tmp_path / "canvas", D.WORLD)


def test_saved_tensors_turn_the_base_pipeline_into_the_unlearned_one(pipeline, real, tmp_path):
    import safetensors.torch

    from unlearn.sd.methods import apply_changed

    pipe = copy.deepcopy(pipeline)
    result = run_method("ca", _context(pipe, Target("apple", "object", D.WORLD), real), TINY["ca"], "unlearncanvas")
    safetensors.torch.save_file({k: v.contiguous() for k, v in result.changed.items()}, tmp_path / "apple.safetensors")
    fresh = copy.deepcopy(pipeline)
    assert apply_changed(fresh, tmp_path / "apple.safetensors") == sorted(result.changed)
    assert all(torch.equal(a, b) for a, b in zip(fresh.unet.state_dict().values(), pipe.unet.state_dict().values()))
    safetensors.torch.save_file({"unet.no.such.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UnlearnError, match=r"sets unet.no.such.weight \[2\], which this pipeline lacks"):
        apply_changed(fresh, tmp_path / "other.safetensors")
    # a truncated copy, a missing file, a NaN: one line each, and the pipeline untouched (even by the tensors before the bad one)
    before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    data = (tmp_path / "apple.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnlearnError, match=r"cut.safetensors does not read as safetensors .*; re-run the unlearncanvas stage"):
        apply_changed(fresh, tmp_path / "cut.safetensors")
    with pytest.raises(UnlearnError, match=r"gone.safetensors does not read as safetensors"):
        apply_changed(fresh, tmp_path / "gone.safetensors")
    name = sorted(result.changed)[-1]
    spoiled = {k: v.contiguous() + 1 for k, v in result.changed.items()}
    spoiled[name] = torch.full_like(spoiled[name], float("nan"))
    safetensors.torch.save_file(spoiled, tmp_path / "nan.safetensors")
    with pytest.raises(UnlearnError, match=rf"nan.safetensors: {name} holds NaN or inf"):
        apply_changed(fresh, tmp_path / "nan.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in fresh.unet.state_dict().items())


def test_tensors_saved_by_rows_set_those_rows_only(pipeline, tmp_path):
    """An embedding edit ships the rows it moves and their indices (`Result`): applied, they set
    those rows and nothing else; indices out of range or without their rows are one line, with
    the pipeline untouched."""
    import safetensors.torch

    from unlearn.methods.slug import ROWS_SUFFIX
    from unlearn.sd.methods import apply_changed
    from unlearn.sd.unlearn import TOKEN_EMBEDDING, pipeline_name

    name = "text_encoder." + pipeline_name(TOKEN_EMBEDDING)
    fresh = copy.deepcopy(pipeline)
    table = dict(fresh.text_encoder.named_parameters())[name.removeprefix("text_encoder.")]
    before = table.detach().clone()
    rows = torch.tensor([2, 7], dtype=torch.int64)
    value = torch.randn(2, table.shape[1], generator=torch.Generator().manual_seed(0))
    safetensors.torch.save_file({name: value, name + ROWS_SUFFIX: rows}, tmp_path / "rows.safetensors")
    assert apply_changed(fresh, tmp_path / "rows.safetensors") == [name]
    after = table.detach()
    assert torch.equal(after[rows], value) and torch.equal(after[[i for i in range(len(before)) if i not in (2, 7)]],
                                                             before[[i for i in range(len(before)) if i not in (2, 7)]])
    for bad, message in (({name: value, name + ROWS_SUFFIX: torch.tensor([2, len(before)])}, r"the rows of .* are not indices of its \d+ rows"),
                         ({name + ROWS_SUFFIX: rows}, r"holds .*:rows without the rows it indexes"),
                         ({name: value[:1], name + ROWS_SUFFIX: rows}, r"sets .* \[1, \d+\], which this pipeline lacks")):
        safetensors.torch.save_file(bad, tmp_path / "bad.safetensors")
        kept = table.detach().clone()
        with pytest.raises(UnlearnError, match=message):
            apply_changed(fresh, tmp_path / "bad.safetensors")
        assert torch.equal(table.detach(), kept)


def test_a_real_canvas_splits_into_training_images_and_the_fid_real_set(tmp_path):
    """On real data the methods train on the first images of every cell and the FID compares with
    the rest; a cell too small to leave any is a one-line error."""
    from unlearn.data import synthetic as S
    from unlearn.sd.canvas import split_cells

    S.write_canvas(S.SyntheticConfig(seed=3, image_size=32, canvas_per_cell=3), tmp_path / "canvas")
    images = D.canvas_images(tmp_path / "canvas", 16, D.WORLD)
    train, rest = split_cells(images, 2, tmp_path / "canvas", D.WORLD)
    cells = len(D.WORLD.cells())
    assert len(train) == 2 * cells and len(rest) == cells and len(images) == 3 * cells
    key = lambda im: sorted(zip(im.objects.tolist(), im.styles.tolist()))  # noqa: E731
    assert key(rest) == sorted(D.WORLD.cells()) and key(train) == sorted(D.WORLD.cells() * 2)
    assert not any(torch.equal(a, b) for a in rest.pixels[:5] for b in train.pixels)
    with pytest.raises(UnlearnError, match=r"a cell of the canvas at .* holds 3 image\(s\), not more than unlearncanvas.train_images_per_cell \(3\)"):
        split_cells(images, 3, tmp_path / "canvas", D.WORLD)


def test_the_time_ratios_line_says_why_it_is_empty():
    from stages.unlearncanvas_report import ratio_text

    assert ratio_text({"esd": 1.1, "salun": 0.7}, True, "unlearncanvas") == "esd 1.1×, salun 0.7×"
    assert "runs/unlearncanvas@slug.json" in ratio_text({}, False, "unlearncanvas")    # SLUG not run in this workspace
    assert ratio_text({}, True, "unlearncanvas_small") == "none (no other method's run record here)"
