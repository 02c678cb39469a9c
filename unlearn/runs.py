"""Run records: what one run of a stage cost (wall times, peak memory, processes, host), kept out of
DVC's outputs and out of git.

A time inside a stage's output makes its hash differ on every run: `dvc.lock` changes although the
weights and the accuracies are identical, the stages downstream rerun for nothing, `git status` is
dirty after `make repro`, and `git checkout` + `dvc checkout` of an older commit cannot find the
old hash in the cache.  So every stage writes its results (accuracies, choices, sizes: the same
bytes on every run) to its metrics file and its cost to `runs/<stage>.json` (git-ignored, not a
stage output; dvc.yaml declares `runs/` as top-level metrics, so `dvc metrics show` prints both).

`write_metrics` does the split by key name (`COST_KEY`: `time_*`, `peak_memory*`, `*_s`, `*_mb`,
`*_min`, at any depth, in lists of records too) and `read_metrics` puts the two back together for a
reader that wants both (the report, the benchmarks).  A stage that DVC restored instead of running
(`dvc checkout`, `dvc pull`, the run cache) has no record here: its cost reads as null, with a
warning.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import time
from pathlib import Path
from typing import Any

from unlearn.io import atomic_outputs, read_json, write_json

RUNS = Path("runs")
COST_KEY = re.compile(r"^(time|peak_memory)|_(s|mb|min)$")
RECORD_KEYS = ("stage", "host", "cpus", "cpu", "torch", "python", "finished", "drawing_dtype")  # how and where a run ran, not its cost
log = logging.getLogger(__name__)


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux, else `platform.processor()`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_kernels() -> str:
    """torch's version, the CPU kernels it picked and its thread count: with the CPU, what decides
    the float bits of a run (docs/gate.md "Determinism")."""
    import torch

    return f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()} {torch.get_num_threads()} threads"


def write_run(stage: str, **fields: Any) -> Path:
    """Record one run of `stage` (atomically: a reader never sees half a record), with the machine
    that ran it."""
    path = RUNS / f"{stage}.json"
    record = fields | {"stage": stage, "host": socket.gethostname(), "cpus": os.cpu_count(), "cpu": cpu_model(), "torch": torch_kernels(),
                       "python": platform.python_version(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_outputs(path) as (tmp,):
        write_json(tmp, record)
    return path


def read_run(stage: str, runs: str | Path = RUNS) -> dict | None:
    """The last recorded run of `stage`, or None (it was restored by DVC, not run here)."""
    path = Path(runs) / f"{stage}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        log.warning("no run record %s: stage %s was restored by DVC, not run here; its time reads as null", path, stage)
    except ValueError:
        log.warning("run record %s is not JSON; stage %s's time reads as null", path, stage)
    return None


def split_cost(tree: Any) -> tuple[Any, Any]:
    """(results, cost) of a metrics tree: every key named like a cost (`COST_KEY`) moves to the cost
    part at the same path; a list of records splits record by record (its cost part is then a list
    of the same length, {} where a record has no cost)."""
    if isinstance(tree, dict):
        results, cost = {}, {}
        for key, value in tree.items():
            if COST_KEY.search(key):
                cost[key] = value
                continue
            results[key], part = split_cost(value)
            if part:
                cost[key] = part
        return results, cost
    if isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        parts = [split_cost(v) for v in tree]
        costs = [c for _, c in parts]
        return [r for r, _ in parts], (costs if any(costs) else {})
    return tree, {}


def with_cost(results: Any, cost: Any) -> Any:
    """The inverse of `split_cost`: the cost part put back at its paths (a part whose shape does not
    match, a record of another run, is left out)."""
    if isinstance(results, dict) and isinstance(cost, dict):
        out = dict(results)
        for key, value in cost.items():
            out[key] = with_cost(results[key], value) if key in results else value
        return out
    if isinstance(results, list) and isinstance(cost, list) and len(results) == len(cost):
        return [with_cost(r, c) for r, c in zip(results, cost)]
    return results


def write_metrics(path: str | Path, metrics: dict, stage: str, **how: Any) -> dict:
    """Write `metrics`' results to `path` (a DVC output: the same bytes on every run) and its cost to
    `runs/<stage>.json`, with `how` it ran where that is a setting of the machine rather than a
    result (the dtype a pipeline drew in, a `torch.dtype` recorded by name); returns the cost part."""
    import torch

    results, cost = split_cost(metrics)
    write_json(path, results)
    write_run(stage, **cost, **{k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v for k, v in how.items()})
    return cost


def read_metrics(path: str | Path, stage: str, runs: str | Path = RUNS) -> dict:
    """A stage's metrics with its last run's cost put back (the cost keys absent when it has no record);
    `runs`: the run records' folder (another working directory's)."""
    record = read_run(stage, runs) or {}
    return with_cost(read_json(path), {k: v for k, v in record.items() if k not in RECORD_KEYS})


def cost(stage: str, *keys: str) -> Any:
    """One figure of a stage's last run record (`cost("search", "time_s")`), None when there is none."""
    node: Any = read_run(stage) or {}
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node
