"""Stage `concept_moments`: the input moments of every concept's pairs of the table (each
concept's pairs as curate selects its forget set), once per (model, table, curation), in
models/concept_moments (checked by hash when read).  SLUG's search pools them, less the
target's own pairs, with the retain moments when `slug.search.moments` is kept (docs/clip.md "The kept
moments"; unlearn.methods.kept).  Its time and memory go to metrics/concept_moments.json."""

from __future__ import annotations

import logging
import time

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.concept_pairs import forget_pairs
from unlearn.data.curate import table_concepts
from unlearn.io import atomic_outputs
from unlearn.methods.kept import compute_table_moments, save_table_moments
from unlearn.methods.retain_stats import load_retain_stats
from unlearn.models.adapter import load
from unlearn.params import stage_params
from unlearn.runs import write_metrics

MODEL, SHARDS, STATS, RETAIN, OUT, METRICS = "models/base", "data/laion", "models/retain", "data/retain", "models/concept_moments", "metrics/concept_moments.json"
log = logging.getLogger("concept_moments")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("concept_moments")
    table = table_concepts(p("concepts"))
    solo = table if p("curate.solo") else ()
    batch_size = int(p("gradients.batch_size"))
    adapter = load(MODEL, device=torch_device(p("model.device")))
    layers = list(load_retain_stats(STATS, adapter, MODEL, f"{RETAIN}/manifest.json")[0].moments)  # the tensors the retain moments cover
    pairs = forget_pairs(adapter, SHARDS, table, int(p("curate.forget_max")), int(p("curate.seed")), solo, bool(p("curate.joined")))
    curated_s = time.perf_counter() - start
    t0 = time.perf_counter()
    moments = compute_table_moments(adapter, layers, pairs, batch_size)
    moments_s = time.perf_counter() - t0
    with atomic_outputs(OUT, METRICS) as (out, metrics):
        save_table_moments(out, moments, MODEL, adapter.family, batch_size)
        write_metrics(metrics, {"concepts": len(pairs), "pairs": moments.n_every, "moment_tensors": len(moments.every),
                                "curate_s": round(curated_s, 2), "moments_s": round(moments_s, 2), "time_s": round(time.perf_counter() - start, 2),
                                "peak_memory_mb": peak_memory_mb()}, "concept_moments")
    log.info("moments of %d tensors over %d pairs of %d concepts (%.1f s; curation, one scan of the shards, %.1f s)", len(moments.every), moments.n_every, len(pairs),
             moments_s, curated_s)


if __name__ == "__main__":
    run_stage("concept_moments", main)
