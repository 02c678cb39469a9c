"""Wall time and peak memory of pipeline stages, each reproduced from scratch with DVC.

    python bench/pipeline.py                    # every stage
    python bench/pipeline.py --stages curate gradients rank_layers search evaluate   # SLUG only
    python bench/pipeline.py --stages download  # one stage

Each stage runs as `dvc repro -f -s STAGE` in a child process; its peak resident memory is read
from the kernel's rusage of that child (which includes the stage command it waited for).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(stage: str) -> dict:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1"}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall the stage
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            sys.exit(f"stage {stage} failed:\n{log.read().decode(errors='replace')[-2000:]}")
    return {"stage": stage, "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=["download", "base_model", "curate", "gradients", "rank_layers", "search", "evaluate"])
    args = ap.parse_args()
    rows = [run_stage(s) for s in args.stages]
    total = round(sum(r["wall_s"] for r in rows), 1)
    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'stage':<12} {'wall s':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['stage']:<12} {r['wall_s']:>8} {r['peak_rss_mb']:>12}")
    print(f"{'total':<12} {total:>8}")
    for name in ("base.json", "unlearn.json"):
        metrics = ROOT / "metrics" / name
        if metrics.exists():
            print(f"metrics/{name}:", json.dumps(json.loads(metrics.read_text())))


if __name__ == "__main__":
    main()
