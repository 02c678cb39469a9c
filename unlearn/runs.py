"""Run records: what one run of a stage cost (wall time, peak memory, processes, host), kept out of
DVC's outputs.

A time inside a DVC-cached output makes its hash differ on every run: `dvc.lock` changes although
the weights are identical, the stages downstream rerun for nothing, and `git checkout` +
`dvc checkout` of an older commit cannot find the old hash in the cache.  So the stages whose
cached outputs used to carry their cost (`base_model`, `curate`, `gradients`, `search`) write it
here instead, `runs/<stage>.json` (git-ignored, not declared in dvc.yaml), and `evaluate` reads
it from here for `metrics/unlearn.json`'s time column.  A stage that DVC restored instead of
running (`dvc checkout`, `dvc pull`) has no record here: its time reads as null, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

from unlearn.io import atomic_outputs, write_json

RUNS = Path("runs")
log = logging.getLogger(__name__)


def write_run(stage: str, **fields: Any) -> Path:
    """Record one run of `stage` (atomically: a reader never sees half a record)."""
    path = RUNS / f"{stage}.json"
    record = fields | {"stage": stage, "host": socket.gethostname(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_outputs(path) as (tmp,):
        write_json(tmp, record)
    return path


def read_run(stage: str) -> dict | None:
    """The last recorded run of `stage`, or None (it was restored by DVC, not run here)."""
    path = RUNS / f"{stage}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        log.warning("no run record %s: stage %s was restored by DVC, not run here; its time reads as null", path, stage)
    except ValueError:
        log.warning("run record %s is not JSON; stage %s's time reads as null", path, stage)
    return None
