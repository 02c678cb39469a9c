"""`dvc repro` of a tiny world in a temporary git repository, and bad input through the stages."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.dvc_repo import _add_params, _commit, _run, _set_params, _stages_run


def test_repro_writes_every_output(repo):
    assert len(list((repo / "data" / "laion").glob("*.tar"))) == 2
    assert (repo / "data" / "eval" / "celeba" / "identity_names.txt").exists()
    assert (repo / "data" / "eval" / "imagenet" / "LOC_synset_mapping.txt").exists()
    assert (repo / "models" / "base" / "open_clip_model.safetensors").exists()
    assert (repo / "plots" / "world.png").stat().st_size > 10_000
    metrics = json.loads((repo / "metrics" / "base.json").read_text())
    for key in ("identity_top1", "identity_top5", "object_top1", "object_top5"):
        assert 0.0 <= metrics[key] <= 1.0
    record = json.loads((repo / "data" / "download.json").read_text())
    assert record["samples"] == 300 and record["source"] == "synthetic"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"check", "download", "base_model", "curate", "retain_set", "retain_stats", "concept_moments", "gradients", "rank_layers",
                                   "search", "evaluate", "export", "forget_many", "compare_data", "compare", "report",
                                   "vlm_retain_stats", "vlm_base", "vlm_unlearn", "sd_judges", "sd_base", "sd_base_small",
                                   "sd_unlearn", "sd_unlearn_small", "report_diffusion", "report_diffusion_small",
                                   *(f"compare_run@{m}" for m in ("slug", "ft", "ga", "ga_ft", "salun", "ssd")),
                                   *(f"{s}{m}" for s in ("unlearncanvas", "unlearncanvas_small")
                                     for m in ("_base", "_report", *(f"@{x}" for x in ("slug", "esd", "salun", "uce", "ca"))))}


def test_repro_is_up_to_date_and_metrics_show(repo):
    status = _run([sys.executable, "-m", "dvc", "status"], repo)
    assert "up to date" in status.stdout
    shown = json.loads(_run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], repo).stdout)
    errors = [path for rev in shown.values() for path, v in rev["data"].items() if "data" not in v]
    assert not errors, f"dvc metrics show cannot read {errors}"
    data = {path: v["data"] for rev in shown.values() for path, v in rev["data"].items()}
    assert "identity_top1" in data["metrics/base.json"] and data["runs/base_model.json"]["time_s"] > 0  # results and run records


def test_repro_on_a_fresh_clone_leaves_git_status_clean(repo, tmp_path):
    """A fresh clone (no DVC cache, no run records) reproduces every stage from scratch; every
    output comes out with the same bytes, so neither dvc.lock nor a committed metric, plot or
    report changes, and the cost of the run is only in runs/ (git-ignored)."""
    _commit(repo, "the first run")
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _run([sys.executable, "-m", "dvc", "config", "--local", "core.analytics", "false"], clone)
    status = json.loads(_run([sys.executable, "-m", "dvc", "status", "--json"], clone).stdout)
    missing = {stage for stage, changes in status.items() if any("changed outs" in c for c in changes if isinstance(c, dict))}  # cached outputs
    assert {"base_model", "gradients", "search", "retain_stats", "export", "vlm_base", "sd_base", "sd_unlearn"} <= missing
    proc = _run([sys.executable, "-m", "dvc", "repro"], clone)
    assert missing <= set(_stages_run(proc.stdout))  # rerun from scratch; the stages downstream of them whose outputs are all
    # committed (rank_layers, evaluate, compare, ...) find their inputs rebuilt with the same bytes, and stay up to date
    assert _run(["git", "status", "--porcelain", "--untracked-files=all"], clone).stdout == ""
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], clone).stdout
    assert _record(clone, "search")["time_s"] > 0 and _record(clone, "sd_base")["checkpoints_train_min"]  # the cost is only here


def test_unknown_source_fails_cleanly_and_keeps_outputs(repo):
    before = {p: p.read_bytes() for p in sorted((repo / "data" / "laion").iterdir())}
    original = (repo / "params.yaml").read_text()
    try:
        _set_params(repo, **{"data.source": "bogus"})
        proc = _run([sys.executable, "-m", "stages.download"], repo, check=False)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == ["error: unknown data.source 'bogus'; use one of: synthetic, laion"]
        assert {p: p.read_bytes() for p in sorted((repo / "data" / "laion").iterdir())} == before
        assert not list(repo.glob("data/.*tmp*"))
        world_png = (repo / "plots" / "world.png").read_bytes()
        proc = _run([sys.executable, "-m", "dvc", "repro", "download"], repo, check=False)
        assert proc.returncode != 0 and "unknown data.source 'bogus'" in proc.stdout + proc.stderr
        # the committed plot (cache: false) survives the failed run: it is persist: true in dvc.yaml
        assert (repo / "plots" / "world.png").read_bytes() == world_png
    finally:
        (repo / "params.yaml").write_text(original)
    # dvc removed the stage's outputs before running it; with the params back, it rebuilds the same bytes
    _run([sys.executable, "-m", "dvc", "repro", "download"], repo)
    assert {p: p.read_bytes() for p in sorted((repo / "data" / "laion").iterdir())} == before
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], repo).stdout


def test_unknown_architecture_fails_cleanly(repo):
    original = (repo / "params.yaml").read_text()
    before = (repo / "models" / "base" / "open_clip_model.safetensors").read_bytes()
    try:
        _set_params(repo, **{"model.arch": "ViT-B-33", "model.pretrained": "laion400m_e32"})
        proc = _run([sys.executable, "-m", "stages.base_model"], repo, check=False)
        assert proc.returncode == 1
        assert "error: unknown open_clip architecture 'ViT-B-33'" in proc.stderr
        assert (repo / "models" / "base" / "open_clip_model.safetensors").read_bytes() == before
    finally:
        (repo / "params.yaml").write_text(original)


UNLEARN_KEYS = {"forget_top1", "forget_top5", "retain_top1", "retain_top5", "utility_top1", "utility_top5", "mia", "layer", "rho",
                "converged", "stored_bytes", "base"}


def _record(repo: Path, stage: str) -> dict:
    """A stage's run record (its cost: times, memory), kept out of its outputs and out of git."""
    return json.loads((repo / "runs" / f"{stage}.json").read_text())


