"""`dvc repro` of a tiny world in a temporary git repository, and bad input through the stages."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT


def _run(args, cwd, check=True):
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1"}
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
            "data.synthetic.shards": 2, "data.synthetic.samples_per_shard": 60, "data.synthetic.eval_per_class": 3,
            "data.synthetic.workers": 1, "model.train.epochs": 1, "model.train.batch_size": 32,
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
    assert record["samples"] == 120 and record["source"] == "synthetic"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"download", "base_model"}


def test_repro_is_up_to_date_and_metrics_show(repo):
    status = _run([sys.executable, "-m", "dvc", "status"], repo)
    assert "up to date" in status.stdout
    shown = _run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], repo)
    assert "identity_top1" in shown.stdout


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
        proc = _run([sys.executable, "-m", "dvc", "repro", "download"], repo, check=False)
        assert proc.returncode != 0 and "unknown data.source 'bogus'" in proc.stdout + proc.stderr
    finally:
        (repo / "params.yaml").write_text(original)


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
