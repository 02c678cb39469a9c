"""Stage `retain_set`: the retain set every concept, method and track shares: a seeded sample of
`curate.retain_size` pairs whose captions mention no concept of the table."""

from __future__ import annotations

import logging

from unlearn.cli import run_stage
from unlearn.data.curate import curate_retain, table_concepts
from unlearn.io import atomic_outputs
from unlearn.params import stage_params

SHARDS, RETAIN = "data/laion", "data/retain"
log = logging.getLogger("retain_set")


def main() -> None:
    p = stage_params("retain_set")
    with atomic_outputs(RETAIN) as (retain_dir,):
        r = curate_retain(SHARDS, table_concepts(p("concepts")), int(p("curate.retain_size")), int(p("curate.seed")), retain_dir, joined=bool(p("curate.joined")))
    log.info("%d retain pairs (of %d that mention no concept of the table)", r["count"], r["candidates"])


if __name__ == "__main__":
    run_stage("retain_set", main)
