"""Stage `compare`: the per-method results of `compare_run@<method>` side by side.  Writes
metrics/compare.json (per method the means over concepts, plus every per-concept row),
plots/compare.md (the comparison table with time and stored bytes), plots/compare.csv
(dvc plots) and two PNGs: utility against forget accuracy, and wall time."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from unlearn.cli import run_stage
from unlearn.compare import aggregate
from unlearn.data.curate import resolve_concepts
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs, read_json, write_json
from unlearn.methods.registry import check_methods
from unlearn.params import stage_params
from unlearn.plots import compare_scatter, compare_time_bars

RUNS, METRICS, RETAIN_ONCE = "metrics/compare", "metrics/compare.json", "metrics/retain_stats.json"
TABLE, CSV, SCATTER, TIMES = "plots/compare.md", "plots/compare.csv", "plots/compare_scatter.png", "plots/compare_time.png"
log = logging.getLogger("compare")


def main() -> None:
    p = stage_params("compare")
    methods = check_methods(p("compare.methods"))
    resolved = resolve_concepts(p("compare.concepts"), p("concepts"))
    concepts, kinds = [c.name for c in resolved], tuple(sorted({c.kind for c in resolved}))
    results = {}
    for m in methods:
        path = Path(RUNS, f"{m}.json")
        if not path.is_file():
            raise UnlearnError(f"{path} is missing; run `dvc repro compare_run@{m}`")
        rows = read_json(path)["rows"]
        if [r["concept"] for r in rows] != concepts:
            raise UnlearnError(f"{path} covers {[r['concept'] for r in rows]}, not compare.concepts {concepts}; run `dvc repro compare_run@{m}`")
        results[m] = rows
    once = read_json(RETAIN_ONCE) if "slug" in methods else None
    out = aggregate(results, concepts, kinds, once)
    with atomic_outputs(METRICS, TABLE, CSV, SCATTER, TIMES) as (metrics, md, csv_path, scatter, times):
        write_json(metrics, out["metrics"])
        md.write_text(out["table"])
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(out["flat"][0]))
            writer.writeheader()
            writer.writerows(out["flat"])
        compare_scatter(out["flat"], scatter, f"mean over {len(concepts)} concepts (test images)")
        compare_time_bars(out["flat"], times, "unlearning wall time (same run, same machine)")
    log.info("\n%s", out["table"])


if __name__ == "__main__":
    run_stage("compare", main)
