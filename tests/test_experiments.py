"""Experiments over the tiny DVC project (tests/dvc_repo.py): `dvc exp run` of another concept, a
style and the transformers family, names that stop before any stage, `dvc plots diff`, and queued
sweeps, one and two at a time.  Apart from tests/test_pipeline.py so that the two run in
parallel (`make test`: pytest-xdist, one module per worker), each on its own tiny repository."""

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.dvc_repo import _commit, _run, _stages_run


def test_exp_run_forgets_another_concept(repo):
    _commit(repo, "baseline")
    proc = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", "concept=Mickey", "-n", "mickey"], repo)
    # the check's stamp does not change with the concept, so nothing upstream of curate reruns
    assert _stages_run(proc.stdout)[:3] == ["check", "curate", "gradients"], proc.stdout[-2000:]
    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo).stdout)
    text = json.dumps(shown)
    assert '"concept": "Mickey"' in text and '"kind": "object"' in text


def test_plots_diff_draws_both_revisions(repo):
    """After the Mickey experiment the workspace differs from the committed Elon Musk run: `dvc
    plots diff HEAD` draws each declared plot for both."""
    shown = json.loads(_run([sys.executable, "-m", "dvc", "plots", "diff", "HEAD", "--json"], repo).stdout)["data"]
    assert {"plots/search.csv", "plots/pareto/text.csv", "utility vs forget (compare)"} <= set(shown)
    search = shown["plots/search.csv"][0]
    assert set(search["revisions"]) == {"HEAD", "workspace"}
    layers = {rev: {row["layer"] for row in search["content"]["data"]["values"] if row["rev"] == rev} for rev in search["revisions"]}
    assert layers["HEAD"] and layers["workspace"]  # each revision's own search rows


@pytest.mark.parametrize("override, message", [
    ("concept=Elon Mask", "error: concept 'Elon Mask' is not in the concept table; closest known: 'Elon Musk'"),
    ("compare.concepts=[Taylor Swift,Mikey]", "error: concept 'Mikey' is not in the concept table; closest known: 'Mickey'"),
    ("compare.methods=[slug,salun2]", "error: unknown method 'salun2'; known methods: ft, ga, ga_ft, salun, slug, ssd"),
    ("model.family=timm", "error: unknown model family 'timm'; known families: open_clip, hf_clip"),
    ("slug.search.direction=retain", "error: slug.search.direction is 'retain'; known: gradient, retain_preconditioned"),
    ("vlm.concept=Mickey", "error: vlm.concept 'Mickey' is an object; the VLM track forgets an identity of the table"),
])
def test_exp_run_with_an_unknown_name_stops_before_any_other_stage(repo, override, message):
    _commit(repo, "before the bad experiment")
    params, lock = (repo / "params.yaml").read_bytes(), (repo / "dvc.lock").read_bytes()
    proc = _run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", override, "-n", "bad"], repo, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-2000:]
    if "not in the concept table" in message:
        assert "all known (params.yaml `concepts`): Elon Musk, Mark Zuckerberg" in out
    assert _stages_run(out) == ["check"], out[-2000:]
    assert (repo / "params.yaml").read_bytes() == params and (repo / "dvc.lock").read_bytes() == lock


def test_queued_sweep_over_concepts_and_methods(repo):
    """The sweep of docs/experiments.md: concepts x methods queued with -S sweeps, run by `dvc queue start`, read with `dvc exp show`."""
    _commit(repo, "before the sweep")
    dvc = [sys.executable, "-m", "dvc"]
    queued = _run([*dvc, "exp", "run", "--queue", "-S", "compare.concepts=[Taylor Swift],[Mickey]", "-S", "compare.methods=[slug],[ga_ft]"], repo)
    assert queued.stdout.count("Queued experiment") == 4, queued.stdout
    _run([*dvc, "queue", "start", "-j", "1"], repo)
    for _ in range(600):
        status = _run([*dvc, "queue", "status"], repo).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(1)
    assert status.count("Success") == 4, status
    shown = json.loads(_run([*dvc, "exp", "show", "--json"], repo).stdout)
    runs = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                params = data["params"]["params.yaml"]["data"]["compare"]
                metrics = data["metrics"]["metrics/compare.json"]["data"]
                runs[(params["concepts"][0], params["methods"][0])] = metrics
    assert set(runs) == {(c, m) for c in ("Taylor Swift", "Mickey") for m in ("slug", "ga_ft")}
    for (_concept, method), metrics in runs.items():  # dvc shows the numeric metrics (rows are lists: not shown)
        summary = metrics["methods"]
        assert list(summary) == [method] and summary[method]["concepts"] == 1 and summary[method]["failed"] == 0
        assert 0.0 <= summary[method]["forget_top1"] <= 1.0 and 0.0 <= summary[method]["utility_top1"] <= 1.0
    # one base model, two concepts: the base accuracies of the two concepts' retain classes differ
    assert runs[("Mickey", "slug")]["base"] == runs[("Mickey", "ga_ft")]["base"] != runs[("Taylor Swift", "slug")]["base"]


def _exp_runs(repo: Path) -> list[tuple[str, tuple, dict]]:
    """(name, (concepts, methods), metrics/compare.json) of every experiment on any commit."""
    runs = []
    for commit in json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--all-commits", "--json"], repo).stdout):
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev.get("data") or {}
                if "metrics/compare.json" not in (data.get("metrics") or {}):
                    continue
                compare = data["params"]["params.yaml"]["data"]["compare"]
                runs.append((rev.get("name") or exp.get("name") or rev["rev"], (tuple(compare["concepts"]), tuple(compare["methods"])),
                             data["metrics"]["metrics/compare.json"]["data"]))
    return runs


