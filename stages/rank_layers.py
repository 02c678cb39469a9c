"""Stage `rank_layers`: importance and gradient alignment of every candidate tensor, per tower,
their Pareto fronts, the plots (log-log PNG and CSV per tower) and metrics/layers.json."""

from __future__ import annotations

import csv
import logging
import time

from unlearn.cli import peak_memory_mb, run_stage
from unlearn.io import atomic_outputs, write_json
from unlearn.methods.slug import TOWERS, layer_scores, load_gradients, rank_towers
from unlearn.models import openclip as oc
from unlearn.params import stage_params
from unlearn.plots import pareto_plot

MODEL, GRADS, METRICS = "models/base", "models/grads", "metrics/layers.json"
log = logging.getLogger("rank_layers")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("rank_layers")
    alignment = p("slug.rank.alignment")
    adapter = oc.load(MODEL)
    g_f, g_r, _ = load_gradients(GRADS, adapter, MODEL)
    scores = layer_scores(adapter, g_f, g_r, adapter.candidate_layers(bool(p("slug.rank.include_layernorm"))))
    ranking = rank_towers(scores, alignment)
    outputs = [f"plots/pareto_{t}.{ext}" for t in TOWERS for ext in ("csv", "png")]
    with atomic_outputs(METRICS, *outputs) as (metrics, *paths):
        for t, (csv_path, png_path) in zip(TOWERS, zip(paths[::2], paths[1::2])):
            rows = ranking.rows[t]
            with open(csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            pareto_plot(rows, png_path, f"{t} tower: {len(ranking.fronts[t])} of {len(rows)} layers on the Pareto front")
        write_json(metrics, {
            "front": ranking.front_scores(), "order": ranking.order, "candidates": {t: len(ranking.rows[t]) for t in TOWERS},
            "alignment": alignment, "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(),
        })
    for t in TOWERS:
        log.info("%s tower front: %s", t, ", ".join(ranking.fronts[t]))


if __name__ == "__main__":
    run_stage("rank_layers", main)
