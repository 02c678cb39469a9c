"""A tiny DVC project to run the pipeline in: the project's dvc.yaml, stages and code in a temporary
git repository, params shrunk to a tiny world and tiny models, reproduced once (the `repo`
fixture of tests/conftest.py, one per test module, so that modules can run in parallel), and the
helpers that drive it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from bench.workspace import assign
from unlearn.params import load_yaml, lookup

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, check=True, **extra_env):
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1"} | extra_env
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _set_params(repo: Path, **updates) -> None:
    """Set existing dotted keys of the repo's params.yaml (a misspelt key is a KeyError, not a new
    param that no stage reads)."""
    params = load_yaml(repo / "params.yaml")
    for dotted, value in updates.items():
        assign(params, dotted, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _add_params(repo: Path, **updates) -> None:
    """Add dotted keys that params.yaml lacks under sections it has (how a stage refuses an unknown key)."""
    params = load_yaml(repo / "params.yaml")
    for dotted, value in updates.items():
        parent, _, leaf = dotted.rpartition(".")
        node = lookup(params, parent)
        assert isinstance(node, dict) and leaf not in node, f"{dotted} is not a new key under an existing section"
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _commit(repo: Path, message: str) -> None:
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty", "-qm", message], repo)


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def build_tiny_repo(tmp_path_factory) -> Path:
    """A git repository holding the project's dvc.yaml, params.yaml (shrunk to a tiny world and tiny
    models) and code, after one `dvc repro` of every stage."""
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
            "forget_many.modes": ["sum", "sequential", "joint", "cumulative", "kept"],
            "vlm.train.examples": 64, "vlm.train.epochs": 1, "vlm.train.batch_size": 16, "vlm.train.warmup_steps": 2,
            "vlm.train.hidden_size": 32, "vlm.train.intermediate_size": 64, "vlm.train.layers": 1, "vlm.train.heads": 2,
            "vlm.train.vocab_size": 400,
            "sd.judges.images_per_cell": 1, "sd.judges.steps": 20, "sd.judges.channels": [8, 16],
            "sd.sample.steps": 2, "sd.sample.images_per_prompt": 1, "sd.search.images_per_prompt": 1, "sd.search.forget_images_per_prompt": 1, "sd.search.max_layers": 1,
            "sd.search.evals_per_layer": 2, "sd.search.steps": 1,
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