def _run_queue(repo: Path, jobs: int, runs: list[tuple[str, str]]) -> None:
    for name, concept in runs:
        _run([sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name, "-S", f"compare.concepts=[{concept}]",
              "-S", "compare.methods=[ga_ft]"], repo)
    _run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], repo)
    for _ in range(900):
        status = _run([sys.executable, "-m", "dvc", "queue", "status"], repo).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(1)
    assert all(re.search(rf"{name}\s.*Success", status) for name, _ in runs), status


def test_two_queued_experiments_at_once_give_the_metrics_each_gives_alone(repo):
    """`dvc queue start -j 2`: two experiments in two temporary copies at the same time give the
    metrics each gives run alone (-j 1: the sweep above ran the same params one at a time; run
    alone, this test queues them one at a time itself), to the last digit."""
    _run_queue(repo, 2, [("both-ts", "Taylor Swift"), ("both-mi", "Mickey")])
    runs = _exp_runs(repo)
    for concept, both in (("Taylor Swift", "both-ts"), ("Mickey", "both-mi")):
        key = ((concept,), ("ga_ft",))
        alone = [m for name, k, m in runs if k == key and not name.startswith("both-")]
        if not alone:
            _run_queue(repo, 1, [(f"alone-{both[-2:]}", concept)])
            alone = [m for name, k, m in _exp_runs(repo) if k == key and not name.startswith("both-")]
        together = [m for name, k, m in runs if name == both]
        assert len(together) == 1 and together[0]["methods"]["ga_ft"]["concepts"] == 1
        assert all(together[0] == m for m in alone), (together, alone)
    pair = [m for name, _, m in runs if name.startswith("both-")]
    assert pair[0] != pair[1]


def test_the_hf_clip_family_runs_the_clip_track(repo):
    """`dvc exp run -S model.family=hf_clip report`: the base model exported to a transformers
    CLIPModel, then curate .. evaluate, the export and the comparison on it (the stages the report
    reads; the diffusion track, which reads the exported text tower too, is left out: its rerun
    on a new CLIP would only repeat what the fixture's repro tested)."""
    _commit(repo, "before the hf_clip experiment")
    proc = _run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", "model.family=hf_clip", "-n", "hf", "report"], repo)
    ran = _stages_run(proc.stdout)
    assert {"base_model", "gradients", "search", "evaluate", "export", "compare_run@slug", "compare_run@salun", "report"} <= set(ran), ran
    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo).stdout)
    hf = [e for rev in shown for e in (rev.get("experiments") or []) if (e.get("name") == "hf")]
    assert hf, json.dumps(shown)[:2000]
    data = hf[0]["revs"][0]["data"]
    unlearn = data["metrics"]["metrics/unlearn.json"]["data"]
    layers = data["metrics"]["metrics/layers.json"]["data"]
    assert layers["family"] == "hf_clip" and unlearn["layer"].startswith(("text_model.", "vision_model.", "text_projection", "visual_projection"))
    # q, k, v, out, fc1, fc2 per block (open_clip: in_proj, out_proj, c_fc, c_proj) and the projection
    assert layers["candidates"] == {"image": 4 * 6 + 1, "text": 3 * 6 + 1}
    export = data["metrics"]["metrics/export.json"]["data"]
    assert export["base"]["family"] == "hf_clip" and export["base"]["image_embedding_max_abs_diff"] == 0.0
    compare = data["metrics"]["metrics/compare.json"]["data"]
    assert set(compare["methods"]) == {"slug", "ft", "ga", "ga_ft", "salun", "ssd"}
    assert (repo / "models" / "base" / "open_clip_model.safetensors").is_file()  # --temp: the workspace keeps the open_clip run


def test_exp_run_forgets_a_style(repo):
    """`dvc exp run -S concept=Sepia`: the forget set is the pairs whose caption names the style,
    and the CLIP track scores it among the styles on the canvas, with the objects as utility."""
    _commit(repo, "before the style experiment")
    proc = _run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", "concept=Sepia", "-n", "sepia"], repo)
    ran = _stages_run(proc.stdout)
    assert {"curate", "gradients", "search", "evaluate"} <= set(ran) and not {"download", "base_model", "retain_stats"} & set(ran), ran
    shown = json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo).stdout)
    sepia = [e for rev in shown for e in (rev.get("experiments") or []) if e.get("name") == "sepia"]
    assert sepia, json.dumps(shown)[:2000]
    unlearn = sepia[0]["revs"][0]["data"]["metrics"]["metrics/unlearn.json"]["data"]
    assert unlearn["concept"] == "Sepia" and unlearn["kind"] == "style"
    # test part of 14 objects x 2 canvas images per style; the utility set is ImageNet-style (14 objects x 3 images)
    frac = yaml.safe_load((repo / "params.yaml").read_text())["eval"]["split"]["val_fraction"]
    per_style, per_object = 28 - round(frac * 28), 3 - round(frac * 3)
    assert unlearn["images"] == {"forget": per_style, "retain": 7 * per_style, "utility": 14 * per_object}
    base = json.loads((repo / "metrics" / "base.json").read_text())
    assert base["style_images"] == 8 * 14 * 2 and 0.0 <= base["style_top1"] <= 1.0

