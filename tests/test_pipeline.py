"""`dvc repro` of a tiny world in a temporary git repository, and bad input through the stages."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT


def _run(args, cwd, check=True, **extra_env):
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1"} | extra_env
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _set_params(repo: Path, **updates) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in updates.items():
        node = params
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "unlearn"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    _set_params(
        repo,
        **{
            "data.synthetic.shards": 2, "data.synthetic.samples_per_shard": 150, "data.synthetic.eval_per_class": 3,
            "data.synthetic.canvas_per_cell": 2, "data.synthetic.workers": 1, "model.train.epochs": 2, "model.train.batch_size": 32,
            "curate.retain_size": 60, "gradients.batch_size": 16, "slug.search.max_layers": 2, "slug.search.evals_per_layer": 3,
            "eval.mia.folds": 2, "eval.mia.seeds": 2, "compare.concepts": ["Elon Musk", "Taylor Swift"],
            "forget_many.concepts": ["Elon Musk", "Taylor Swift"], "forget_many.counts": [1, 2],
            "vlm.train.examples": 64, "vlm.train.epochs": 1, "vlm.train.batch_size": 16, "vlm.train.warmup_steps": 2,
            "vlm.train.hidden_size": 32, "vlm.train.intermediate_size": 64, "vlm.train.layers": 1, "vlm.train.heads": 2,
            "vlm.train.vocab_size": 400,
            "sd.judges.images_per_cell": 1, "sd.judges.steps": 20, "sd.judges.channels": [8, 16],
            "sd.sample.steps": 2, "sd.sample.images_per_prompt": 1, "sd.search.images_per_prompt": 1, "sd.search.forget_images_per_prompt": 1, "sd.search.max_layers": 1,
            "sd.search.evals_per_layer": 2,
            **{f"sd.{b}": {"images_per_cell": 1, "vae": {"channels": [8, 16], "steps": 3, "batch_size": 16},
                           "unet": {"channels": [16, 32], "attention_head_dim": 4, "steps": 4, "batch_size": 8, "checkpoints": 2}}
               for b in ("base", "base_small")},
            **{f"{m}.epochs": 2 for m in ("ft", "ga", "ga_ft", "salun")}, **{f"{m}.lr": 1e-3 for m in ("ft", "ga", "ga_ft", "salun")},
            "unlearncanvas.targets": ["Sepia", "apple"], "unlearncanvas.images_per_prompt": 1, "unlearncanvas.train_images_per_cell": 1,
            "unlearncanvas.slug.images_per_prompt": 1, "unlearncanvas.slug.forget_images_per_prompt": 1, "unlearncanvas.slug.max_layers": 1,
            "unlearncanvas.slug.evals_per_layer": 2, **{f"unlearncanvas.{m}.iterations": 2 for m in ("esd", "salun", "ca")},
            **{f"unlearncanvas.{m}.batch_size": 2 for m in ("esd", "salun", "ca")}, "unlearncanvas.salun.mask_batches": 1,
            "unlearncanvas.ca.anchor_images": 1, "unlearncanvas_small.targets": ["Neon", "car"],
        },
    )
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], repo)
    _run([sys.executable, "-m", "dvc", "repro"], repo)
    return repo


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
    assert set(lock["stages"]) == {"check", "download", "base_model", "curate", "retain_set", "retain_stats", "gradients", "rank_layers", "search",
                                   "evaluate", "export", "forget_many", "compare_data", "compare", "report",
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
    assert compare["slug_retain_stats"] == {"n_retain": once["n_retain"]} and "computed once for every concept" in (repo / "plots" / "compare.md").read_text()
    assert _record(repo, "compare")["slug_retain_stats"]["time_s"] == _record(repo, "retain_stats")["time_s"]
    assert "computed once for every concept: " in (repo / "plots" / "runs" / "compare.md").read_text()  # with its time
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
    assert set(cost["time_s"]) >= {"curate", "gradients", "rank_layers", "search", "evaluate", "unlearn", "total", "retain_stats_once"}
    assert all(v > 0 for v in cost["time_s"].values()) and cost["peak_memory_mb"] > 0
    assert m["stored_bytes"] == (repo / "models" / "unlearned" / "patch.safetensors").stat().st_size
    patch = json.loads((repo / "models" / "unlearned" / "patch.json").read_text())
    assert patch["layer"] == m["layer"] and patch["converged"] == m["converged"]
    search = yaml.safe_load((repo / "params.yaml").read_text())["slug"]["search"]
    assert search["direction"] == "retain_preconditioned"  # the default the README describes
    assert patch["direction"] == m["direction"] == search["direction"] and patch["damping"] == search["damping"]


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


def _commit(repo: Path, message: str) -> None:
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", message], repo)


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


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
    """The README's sweep: concepts x methods queued with -S sweeps, run by `dvc queue start`, read with `dvc exp show`."""
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


def test_the_hf_clip_family_runs_the_clip_track(repo):
    """`dvc exp run -S model.family=hf_clip`: the base model exported to a transformers CLIPModel,
    then curate .. evaluate, the export and the comparison on it."""
    _commit(repo, "before the hf_clip experiment")
    proc = _run([sys.executable, "-m", "dvc", "exp", "run", "--temp", "-S", "model.family=hf_clip", "-n", "hf"], repo)
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
    assert (repo / "plots" / "forget_many.png").stat().st_size > 5_000
    assert (repo / "plots" / "forget_many.csv").read_text().startswith("mode,removed,max_forget_top1")
    assert [(r["mode"], r["removed"]) for r in m["rows"]] == [("sum", 1), ("sum", 2), ("sequential", 1), ("sequential", 2)]


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

    for stage, base, patch in (("sd_unlearn", "sd_base", "sd_unlearned"), ("sd_unlearn_small", "sd_base_small", "sd_unlearned_small")):
        m = json.loads((repo / "metrics" / f"{stage}.json").read_text())
        assert m["concept"] == "Mickey" and m["unet_vae_unchanged"] and m["layer"].startswith("text_model.")
        for side in ("test", "base_test"):
            assert set(m[side]) == {"UA", "IRA", "CRA"} and all(0 <= v <= 1 for v in m[side].values())
        assert set(m["other_names"]) == {"Mickey Mouse", "Micky"} and m["test_sizes"]["forget"] == 9
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
], ids=["target", "config"])
def test_unlearncanvas_bad_input_is_one_line_and_keeps_outputs(repo, bad, message):
    outputs = [repo / "metrics" / "unlearncanvas_small" / "esd.json", *sorted((repo / "models" / "unlearncanvas_small" / "esd").iterdir()),
               repo / "plots" / "unlearncanvas_small" / "esd.png"]
    before = {p: p.read_bytes() for p in outputs}
    original = (repo / "params.yaml").read_text()
    try:
        _set_params(repo, **bad)
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
    ("text_encoder", r"error: the pipeline at models/sd_base_small has no text_encoder/ folder; SLUG edits the text encoder"),
]


@pytest.mark.parametrize("bad,message", SD_BAD, ids=["template", "identity", "unknown", "moments", "no-text-encoder"])
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
