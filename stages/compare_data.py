"""Stage `compare_data`: the forget and retain sets of every concept in `compare.concepts`
(the same curation as stage `curate`), under data/compare/<concept>/{forget,retain}."""

from __future__ import annotations

import logging
import time

from unlearn.cli import peak_memory_mb, run_stage
from unlearn.data.curate import curate, resolve_concepts, table_concepts
from unlearn.io import atomic_outputs, write_json
from unlearn.params import stage_params

SHARDS, OUT = "data/laion", "data/compare"
log = logging.getLogger("compare_data")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("compare_data")
    concepts = resolve_concepts(p("compare.concepts"), p("concepts"))
    solo = table_concepts(p("concepts")) if p("curate.solo") else ()
    record = {}
    with atomic_outputs(OUT) as (out,):
        for c in concepts:
            forget_dir, retain_dir = out / c.slug / "forget", out / c.slug / "retain"
            forget_dir.mkdir(parents=True), retain_dir.mkdir(parents=True)
            f, r = curate(SHARDS, c, int(p("curate.forget_max")), int(p("curate.retain_size")), int(p("curate.seed")), forget_dir, retain_dir,
                      solo)
            record[c.name] = {"dir": c.slug, "kind": c.kind, "forget": f["count"], "matched": f["matched"], "retain": r["count"]}
            log.info("%s: %d forget pairs, %d retain pairs", c.name, f["count"], r["count"])
        write_json(out / "concepts.json", {"concepts": record, "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb()})


if __name__ == "__main__":
    run_stage("compare_data", main)
