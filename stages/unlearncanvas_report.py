"""Stage `unlearncanvas_report` (`unlearncanvas_small_report`): every method's rows of the
UnlearnCanvas benchmark side by side (`unlearn.sd.canvas`).  Writes metrics/<stage>.json (per
method the means over the style targets and over the object targets, the mean stored bytes, and
every per-target row; the unedited pipeline as `base`), plots/<stage>.md (the leaderboard with the
published rows beside it), plots/<stage>.csv (one row per method and target: `dvc plots`) and
plots/<stage>_scatter.png (UA against IRA): the same bytes on every run.  The run's cost (each
method's unlearning time and memory, the ratios to SLUG's) goes to runs/<stage>_report.json and
plots/runs/<stage>.md (the leaderboard with its time and memory columns), out of git."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from unlearn.cli import run_stage
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs
from unlearn.params import stage_params
from unlearn.runs import read_metrics, write_metrics
from unlearn.sd.canvas import canvas_scatter, leaderboard, means
from unlearn.sd.methods import check_methods

FIELDS = ["method", "target", "axis", "status", "UA", "IRA", "CRA", "fid", "stored_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="unlearncanvas", choices=["unlearncanvas", "unlearncanvas_small"])
    args = ap.parse_args()
    p = stage_params(f"{args.stage}_report")
    methods = check_methods(list(p("unlearncanvas.methods")), "unlearncanvas.methods")
    results = {}
    for m in ["base", *methods]:
        path = Path(f"metrics/{args.stage}", f"{m}.json")
        if not path.is_file():
            raise UnlearnError(f"{path} is missing; run `dvc repro {args.stage}{'_base' if m == 'base' else '@' + m}`")
        results[m] = read_metrics(path, f"{args.stage}_base" if m == "base" else f"{args.stage}@{m}")
    summary, rows = {}, []
    for m, r in results.items():
        ok = [x for x in r["rows"] if x["status"] == "ok"]
        times = [x["time_s"] for x in r["rows"] if x.get("time_s") is not None]
        stored = [x["stored_bytes"] for x in ok if x.get("stored_bytes") is not None]
        summary[m] = means(r["rows"]) | {"stored_bytes": round(sum(stored) / len(stored)) if stored else None,
                                         "time_s": round(sum(times) / len(times), 2) if times else None,
                                         "peak_memory_mb": r.get("peak_memory_mb") if m != "base" else None}
        rows += [{"method": m, **x} for x in r["rows"]]
    slug_t = summary.get("slug", {}).get("time_s")
    ratios = {m: round(s["time_s"] / slug_t, 1) for m, s in summary.items() if slug_t and s.get("time_s") and m != "slug"}
    out = {"methods": {m: {**s, "rows": [x for x in rows if x["method"] == m]} for m, s in summary.items()},
           "answer_set": results["base"]["answer_set"], "sampler": results["base"]["sampler"], "time_ratio_to_slug": ratios}
    with atomic_outputs(f"metrics/{args.stage}.json", f"plots/{args.stage}.md", f"plots/{args.stage}.csv", f"plots/{args.stage}_scatter.png") as (
            metrics, table, csv_path, scatter):
        write_metrics(metrics, out, f"{args.stage}_report")
        title = f"UnlearnCanvas on the tiny pipeline ({results['base']['answer_set']['images']} drawings per answer set)"
        table.write_text(f"# {title}\n\nMeans over targets, in %; the unedited pipeline as `base` (its UA: the judges already miss the "
                         "target). Time and memory: plots/runs/ (one run's figures).\n\n" + leaderboard(summary, timed=False))
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        canvas_scatter(rows, scatter, title)
    timed = Path(f"plots/runs/{args.stage}.md")
    timed.parent.mkdir(parents=True, exist_ok=True)
    timed.write_text(f"# UnlearnCanvas, this run's times (s per target, unlearning only) and memory (the stage's peak)\n\n"
                     f"Time over SLUG's: {ratio_text(ratios, slug_t is not None, args.stage)}\n\n" + leaderboard(summary, timed=True))


def ratio_text(ratios: dict, slug_timed: bool, stage: str) -> str:
    """Each method's unlearning time over SLUG's, or why there is none: the times come from the run
    records of this workspace (runs/, not in git), which hold only the stages run here."""
    if ratios:
        return ", ".join(f"{m} {r}×" for m, r in ratios.items())
    if not slug_timed:
        return f"none (no run record runs/{stage}@slug.json here: `dvc repro -f --single-item {stage}@slug` gives one)"
    return "none (no other method's run record here)"


if __name__ == "__main__":
    run_stage("unlearncanvas_report", main)
