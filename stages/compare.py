"""Stage `compare`: the per-method results of `compare_run@<method>` side by side.  Writes
metrics/compare.json (per method the means over concepts, plus every per-concept row),
plots/compare.md (the comparison table with stored bytes), plots/compare.csv (dvc plots) and
plots/compare_scatter.png (utility against forget accuracy): the same bytes on every run.  The
run's cost goes beside it, out of git and DVC (unlearn/runs.py): runs/compare.json (times per
method and concept, the ratio to SLUG's), plots/runs/compare.md (the table with its time column) and
plots/runs/compare_time.png."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from unlearn.cli import run_stage
from unlearn.compare import aggregate
from unlearn.data.curate import resolve_concepts
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs
from unlearn.methods.registry import check_methods
from unlearn.params import stage_params
from unlearn.plots import compare_scatter, compare_time_bars
from unlearn.runs import read_metrics, write_metrics

RUNS, METRICS, RETAIN_ONCE, TABLE_ONCE = "metrics/compare", "metrics/compare.json", "metrics/retain_stats.json", "metrics/concept_moments.json"
TABLE, CSV, SCATTER = "plots/compare.md", "plots/compare.csv", "plots/compare_scatter.png"
TIMED_TABLE, TIMES = Path("plots/runs/compare.md"), Path("plots/runs/compare_time.png")  # git-ignored: they change on every run
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
        rows = read_metrics(path, f"compare_run@{m}")["rows"]  # with each run's times when it ran here
        if [r["concept"] for r in rows] != concepts:
            raise UnlearnError(f"{path} covers {[r['concept'] for r in rows]}, not compare.concepts {concepts}; run `dvc repro compare_run@{m}`")
        results[m] = rows
    once = read_metrics(RETAIN_ONCE, "retain_stats") if "slug" in methods else None
    # SLUG's kept moments (slug.search.moments: kept, recorded in its rows): the table's moments, also once
    table_once = read_metrics(TABLE_ONCE, "concept_moments") if any(r.get("moments") == "kept" for r in results.get("slug", [])) else None
    out = aggregate(results, concepts, kinds, once, table_once)
    with atomic_outputs(METRICS, TABLE, CSV, SCATTER) as (metrics, md, csv_path, scatter):
        write_metrics(metrics, out["metrics"], "compare")
        md.write_text(out["table"])
        fields = [k for k in out["flat"][0] if k != "time_unlearn_s"]
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(out["flat"])
        compare_scatter(out["flat"], scatter, f"mean over {len(concepts)} concepts (test images)")
    with atomic_outputs(TIMED_TABLE) as (md,):
        md.write_text(out["table_with_times"])
    if all(s["time_unlearn_s"] is not None for s in out["flat"]):
        with atomic_outputs(TIMES) as (times,):
            compare_time_bars(out["flat"], times, "unlearning wall time (same run, same machine)")
    else:  # a time plot of an earlier run beside this run's table would mislead
        TIMES.unlink(missing_ok=True)
        log.warning("some compare_run stages were restored by DVC, not run here: their times are unknown, no %s", TIMES)
    log.info("\n%s", out["table_with_times"])


if __name__ == "__main__":
    run_stage("compare", main)
