"""Stage `compare_data`: the forget set of every concept in `compare.concepts` (the same curation
as stage `curate`), under data/compare/<concept>/forget.  The retain set is the shared one
(stage `retain_set`)."""

from __future__ import annotations

import logging

from unlearn.cli import run_stage
from unlearn.data.curate import curate_forget, resolve_concepts, table_concepts
from unlearn.io import atomic_outputs, write_json
from unlearn.params import stage_params

SHARDS, OUT = "data/laion", "data/compare"
log = logging.getLogger("compare_data")


def main() -> None:
    p = stage_params("compare_data")
    concepts = resolve_concepts(p("compare.concepts"), p("concepts"))
    solo = table_concepts(p("concepts")) if p("curate.solo") else ()
    record = {}
    with atomic_outputs(OUT) as (out,):
        for c in concepts:
            forget_dir = out / c.slug / "forget"
            forget_dir.mkdir(parents=True)
            f = curate_forget(SHARDS, c, int(p("curate.forget_max")), int(p("curate.seed")), forget_dir, solo, joined=bool(p("curate.joined")))
            record[c.name] = {"dir": c.slug, "kind": c.kind, "forget": f["count"], "matched": f["matched"]}
            log.info("%s: %d forget pairs", c.name, f["count"])
        write_json(out / "concepts.json", {"concepts": record})


if __name__ == "__main__":
    run_stage("compare_data", main)
