"""Stage `rank_layers`: importance and gradient alignment of every candidate tensor, per tower,
their Pareto fronts, the plots (log-log PNG and CSV per tower) and metrics/layers.json."""

from __future__ import annotations

import csv
import logging
import time

from unlearn.cli import peak_memory_mb, run_stage
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs, write_json
from unlearn.methods.slug import layer_scores, load_gradients, pareto_ranks
from unlearn.models import openclip as oc
from unlearn.params import stage_params
from unlearn.plots import pareto_plot

MODEL, GRADS, METRICS = "models/base", "models/grads", "metrics/layers.json"
TOWERS = ("image", "text")
ALIGNMENTS = ("abs", "signed")
log = logging.getLogger("rank_layers")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("rank_layers")
    alignment = p("slug.rank.alignment")
    if alignment not in ALIGNMENTS:
        raise UnlearnError(f"unknown slug.rank.alignment {alignment!r}; use one of: {', '.join(ALIGNMENTS)}")
    adapter = oc.load(MODEL)
    g_f, g_r, _ = load_gradients(GRADS, adapter, MODEL)
    scores = layer_scores(adapter, g_f, g_r, adapter.candidate_layers(bool(p("slug.rank.include_layernorm"))))
    outputs = [f"plots/pareto_{t}.{ext}" for t in TOWERS for ext in ("csv", "png")]
    fronts: dict[str, list[str]] = {}
    search_order: dict[str, list[str]] = {}  # by Pareto rank, then importance: what the search tries
    with atomic_outputs(METRICS, *outputs) as (metrics, *paths):
        for t, (csv_path, png_path) in zip(TOWERS, zip(paths[::2], paths[1::2])):
            tower = [s for s in scores if s.tower == t]
            if not tower:
                raise UnlearnError(f"the model has no candidate layer in its {t} tower")
            # signed: an edit whose gradient is anti-aligned with g_r lowers the retain loss, so it ranks as well-separated
            align = [s.alignment if alignment == "abs" else max(s.signed_alignment, 0.0) for s in tower]
            ranks = pareto_ranks([s.importance for s in tower], align)
            order = sorted(range(len(tower)), key=lambda i: (ranks[i], -tower[i].importance))
            fronts[t] = [tower[i].name for i in order if ranks[i] == 1]
            search_order[t] = [tower[i].name for i in order]
            rows = [{"layer": s.name, "importance": s.importance, "alignment": a, "signed_alignment": s.signed_alignment,
                     "front": r == 1, "pareto_rank": r, "numel": s.numel} for s, a, r in zip(tower, align, ranks)]
            with open(csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            pareto_plot(rows, png_path, f"{t} tower: {len(fronts[t])} of {len(tower)} layers on the Pareto front")
        by_name = {s.name: s for s in scores}
        write_json(metrics, {
            "front": {t: {n: {"importance": round(by_name[n].importance, 8), "alignment": round(by_name[n].alignment, 8),
                              "signed_alignment": round(by_name[n].signed_alignment, 8)} for n in names} for t, names in fronts.items()},
            "order": search_order, "candidates": {t: sum(s.tower == t for s in scores) for t in TOWERS}, "alignment": alignment,
            "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(),
        })
    for t in TOWERS:
        log.info("%s tower front: %s", t, ", ".join(fronts[t]))


if __name__ == "__main__":
    run_stage("rank_layers", main)