def test_slug_stages_write_their_outputs(repo):
    forget = json.loads((repo / "data" / "forget" / "manifest.json").read_text())
    assert forget["concept"] == "Elon Musk" and forget["count"] >= 2
    assert all("musk" in row["caption"].lower() for row in forget["samples"])
    sidecar = json.loads((repo / "models" / "grads" / "sidecar.json").read_text())
    assert sidecar["n_forget"] == forget["count"] and "+grad L_f" in sidecar["sign_convention"]
    retain = json.loads((repo / "data" / "retain" / "manifest.json").read_text())
    stats = json.loads((repo / "models" / "retain" / "sidecar.json").read_text())
    assert 0 < stats["n_retain"] == retain["count"] == min(60, retain["candidates"]) and retain["concept"] is None
    once = json.loads((repo / "metrics" / "retain_stats.json").read_text())
    assert once["n_retain"] == stats["n_retain"] and once["processes"] == 1 and _record(repo, "retain_stats")["time_s"] > 0
    compare = json.loads((repo / "metrics" / "compare.json").read_text())
    table = json.loads((repo / "metrics" / "concept_moments.json").read_text())  # SLUG's kept moments: every concept's pairs, once
    side = json.loads((repo / "models" / "concept_moments" / "sidecar.json").read_text())
    assert table["concepts"] == len(side["concepts"]) == 46 and table["pairs"] == side["n_every"] == sum(c["pairs"] for c in side["concepts"].values())
    assert side["concepts"]["Elon Musk"]["pairs"] == forget["count"]
    assert compare["slug_retain_stats"] == {"n_retain": once["n_retain"], "concept_moments": {"concepts": 46, "pairs": table["pairs"]}}
    assert "computed once for every concept" in (repo / "plots" / "compare.md").read_text()
    assert _record(repo, "compare")["slug_retain_stats"]["time_s"] == _record(repo, "retain_stats")["time_s"]
    assert _record(repo, "compare")["slug_retain_stats"]["concept_moments"]["time_s"] == _record(repo, "concept_moments")["time_s"] > 0
    runs_table = (repo / "plots" / "runs" / "compare.md").read_text()
    assert "computed once for every concept: " in runs_table and "stage `concept_moments`" in runs_table  # with their times
    slug_rows = json.loads((repo / "metrics" / "compare" / "slug.json").read_text())["rows"]
    assert all(r["shared_retain_stats"] and r["evals_forget"] > 0 and "time_s" not in r for r in slug_rows)
    assert all("retain_stats" not in r["time_s"] and r["time_s"]["unlearn"] > 0 for r in _record(repo, "compare_run@slug")["rows"])
    for tower in ("image", "text"):
        assert (repo / "plots" / "pareto" / f"{tower}.png").stat().st_size > 5_000
        assert (repo / "plots" / "pareto" / f"{tower}.csv").read_text().startswith("layer,importance,alignment")
    rows = (repo / "plots" / "search.csv").read_text().splitlines()
    assert rows[0].startswith("layer,tower,eval,rho,forget_top1") and len(rows) >= 2
    m = json.loads((repo / "metrics" / "unlearn.json").read_text())
    assert UNLEARN_KEYS <= set(m)
    for key in ("forget_top1", "forget_top5", "retain_top1", "retain_top5", "utility_top1", "utility_top5"):
        assert 0.0 <= m[key] <= 1.0 and 0.0 <= m["base"][key] <= 1.0
    assert isinstance(m["converged"], bool) and m["rho"] > 0
    cost = _record(repo, "evaluate")
    assert set(cost["time_s"]) >= {"curate", "gradients", "rank_layers", "search", "evaluate", "unlearn", "total", "retain_stats_once", "concept_moments_once"}
    assert all(v > 0 for v in cost["time_s"].values()) and cost["peak_memory_mb"] > 0
    assert m["stored_bytes"] == (repo / "models" / "unlearned" / "patch.safetensors").stat().st_size
    patch = json.loads((repo / "models" / "unlearned" / "patch.json").read_text())
    assert patch["layer"] == m["layer"] and patch["converged"] == m["converged"]
    search = yaml.safe_load((repo / "params.yaml").read_text())["slug"]["search"]
    assert search["direction"] == "retain_preconditioned"  # the default the README describes
    assert patch["direction"] == m["direction"] == search["direction"] and patch["damping"] == search["damping"]
    assert search["moments"] == "kept" and patch["moments"] == m["moments"] == "kept"  # the retain moments pooled with the table's (docs/clip.md "The kept moments")


