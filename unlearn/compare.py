"""The comparison of methods (stage `compare`): per method the means over concepts (failed runs
counted, never dropped), the table SLUG's paper reports with time and stored bytes, the rows for
plots.  Wall times are a run's cost, not its result: they come from the run records
(`unlearn/runs.py`; None where a stage was restored by DVC instead of run) and only the tables
written with `times=True` show them."""

from __future__ import annotations

from unlearn.eval.suite import ACCURACY_KEYS

MEAN_KEYS = (*ACCURACY_KEYS, "mia")


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 6) if values else None


def summarise(method: str, rows: list[dict]) -> dict:
    """Means over the concepts whose run completed; `failed` counts the others (never dropped)."""
    done = [r for r in rows if r["status"] != "failed"]
    out = {"method": method, "concepts": len(rows), "completed": len(done), "failed": len(rows) - len(done),
           "forgotten": sum(r["status"] == "ok" for r in rows)}
    out |= {k: mean([r[k] for r in done]) for k in MEAN_KEYS}
    timed = [r["time_s"] for r in done if r.get("time_s")]
    out["time_s"] = {"unlearn": mean([t["unlearn"] for t in timed]), "total": mean([t["unlearn"] + t.get("eval", 0.0) for t in timed])}
    out["stored_bytes"] = mean([r["stored_bytes"] for r in done])
    return out


def pct(v: float | None, digits: int = 2, unit: str = "") -> str:
    """A fraction as a percentage (– for a missing value)."""
    return "–" if v is None else f"{100 * v:.{digits}f}{unit}"


# (what the concepts are, utility column, retain column) by the kinds in compare.concepts
HEADERS = {("identity",): ("identities", "ImageNet-style@1", "identity retain@1"),
           ("object",): ("objects", "identity@1", "object retain@1"),
           ("style",): ("styles", "ImageNet-style@1", "style retain@1")}
MIXED = ("concepts", "utility@1 (the other kind)", "retain@1 (same kind)")


def seconds(t: float | None) -> str:
    return "–" if t is None else f"{t:.1f}"


def table(summary: list[dict], base: dict, concepts: list[str], kinds: tuple[str, ...], retain_once: dict | None = None,
          times: bool = False, table_once: dict | None = None) -> str:
    """The comparison as markdown; `times`: with the wall-time column (a run's cost: the table in
    plots/runs/compare.md, not the committed plots/compare.md, whose bytes must not change from run to run)."""
    what, utility, retain = HEADERS.get(kinds, MIXED)
    time_head, time_sep = (" time s |", "---|") if times else ("", "")
    lines = [f"Mean over {len(concepts)} {what} ({', '.join(concepts)}), test images, %. "
             + ("Time: unlearning wall time per concept in this run (SLUG: forget gradient + ranking + search; baselines: training up to "
                "the reported epoch)." if times else "Wall times are this run's cost, not its result: `plots/runs/compare.md` (not in git) and the README."),
             "",
             f"| method | FA@1 | FA@5 | {utility} | {retain} | MIA |{time_head} stored bytes | passed (val) |",
             f"|---|---|---|---|---|---|{time_sep}---|---|",
             f"| original | {pct(base['forget_top1'])} | {pct(base['forget_top5'])} | {pct(base['utility_top1'])} | {pct(base['retain_top1'])} "
             f"| {pct(base['mia'])} |{' – |' if times else ''} – | – |"]
    for s in summary:
        failed = f", {s['failed']} failed" if s["failed"] else ""
        stored = s["stored_bytes"]
        t = f" {seconds(s['time_s']['unlearn'])} |" if times else ""
        lines.append(f"| {s['method']} | {pct(s['forget_top1'])} | {pct(s['forget_top5'])} | {pct(s['utility_top1'])} | {pct(s['retain_top1'])} "
                     f"| {pct(s['mia'])} |{t} {'–' if stored is None else f'{stored:,.0f}'} | {s['forgotten']}/{s['concepts']}{failed} |")
    lines += ["", "passed (val): concepts whose run met its goal on the validation images: for SLUG a converged search "
              "(FA@1 = 0, FA@5 <= 5 % and the utility guard), for a baseline FA@1 = 0 at some epoch."]

    def cost(record: dict) -> str:
        """A one-time cost and its share per concept (the timed table only)."""
        once = record.get("time_s")
        return (f": {seconds(once)} s, {seconds(once / len(concepts))} s per concept over these {len(concepts)} (not in the time column)"
                if times and once is not None else "")
    if retain_once:
        lines += ["", f"SLUG's retain statistics (g_r and the retain input moments over {retain_once['n_retain']:,} pairs, stage `retain_stats`) "
                  f"are computed once for every concept{cost(retain_once)}."]
    if table_once:
        lines += ["", f"So are the moments of every concept's pairs of the table ({table_once['pairs']:,} pairs of {table_once['concepts']} concepts, "
                  f"stage `concept_moments`), which SLUG's kept moments pool with the retain moments, less the target's own pairs "
                  f"(read in each concept's time){cost(table_once)}."]
    return "\n".join(lines) + "\n"




def aggregate(results: dict[str, list[dict]], concepts: list[str], kinds: tuple[str, ...], retain_once: dict | None = None,
              table_once: dict | None = None) -> dict:
    """From each method's per-concept rows: the summary per method, the original model's means,
    the time of each method relative to SLUG's, flat rows for the CSV and plots, and the table.
    `retain_once`: the one-time cost of SLUG's retain statistics (metrics/retain_stats.json),
    reported apart and as a share per concept; `table_once` the same of the concept moments
    (metrics/concept_moments.json), when SLUG's moments are kept."""
    summary = [summarise(m, rows) for m, rows in results.items()]
    any_rows = next(iter(results.values()))
    base = {k: mean([r["base"][k] for r in any_rows]) for k in MEAN_KEYS}
    by_method = {s["method"]: s for s in summary}
    ratio = {}
    if "slug" in by_method and by_method["slug"]["time_s"]["unlearn"]:  # None when the runs were restored, not run
        t_slug = by_method["slug"]["time_s"]["unlearn"]
        ratio = {m: round(s["time_s"]["unlearn"] / t_slug, 3) for m, s in by_method.items() if m != "slug" and s["time_s"]["unlearn"] is not None}
    flat = [{"method": s["method"], "forget_top1": s["forget_top1"], "forget_top5": s["forget_top5"], "retain_top1": s["retain_top1"],
             "utility_top1": s["utility_top1"], "mia": s["mia"], "time_unlearn_s": s["time_s"]["unlearn"], "stored_bytes": s["stored_bytes"]}
            for s in summary]

    def shared(record: dict) -> dict:
        """A one-time cost and its share per concept."""
        t = record.get("time_s")
        return {"time_s": t, "per_concept_s": None if t is None else round(t / len(concepts), 3)}
    once = None
    if retain_once:
        once = shared(retain_once) | {"n_retain": retain_once["n_retain"]}
    if table_once:
        once = (once or {}) | {"concept_moments": shared(table_once) | {"pairs": table_once["pairs"], "concepts": table_once["concepts"]}}
    metrics = {"concepts": concepts, "base": base, "methods": by_method, "time_ratio_to_slug": ratio, "slug_retain_stats": once,
               "rows": [{k: v for k, v in r.items() if k != "epochs"} for rows in results.values() for r in rows]}
    return {"metrics": metrics, "flat": flat, "table": table(summary, base, concepts, kinds, retain_once, table_once=table_once),
            "table_with_times": table(summary, base, concepts, kinds, retain_once, times=True, table_once=table_once)}
