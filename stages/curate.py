"""Stage `curate`: the forget set of `concept` (the captions that mention it).  The retain set is
shared by every concept (stage `retain_set`)."""

from __future__ import annotations

import logging
import time

from unlearn.cli import peak_memory_mb, run_stage
from unlearn.data.curate import curate_forget, resolve_concept, table_concepts
from unlearn.io import atomic_outputs, write_json
from unlearn.params import stage_params
from unlearn.runs import write_run

SHARDS = "data/laion"
FORGET, RECORD = "data/forget", "data/curate.json"
log = logging.getLogger("curate")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("curate")
    concept = resolve_concept(str(p("concept")), p("concepts"))
    solo = table_concepts(p("concepts")) if p("curate.solo") else ()
    with atomic_outputs(FORGET, RECORD) as (forget_dir, record):
        f = curate_forget(SHARDS, concept, int(p("curate.forget_max")), int(p("curate.seed")), forget_dir, solo, joined=bool(p("curate.joined")))
        write_json(record, {
            "concept": concept.name, "kind": concept.kind, "forget": f["count"], "matched": f["matched"], "match": f["match"],
            "params": p.declared(),
        })
    write_run("curate", time_s=round(time.perf_counter() - start, 2), peak_memory_mb=peak_memory_mb())
    log.info("%s (%s): %d forget pairs", concept.name, concept.kind, f["count"])


if __name__ == "__main__":
    run_stage("curate", main)