def test_unknown_concept_fails_cleanly(repo):
    before = (repo / "data" / "forget" / "manifest.json").read_bytes()
    original = (repo / "params.yaml").read_text()
    try:
        _set_params(repo, concept="Elon Mask")
        proc = _run([sys.executable, "-m", "stages.curate"], repo, check=False)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: concept 'Elon Mask' is not in the concept table; closest known: 'Elon Musk'")
        assert (repo / "data" / "forget" / "manifest.json").read_bytes() == before
        assert not list(repo.glob("data/.*tmp*"))
    finally:
        (repo / "params.yaml").write_text(original)


KILL_ON_RENAME = """
import os, signal, sys
from pathlib import Path
if any(a == "stages." + os.environ.get("UNLEARN_TEST_KILL", "-") for a in getattr(sys, "orig_argv", [])):
    real = Path.rename
    def rename(self, target):  # every output is written to its temporary; SIGKILL before the first goes in
        os.kill(os.getpid(), signal.SIGKILL)
    Path.rename = rename
"""


def _tracked_outputs(repo: Path, stage: str) -> dict[str, bytes]:
    """The stage's outputs kept in git (cache: false), path -> bytes."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    name, _, item = stage.partition("@")
    body = spec[name].get("do", spec[name])
    out = {}
    for entry in [*(body.get("outs") or []), *(body.get("metrics") or []), *(body.get("plots") or [])]:
        if isinstance(entry, dict):
            (path, flags), = entry.items()
            if flags.get("cache") is False:
                path = path.replace("${item}", item)
                out[path] = (repo / path).read_bytes()
    return out


@pytest.mark.parametrize("stage", ["gradients", "search", "compare_run@ga_ft"])
def test_a_stage_killed_under_dvc_repro_loses_nothing_and_recovers_identically(repo, tmp_path, stage):
    """SIGKILL while the stage writes (every output written to its temporary, none moved in): the
    committed outputs stay as they were, nothing half-written is in place or in `git status`,
    `dvc repro` gives metrics identical to the undisturbed run's, and the next stage to run sweeps
    the dead run's temporaries (DVC restores the killed stage's outputs from its run cache, or finds
    its committed outputs intact, so the killed stage itself need not run again)."""
    (tmp_path / "sitecustomize.py").write_text(KILL_ON_RENAME)
    metrics = {p: json.loads(p.read_text()) for p in sorted((repo / "metrics").rglob("*.json"))}
    tracked = _tracked_outputs(repo, stage)
    proc = _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], repo, check=False,
                PYTHONPATH=str(tmp_path), UNLEARN_TEST_KILL=stage.partition("@")[0])
    assert proc.returncode != 0 and re.search(r"failed to reproduce|ERROR", proc.stdout + proc.stderr), proc.stdout[-2000:]
    assert _tracked_outputs(repo, stage) == tracked  # persist: true keeps them; the kill came before any rename
    debris = [p for p in repo.rglob(".*-*") if re.search(r"\.(tmp|old)-\d+", p.name)]
    assert debris, "the killed run left its temporaries"
    untracked = _run(["git", "status", "--porcelain", "--untracked-files=all"], repo).stdout
    assert not [p for p in debris if p.name in untracked], untracked  # git ignores them
    _run([sys.executable, "-m", "dvc", "repro"], repo)
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], repo).stdout
    assert {p: json.loads(p.read_text()) for p in sorted((repo / "metrics").rglob("*.json"))} == metrics
    assert _stages_run(_run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "check"], repo).stdout) == ["check"]
    assert not [p for p in debris if p.exists()]
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], repo).stdout  # check's stamp came out the same


@pytest.mark.parametrize("stage", ["base_model", "curate", "gradients", "search", "unlearncanvas_small@slug", "unlearncanvas_small@salun"])
def test_a_stage_run_again_gives_the_same_output_hashes_and_nothing_downstream_reruns(repo, stage):
    """Run records (time, memory, host) live in runs/<stage>.json, outside DVC's outputs, so
    re-executing a stage whose inputs did not change leaves dvc.lock as it was."""
    lock = lambda: yaml.safe_load((repo / "dvc.lock").read_text())["stages"]  # noqa: E731
    before = lock()
    _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], repo)
    assert lock()[stage]["outs"] == before[stage]["outs"]
    assert "up to date" in _run([sys.executable, "-m", "dvc", "status"], repo).stdout
    record = json.loads((repo / "runs" / f"{stage}.json").read_text())
    assert record["stage"] == stage and record["time_s"] > 0 and record["peak_memory_mb"] > 0 and record["host"]
    assert "runs/" in _run(["git", "check-ignore", "-v", f"runs/{stage}.json"], repo).stdout


def test_compare_writes_a_row_per_concept_and_method(repo):
    m = json.loads((repo / "metrics" / "compare.json").read_text())
    methods = ["slug", "ft", "ga", "ga_ft", "salun", "ssd"]
    assert sorted(m["methods"]) == sorted(methods) and m["concepts"] == ["Elon Musk", "Taylor Swift"]
    assert [(r["method"], r["concept"]) for r in m["rows"]] == [(x, c) for x in methods for c in m["concepts"]]
    for r in m["rows"]:
        assert r["status"] in ("ok", "not_forgotten")
        assert 0.0 <= r["forget_top1"] <= 1.0 and 0.0 <= r["utility_top1"] <= 1.0 and "time_s" not in r
    assert all(r["time_s"]["unlearn"] > 0 for r in _record(repo, "compare")["rows"])
    slug_rows = [r for r in m["rows"] if r["method"] == "slug"]
    # SLUG stores one tensor; a training baseline changes (and must ship) far more
    assert all(r["stored_bytes"] < 1_000_000 for r in slug_rows)
    assert m["methods"]["ft"]["stored_bytes"] > 10 * m["methods"]["slug"]["stored_bytes"]
    for x in methods:
        s = m["methods"][x]
        mean = sum(r["forget_top1"] for r in m["rows"] if r["method"] == x) / 2
        assert abs(s["forget_top1"] - round(mean, 6)) < 1e-6 and s["completed"] == 2 and s["failed"] == 0
    epochs = json.loads((repo / "metrics" / "compare" / "ga.json").read_text())["rows"][0]["epochs"]
    assert 1 <= len(epochs) <= 2 and all("forget_top1" in e and "train_s" not in e for e in epochs)
    assert all(e["train_s"] > 0 for e in _record(repo, "compare_run@ga")["rows"][0]["epochs"])
    table = (repo / "plots" / "compare.md").read_text()
    assert "| original |" in table and all(f"| {x} |" in table for x in methods)
    assert (repo / "plots" / "compare.csv").read_text().startswith("method,forget_top1")
    assert (repo / "plots" / "compare_scatter.png").stat().st_size > 5_000
    assert (repo / "plots" / "runs" / "compare_time.png").stat().st_size > 5_000 and " time s |" in (repo / "plots" / "runs" / "compare.md").read_text()
    assert " time s |" not in table


def test_unknown_method_is_one_line(repo):
    proc = _run([sys.executable, "-m", "stages.compare_run", "salun2"], repo, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown method 'salun2'; known methods: ft, ga, ga_ft, salun, slug, ssd"]


def test_report_is_one_self_contained_page(repo):
    page = (repo / "report" / "index.html").read_text()
    concept = json.loads((repo / "metrics" / "unlearn.json").read_text())["concept"]  # Mickey after the exp run
    assert page.startswith("<!doctype html>") and f"forgetting {concept}" in page
    assert page.count("data:image/png;base64,") == 6  # 2 Pareto fronts, the search, the comparison's scatter, the VLM's answers, the examples
    assert "Vision-language model: forgetting Elon Musk in a LLaVA" in page
    assert "src=\"plots/" not in page and "<table>" in page
    assert "along the forget gradient preconditioned by the layer's retain inputs" in page


def test_export_writes_transformers_folders_equal_to_open_clip(repo):
    import transformers

    export = json.loads((repo / "metrics" / "export.json").read_text())
    for name in ("base", "unlearned"):
        figures = export[name]
        assert figures["family"] == "open_clip" and figures["token_mismatches"] == 0
        assert figures["image_embedding_max_abs_diff"] <= 1e-5 and figures["text_embedding_max_abs_diff"] <= 1e-5
        assert transformers.CLIPModel.from_pretrained(repo / "models" / "hf" / name).config.model_type == "clip"
    patch = json.loads((repo / "models" / "unlearned" / "patch.json").read_text())
    assert export["patch_layer"] == patch["layer"]


def test_forget_many_adds_the_edits_up(repo):
    m = json.loads((repo / "metrics" / "forget_many.json").read_text())
    assert [c["concept"] for c in m["concepts"]] == ["Elon Musk", "Taylor Swift"] and m["counts"] == [1, 2]
    assert [r["k"] for r in m["results"]] == [1, 2]
    both = m["results"][1]
    assert set(both["test"]["targets"]) == {"Elon Musk", "Taylor Swift"} and both["trials"][0]["scale"] == 1.0
    assert both["scale"] in {t["scale"] for t in both["trials"]}
    for c in m["concepts"]:
        slug_dir = repo / "models" / "many" / c["concept"].lower().replace(" ", "_")
        assert json.loads((slug_dir / "patch.json").read_text())["layer"] == c["layer"]
    assert [r["k"] for r in m["sequential"]] == [1, 2] and [c["concept"] for c in m["sequential_concepts"]] == ["Elon Musk", "Taylor Swift"]
    assert m["sequential_concepts"][0]["layer"] == m["concepts"][0]["layer"]  # the first concept: the same search on the same model
    # joint: one search for the first k together; for k = 1 the same search as the first concept's alone
    assert [r["k"] for r in m["joint"]] == [1, 2] and set(m["joint"][1]["test"]["targets"]) == {"Elon Musk", "Taylor Swift"}
    assert (m["joint"][0]["layer"], m["joint"][0]["rho"]) == (m["concepts"][0]["layer"], m["concepts"][0]["rho"])
    assert m["joint"][1]["forget_pairs"] > m["joint"][0]["forget_pairs"]
    # cumulative: for the first concept the same search as alone (its guard's reference is the unedited model either way)
    assert [r["k"] for r in m["cumulative"]] == [1, 2] and [c["concept"] for c in m["cumulative_concepts"]] == ["Elon Musk", "Taylor Swift"]
    assert (m["cumulative_concepts"][0]["layer"], m["cumulative_concepts"][0]["rho"]) == (m["concepts"][0]["layer"], m["concepts"][0]["rho"])
    # kept: the sum's searches with the retain moments pooled with the pairs of the table's concepts not removed (fewer for k = 2)
    assert [r["k"] for r in m["kept"]] == [1, 2] and [e["concept"] for e in m["kept"][1]["edits"]] == ["Elon Musk", "Taylor Swift"]
    assert m["kept"][0]["kept_concepts"] == m["kept"][1]["kept_concepts"] + 1 and m["kept"][0]["kept_pairs"] > m["kept"][1]["kept_pairs"] > 0
    assert 0 < m["kept"][1]["kept_weight"] < m["kept"][0]["kept_weight"] < 1
    for name in ("forget_many.png", "forget_many_joint.png", "forget_many_kept.png"):
        assert (repo / "plots" / name).stat().st_size > 5_000
    assert (repo / "plots" / "forget_many.csv").read_text().startswith("mode,removed,max_forget_top1")
    assert [(r["mode"], r["removed"]) for r in m["rows"]] == [(mode, k) for mode in ("sum", "sequential", "joint", "cumulative", "kept") for k in (1, 2)]


def _rel(a, b) -> float:

    return float((a.double() - b.double()).norm() / b.double().norm()) if float(b.double().norm()) > 0 else float(a.double().norm())


def test_retain_stats_under_torchrun_equal_one_process(repo, tmp_path):
    """`gradients.nproc: 2`: the stage relaunches itself under torchrun (gloo, 2 CPU processes);
    the statistics equal the single-process ones within 1e-6 relative; too many processes is a
    one-line error before anything runs."""
    import safetensors.torch

    saved = {p: p.read_bytes() for p in [*(repo / "models" / "retain").iterdir(), repo / "metrics" / "retain_stats.json"]}
    original = (repo / "params.yaml").read_text()
    try:
        _set_params(repo, **{"gradients.nproc": 100})
        proc = _run([sys.executable, "-m", "stages.retain_stats"], repo, check=False)
        assert proc.returncode == 1 and re.search(r"^error: 100 processes but the retain set has only \d+ batches", proc.stderr, re.M), proc.stderr
        assert all(p.read_bytes() == b for p, b in saved.items())
        # the single-process reference with one thread, as each worker has: float32 kernels with
        # another thread count sum in another order (about 1e-6 apart on their own)
        _set_params(repo, **{"gradients.nproc": 1})
        _run([sys.executable, "-m", "stages.retain_stats"], repo, OMP_NUM_THREADS="1")
        single = {f: safetensors.torch.load_file(repo / "models" / "retain" / f) for f in ("gradient.safetensors", "moments.safetensors")}
        _set_params(repo, **{"gradients.nproc": 2})  # the same batches as the single-process run (L_r depends on the batch)
        _run([sys.executable, "-m", "stages.retain_stats"], repo)
        assert json.loads((repo / "metrics" / "retain_stats.json").read_text())["processes"] == 2
        for f, tensors in single.items():
            dist = safetensors.torch.load_file(repo / "models" / "retain" / f)
            assert max(_rel(dist[n], t) for n, t in tensors.items()) <= 1e-6
    finally:
        (repo / "params.yaml").write_text(original)
        for p, b in saved.items():
            p.write_bytes(b)


def test_dvc_push_and_pull_through_a_local_remote(repo, tmp_path):
    """A shared cache for sweeps across machines: `dvc push` to a remote folder, and a fresh clone
    `dvc pull`s the retain statistics byte for byte."""
    remote = tmp_path / "remote"
    _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    _commit(repo, "remote")
    _run([sys.executable, "-m", "dvc", "push", "retain_stats"], repo)
    assert any(remote.rglob("*"))
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _run([sys.executable, "-m", "dvc", "pull", "retain_stats"], clone)
    for f in ("gradient.safetensors", "moments.safetensors", "sidecar.json"):
        assert (clone / "models" / "retain" / f).read_bytes() == (repo / "models" / "retain" / f).read_bytes()


def test_vlm_stages_write_a_llava_that_loads_offline_and_a_patch_that_applies(repo):
    import torch
    import transformers

    from unlearn.vlm.model import apply_vlm_patch, load_vlm

    folder = repo / "models" / "vlm_base"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder)  # HF_HUB_OFFLINE=1 (conftest)
    assert model.config.vision_config.model_type == "clip_vision_model"
    base = json.loads((repo / "metrics" / "vlm_base.json").read_text())
    assert base["pretrained"] == "synthetic" and base["test"]["identity"]["images"] == 48 and base["test"]["object"]["images"] == 28
    assert 0.0 <= base["test"]["identity"]["accuracy"] <= 1.0 and _record(repo, "vlm_base")["train_s"] > 0
    m = json.loads((repo / "metrics" / "vlm_unlearn.json").read_text())
    assert m["concept"] == "Elon Musk" and m["layer"].startswith("vision_model.encoder.layers.")
    assert set(m["test"]) == {"forget_identification", "retain_identification", "object_accuracy"} 
    assert len(m["examples"]) == sum(min(4, n) for n in m["test_sizes"].values())  # up to 4 per set; the tiny world has fewer forget images
    assert (repo / "plots" / "vlm_answers.png").stat().st_size > 10_000 and (repo / "plots" / "vlm_search.csv").is_file()
    model, _ = load_vlm(folder)
    before = {n: p.clone() for n, p in model.named_parameters()}
    meta = apply_vlm_patch(model, repo / "models" / "vlm_unlearned")
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert meta["layer"] == m["layer"] and changed == ["model.vision_tower." + m["layer"][len("vision_model."):]]


def test_vlm_pretrained_by_path_and_a_llava_of_another_clip(repo, tmp_path):
    """The real path on a saved tiny LLaVA: `vlm.pretrained: path` is checked against the CLIP and
    recorded by path; a LLaVA whose vision tower is not that CLIP's is a one-line error with the
    earlier outputs untouched."""
    import safetensors.torch

    llava = tmp_path / "llava-tiny"
    shutil.copytree(repo / "models" / "vlm_base", llava)
    bad = tmp_path / "llava-other-clip"
    shutil.copytree(llava, bad)
    weights = safetensors.torch.load_file(bad / "model.safetensors")
    name = next(n for n in weights if "vision_tower" in n and n.endswith("mlp.fc1.weight"))
    weights[name] = weights[name] + 0.01
    safetensors.torch.save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    original = (repo / "params.yaml").read_text()
    uncached = [repo / "metrics" / "vlm_base.json", repo / "metrics" / "vlm_unlearn.json", *(repo / "plots").glob("vlm_*")]
    saved = {p: p.read_bytes() for p in [*(repo / "models" / "vlm_base").iterdir(), *uncached]}
    try:
        _set_params(repo, **{"vlm.pretrained": str(bad)})
        proc = _run([sys.executable, "-m", "stages.vlm_base"], repo, check=False)
        assert proc.returncode == 1 and re.search(rf"^error: the vision tower of {re.escape(str(bad))} differs from the CLIP models/hf/base in .*fc1", proc.stderr, re.M), proc.stderr
        assert all(p.read_bytes() == b for p, b in saved.items())
        _set_params(repo, **{"vlm.pretrained": str(llava)})
        _run([sys.executable, "-m", "stages.vlm_base"], repo)
        record = json.loads((repo / "models" / "vlm_base" / "unlearn_vlm.json").read_text())
        assert record["pretrained"] == str(llava) and not (repo / "models" / "vlm_base" / "model.safetensors").exists()
        by_path = json.loads((repo / "metrics" / "vlm_base.json").read_text())
        assert by_path["test"] == json.loads(saved[repo / "metrics" / "vlm_base.json"])["test"]  # the same LLaVA, read where it lies
        _run([sys.executable, "-m", "stages.vlm_unlearn"], repo)
        assert json.loads((repo / "metrics" / "vlm_unlearn.json").read_text())["concept"] == "Elon Musk"
    finally:
        (repo / "params.yaml").write_text(original)
        _run([sys.executable, "-m", "dvc", "checkout", "-f", "vlm_base", "vlm_unlearn"], repo)
        for p in uncached:
            p.write_bytes(saved[p])
        assert "up to date" in _run([sys.executable, "-m", "dvc", "status", "vlm_unlearn"], repo).stdout


def test_sd_stages_write_a_pipeline_that_loads_offline_and_draws_what_its_metrics_say(repo):
    from diffusers import StableDiffusionPipeline

    from unlearn.sd.data import Templates
    from unlearn.sd.evaluate import SampleConfig, judged_accuracy
    from unlearn.sd.judges import load_judges

    judges = json.loads((repo / "metrics" / "sd_judges.json").read_text())
    assert set(judges["held_out_real"]) == {"object", "style"} and judges["held_out_images"] == 9 * 14 * 2
    for stage in ("sd_base", "sd_base_small"):
        m = json.loads((repo / "metrics" / f"{stage}.json").read_text())
        assert m["test"]["images"] == 126 and m["judges_held_out_real"] == {a: judges["held_out_real"][a]["accuracy"] for a in ("object", "style")}
        assert (repo / "plots" / f"{stage}.png").stat().st_size > 1000
        curve = (repo / "plots" / f"{stage}_curve.csv").read_text().splitlines()
        assert curve[0] == "step,object,style" and len(curve) - 1 == len(_record(repo, stage)["checkpoints_train_min"])
        pipe = StableDiffusionPipeline.from_pretrained(repo / "models" / stage, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        params = yaml.safe_load((repo / "params.yaml").read_text())["sd"]
        again, _ = judged_accuracy(pipe, load_judges(repo / "models" / "sd_judges"), Templates(**params["templates"]),
                                   SampleConfig(**params["sample"]), 1, params["sample"]["seed"], params["image_size"])
        assert again == m["test"]  # the saved pipeline draws (and the judges see) what the stage measured


def test_sd_unlearn_writes_a_patch_that_turns_the_base_pipeline_into_the_unlearned_one(repo):
    from diffusers import StableDiffusionPipeline

    from unlearn.sd.unlearn import apply_sd_patch

    params = yaml.safe_load((repo / "params.yaml").read_text())
    for stage, base, patch in (("sd_unlearn", "sd_base", "sd_unlearned"), ("sd_unlearn_small", "sd_base_small", "sd_unlearned_small")):
        m = json.loads((repo / "metrics" / f"{stage}.json").read_text())
        assert m["concept"] == "Mickey" and m["unet_vae_unchanged"] and m["layer"].startswith("text_model.")
        # which rule kept an unconverged step: the one sd.search.fallback names, recorded only then
        assert ("fallback" in m) == (not m["converged"]) and m.get("fallback", params["sd"]["search"]["fallback"]) == params["sd"]["search"]["fallback"]
        for side in ("test", "base_test"):
            assert set(m[side]) == {"UA", "IRA", "CRA"} and all(0 <= v <= 1 for v in m[side].values())
        assert set(m["other_names"]) == {"Mickey Mouse", "Micky"} and m["test_sizes"]["forget"] == 9
        assert m["validation_steps"] == 1 and m["sampler"]["steps"] == 2  # the search draws with sd.search.steps, the test with sd.sample.steps
        assert (repo / "plots" / f"{stage}.png").stat().st_size > 1000 and (repo / "plots" / f"{stage}_search.csv").exists()
        pipe = StableDiffusionPipeline.from_pretrained(repo / "models" / base, local_files_only=True)
        unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        meta = apply_sd_patch(pipe, repo / "models" / patch)
        assert meta["concept"] == "Mickey" and meta["track"] == "sd"
        assert all(torch.equal(v, unet[k]) for k, v in pipe.unet.state_dict().items())


def test_unlearncanvas_rows_for_every_method_and_target_and_a_leaderboard(repo):
    import safetensors.torch
    from diffusers import StableDiffusionPipeline

    from unlearn.sd.methods import apply_changed

    params = yaml.safe_load((repo / "params.yaml").read_text())
    for stage, targets in (("unlearncanvas", {"Sepia": "style", "apple": "object"}), ("unlearncanvas_small", {"Neon": "style", "car": "object"})):
        m = json.loads((repo / "metrics" / f"{stage}.json").read_text())
        assert set(m["methods"]) == {"base", "slug", "esd", "salun", "uce", "ca"} and m["answer_set"]["images"] == 126
        for method, s in m["methods"].items():
            assert {(r["target"], r["axis"]) for r in s["rows"]} == set(targets.items()), method
            for r in s["rows"]:
                assert r["status"] == "ok" and all(0 <= r[k] <= 100 for k in ("UA", "IRA", "CRA")) and r["fid"] >= 0
            assert "time_s" not in s and all("time_s" not in r for r in s["rows"])  # the cost is in the run records
        assert all(s["stored_bytes"] > 0 for k, s in m["methods"].items() if k != "base")
        assert all(r["changed_tensors"] == 1 and r["layer"].startswith("text_model.") for r in m["methods"]["slug"]["rows"])
        for r in m["methods"]["slug"]["rows"]:  # an edit shipped by rows records how many: the length of the index it stores
            index = [v for k, v in safetensors.torch.load_file(repo / "models" / stage / "slug" / f"{r['target']}.safetensors").items() if k.endswith(":rows")]
            assert r.get("changed_rows") == (len(index[0]) if index else None), r["target"]
        assert all(("fallback" in r) == (not r["converged"]) for r in m["methods"]["slug"]["rows"])
        fallback = {**params["unlearncanvas"]["slug"], **params[stage].get("slug", {})}["fallback"]  # the twin's keys over the default's
        assert all(r.get("fallback", fallback) == fallback for r in m["methods"]["slug"]["rows"])
        record = json.loads((repo / "runs" / f"{stage}@esd.json").read_text())
        assert all(r["time_s"] > 0 for r in record["rows"])
        table = (repo / "plots" / f"{stage}.md").read_text()
        assert all(f"| {k} |" in table for k in m["methods"]) and "Published" in table
        assert (repo / "plots" / f"{stage}_scatter.png").stat().st_size > 5000 and (repo / "plots" / f"{stage}.csv").read_text().count("\n") == 13
        # a method's saved tensors turn the base pipeline into its unlearned one
        pipe = StableDiffusionPipeline.from_pretrained(repo / "models" / stage.replace("unlearncanvas", "sd_base"), local_files_only=True)
        path = repo / "models" / stage / "uce" / f"{next(iter(targets))}.safetensors"
        saved = safetensors.torch.load_file(path)
        assert saved and all(k.startswith("unet.") and ".attn2.to_" in k for k in saved)
        assert not all(torch.equal(v, pipe.unet.state_dict()[k.removeprefix("unet.")]) for k, v in saved.items())
        assert apply_changed(pipe, path) == sorted(saved)
        assert all(torch.equal(v, pipe.unet.state_dict()[k.removeprefix("unet.")]) for k, v in saved.items())
        # the diffusion track's page: self-contained, every method's row and drawings
        page = (repo / "report" / f"diffusion{stage.removeprefix('unlearncanvas')}.html").read_text()
        assert "href=" not in page and 'src="plots' not in page and page.count('src="data:image/png;base64,') == 3 + len(m["methods"])  # sd_base, sd_unlearn, the scatter, the grids
        assert all(f"<td>{k}</td>" in page for k in m["methods"]) and "forgetting Mickey" in page


@pytest.mark.parametrize("bad,message", [
    ({"unlearncanvas_small.targets": ["Sepia", "Elon Musk"]}, r"error: unlearncanvas_small.targets names 'Elon Musk', neither a style"),
    ({"unlearncanvas.esd.steps": 3}, r"error: params.yaml unlearncanvas.esd has unknown keys steps"),
    ({"unlearncanvas.esd.lr": "1e-4x"}, r"error: params.yaml unlearncanvas.esd.lr is '1e-4x'; it must be a number"),
    ({"unlearncanvas.esd.lr": 0}, r"error: params.yaml unlearncanvas.esd.lr is 0; it must be a number > 0$"),
], ids=["target", "config", "number", "range"])
def test_unlearncanvas_bad_input_is_one_line_and_keeps_outputs(repo, bad, message):
    outputs = [repo / "metrics" / "unlearncanvas_small" / "esd.json", *sorted((repo / "models" / "unlearncanvas_small" / "esd").iterdir()),
               repo / "plots" / "unlearncanvas_small" / "esd.png"]
    before = {p: p.read_bytes() for p in outputs}
    original = (repo / "params.yaml").read_text()
    try:
        new = {k: v for k, v in bad.items() if k.endswith(".steps")}   # a key params.yaml lacks
        _add_params(repo, **new)
        _set_params(repo, **{k: v for k, v in bad.items() if k not in new})
        proc = _run([sys.executable, "-m", "stages.unlearncanvas", "--stage", "unlearncanvas_small", "--method", "esd"], repo, check=False,
                    HF_HUB_OFFLINE="1")
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and re.match(message, errors[0]), proc.stderr[-2000:]
        assert {p: p.read_bytes() for p in outputs} == before
    finally:
        (repo / "params.yaml").write_text(original)


SD_BAD = [
    ({"sd.templates.style": "An {object} image."}, r"error: sd.templates.style 'An {object} image.' lacks {style}; write it with every field"),
    ({"sd.concept": "Elon Musk"}, r"error: sd.concept 'Elon Musk' \(identity\) is not drawn by the pipeline; use an object"),
    ({"sd.concept": "Mickie"}, r"error: concept 'Mickie' is not in the concept table; closest known: 'Mickey'"),
    ({"sd.search.prompt_moments": 2}, r"error: sd.search.prompt_moments is 2.0; give a weight in \[0, 1\]"),
    ({"sd.search.fallback": "none"}, r"error: sd.search.fallback is 'none'; use forget \(when no layer passes, keep the step that forgets most\) or guard"),
    ("text_encoder", r"error: the pipeline at models/sd_base_small has no text_encoder/ folder; SLUG edits the text encoder"),
]


@pytest.mark.parametrize("bad,message", SD_BAD, ids=["template", "identity", "unknown", "moments", "fallback", "no-text-encoder"])
def test_sd_unlearn_bad_input_is_one_line_and_keeps_outputs(repo, bad, message):
    outputs = [repo / "metrics" / "sd_unlearn_small.json", *sorted((repo / "models" / "sd_unlearned_small").iterdir()),
               repo / "plots" / "sd_unlearn_small.png", repo / "plots" / "sd_unlearn_small_search.csv"]
    before = {p: p.read_bytes() for p in outputs}
    temporaries = set(repo.glob("**/.*tmp*"))
    original = (repo / "params.yaml").read_text()
    folder = repo / "models" / "sd_base_small" / "text_encoder"
    try:
        if bad == "text_encoder":
            folder.rename(folder.with_name("moved_away"))
        else:
            _set_params(repo, **bad)
        proc = _run([sys.executable, "-m", "stages.sd_unlearn", "--stage", "sd_unlearn_small"], repo, check=False, HF_HUB_OFFLINE="1")
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and re.match(message, errors[0]), proc.stderr[-2000:]
        assert {p: p.read_bytes() for p in outputs} == before and set(repo.glob("**/.*tmp*")) == temporaries
    finally:
        (repo / "params.yaml").write_text(original)
        if folder.with_name("moved_away").exists():
            folder.with_name("moved_away").rename(folder)
