"""Stage `compare`: the per-method results of `compare_run@<method>` side by side.  Writes
metrics/compare.json (per method the means over concepts, plus every per-concept row),
plots/compare.md (the table of METHODS.md 1.6 with time and stored bytes), plots/compare.csv
(dvc plots) and two PNGs: utility against forget accuracy, and wall time."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from unlearn.cli import run_stage
from unlearn.data.curate import resolve_concepts
from unlearn.errors import UnlearnError
from unlearn.eval.suite import ACCURACY_KEYS
from unlearn.io import atomic_outputs, read_json, write_json
from unlearn.methods import check_methods
from unlearn.params import stage_params
from unlearn.plots import compare_scatter, compare_time_bars

RUNS, METRICS = "metrics/compare", "metrics/compare.json"
TABLE, CSV, SCATTER, TIMES = "plots/compare.md", "plots/compare.csv", "plots/compare_scatter.png", "plots/compare_time.png"
MEAN_KEYS = (*ACCURACY_KEYS, "mia")
log = logging.getLogger("compare")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 6) if values else None


def summarise(method: str, rows: list[dict]) -> dict:
    """Means over the concepts whose run completed; `failed` counts the others (never dropped)."""
    done = [r for r in rows if r["status"] != "failed"]
    out = {"method": method, "concepts": len(rows), "completed": len(done), "failed": len(rows) - len(done),
           "forgotten": sum(r["status"] == "ok" for r in rows)}
    out |= {k: _mean([r[k] for r in done]) for k in MEAN_KEYS}
    out["time_s"] = {"unlearn": _mean([r["time_s"]["unlearn"] for r in done]),
                     "total": _mean([r["time_s"]["unlearn"] + r["time_s"].get("eval", 0.0) for r in done])}
    out["stored_bytes"] = _mean([r["stored_bytes"] for r in done])
    return out


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


# (what the concepts are, utility column, retain column) by the kinds in compare.concepts
HEADERS = {("identity",): ("identities", "ImageNet-style@1", "identity retain@1"),
           ("object",): ("objects", "identity@1", "object retain@1"),
           ("identity", "object"): ("concepts", "utility@1 (the other kind)", "retain@1 (same kind)")}


def table(summary: list[dict], base: dict, concepts: list[str], kinds: tuple[str, ...]) -> str:
    what, utility, retain = HEADERS[kinds]
    lines = [f"Mean over {len(concepts)} {what} ({', '.join(concepts)}), test images, %. "
             "Time: unlearning wall time per concept (SLUG: gradients + ranking + search; baselines: training up to the reported epoch).", "",
             f"| method | FA@1 | FA@5 | {utility} | {retain} | MIA | time s | stored bytes | passed (val) |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| original | {_pct(base['forget_top1'])} | {_pct(base['forget_top5'])} | {_pct(base['utility_top1'])} | {_pct(base['retain_top1'])} "
             f"| {_pct(base['mia'])} | – | – | – |"]
    for s in summary:
        failed = f", {s['failed']} failed" if s["failed"] else ""
        t, stored = s["time_s"]["unlearn"], s["stored_bytes"]
        lines.append(f"| {s['method']} | {_pct(s['forget_top1'])} | {_pct(s['forget_top5'])} | {_pct(s['utility_top1'])} | {_pct(s['retain_top1'])} "
                     f"| {_pct(s['mia'])} | {'–' if t is None else f'{t:.1f}'} | {'–' if stored is None else f'{stored:,.0f}'} "
                     f"| {s['forgotten']}/{s['concepts']}{failed} |")
    lines += ["", "passed (val): concepts whose run met its goal on the validation images: for SLUG a converged search "
              "(FA@1 = 0, FA@5 <= 5 % and the utility guard), for a baseline FA@1 = 0 at some epoch."]
    return "\n".join(lines) + "\n"


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
    summary = [summarise(m, rows) for m, rows in results.items()]
    any_rows = next(iter(results.values()))
    base = {k: _mean([r["base"][k] for r in any_rows]) for k in MEAN_KEYS}
    by_method = {s["method"]: s for s in summary}
    speedup = {}
    if "slug" in by_method and by_method["slug"]["time_s"]["unlearn"]:
        t_slug = by_method["slug"]["time_s"]["unlearn"]
        speedup = {m: round(s["time_s"]["unlearn"] / t_slug, 3) for m, s in by_method.items() if m != "slug" and s["time_s"]["unlearn"] is not None}
    flat = [{"method": s["method"], "forget_top1": s["forget_top1"], "forget_top5": s["forget_top5"], "retain_top1": s["retain_top1"],
             "utility_top1": s["utility_top1"], "mia": s["mia"], "time_unlearn_s": s["time_s"]["unlearn"], "stored_bytes": s["stored_bytes"]} for s in summary]
    with atomic_outputs(METRICS, TABLE, CSV, SCATTER, TIMES) as (metrics, md, csv_path, scatter, times):
        write_json(metrics, {"concepts": concepts, "base": base, "methods": by_method, "time_ratio_to_slug": speedup,
                             "rows": [{k: v for k, v in r.items() if k != "epochs"} for rows in results.values() for r in rows]})
        md.write_text(table(summary, base, concepts, kinds))
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
        compare_scatter(flat, scatter, f"mean over {len(concepts)} concepts (test images)")
        compare_time_bars(flat, times, "unlearning wall time (same run, same machine)")
    log.info("\n%s", table(summary, base, concepts, kinds))


if __name__ == "__main__":
    run_stage("compare", main)
