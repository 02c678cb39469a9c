"""Stage `rank_layers`: importance and gradient alignment of every candidate tensor, per tower
(`slug.rank.towers`: one tower or every tower of the model), their Pareto fronts, the plots
(`plots/pareto/<tower>.{csv,png}`) and metrics/layers.json.  g_f from stage `gradients`, g_r from
the shared retain statistics (stage `retain_stats`)."""

from __future__ import annotations

import logging
import time

from unlearn.cli import peak_memory_mb, run_stage
from unlearn.io import atomic_outputs
from unlearn.methods.retain_stats import load_retain_stats
from unlearn.methods.slug import RankConfig, load_gradients, rank
from unlearn.models.adapter import load
from unlearn.params import as_config, stage_params
from unlearn.plots import write_pareto
from unlearn.runs import write_metrics

MODEL, GRADS, STATS, RETAIN, METRICS, PLOTS = "models/base", "models/grads", "models/retain", "data/retain", "metrics/layers.json", "plots/pareto"
log = logging.getLogger("rank_layers")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("rank_layers")
    cfg = as_config(RankConfig, p("slug.rank"), "slug.rank")
    adapter = load(MODEL)
    g_f, _ = load_gradients(GRADS, adapter, MODEL)
    stats, _ = load_retain_stats(STATS, adapter, MODEL, f"{RETAIN}/manifest.json")
    ranking = rank(adapter, g_f, stats.gradient, cfg)
    with atomic_outputs(METRICS, PLOTS) as (metrics, plots):
        write_pareto(ranking, plots, adapter.short_name)
        write_metrics(metrics, {
            "family": adapter.family, "towers": list(ranking.order), "front": ranking.front_scores(), "order": ranking.order,
            "candidates": {t: len(rows) for t, rows in ranking.rows.items()}, "alignment": cfg.alignment,
            "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(),
        }, "rank_layers")
    for t, front in ranking.fronts.items():
        log.info("%s tower front: %s", t, ", ".join(front))


if __name__ == "__main__":
    run_stage("rank_layers", main)
