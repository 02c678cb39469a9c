"""What the benches that run a stage share: a scratch folder that links the project's code and the
stage's inputs (so the stage runs there and the workspace's outputs stay as they are), and
`-S KEY=VALUE` params overrides, running a stage there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from unlearn.params import load_yaml, lookup, parse_yaml  # noqa: E402


def locked_out(stage: str, path: str) -> str | None:
    """dvc.lock's hash of a stage's output (its first 8 hex digits), which names the committed run a
    bench reads (for instance models/base, or the models/sd_base pipeline an sd_unlearn bench edits);
    None if dvc.lock records no such output."""
    for out in load_yaml(ROOT / "dvc.lock").get("stages", {}).get(stage, {}).get("outs", []):
        if out.get("path") == path:
            return str(out.get("md5", "")).removesuffix(".dir")[:8]
    return None


def locked_label(stage: str, path: str) -> str:
    """How a bench names the committed output it read: 'models/sd_base (dvc.lock 40ef7eaf)', or the
    bare path where dvc.lock records no such output."""
    lock = locked_out(stage, path)
    return f"{path} (dvc.lock {lock})" if lock else path


@contextmanager
def linked_workspace(prefix: str, inputs: Sequence[str]) -> Iterator[Path]:
    """A temporary folder holding links to stages/, unlearn/, dvc.yaml and each of `inputs`
    (paths relative to the project root); write its params.yaml, then run a stage in it.  A
    SIGTERM (`kill`, `timeout`) exits through the cleanup: the folder is removed and a stage run
    by `subprocess.run` is killed, instead of both being left behind."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            work = Path(tmp)
            for name in ("stages", "unlearn", "dvc.yaml", *inputs):
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                (work / name).symlink_to(ROOT / name)
            yield work
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stage(work: Path, args: Sequence[str], threads: int | None = None, what: str | None = None) -> float:
    """`python -m <args>` in `work` (offline, OMP_NUM_THREADS=`threads` if given); its wall seconds.
    A failure exits with the stage's last stderr lines, named `what` (default: the command)."""
    env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"} | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what or ' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def assign(params: dict, key: str, value) -> None:
    """params[a][b]... = value for the dotted key "a.b..."; the key must already exist (KeyError),
    so a misspelt one is an error, not a new param the stage never reads."""
    parent, _, leaf = key.rpartition(".")
    node = lookup(params, parent, None) if parent else params
    if not isinstance(node, dict) or leaf not in node:
        raise KeyError(key)
    node[leaf] = value


def override(params: dict, assignment: str) -> tuple[str, object]:
    """`assign` from "a.b...=value" (the value parsed as YAML), as `dvc exp run -S` takes it."""
    key, sep, text = assignment.partition("=")
    if not sep:
        sys.exit(f"-S {assignment!r}: give KEY=VALUE, e.g. -S sd.search.damping=0.01")
    try:
        assign(params, key, parse_yaml(text))
    except KeyError:
        sys.exit(f"-S {assignment!r}: params.yaml has no key {key}; use a key it has (e.g. sd.search.damping)")
    return key, lookup(params, key, None)
