"""Stage `retain_stats`: SLUG's retain statistics, once per (model, retain set): the retain
gradient g_r and the retain input moments of every candidate tensor, in models/retain (checked by
hash when read).  Its time and memory go to metrics/retain_stats.json.  With `gradients.nproc` > 1
the pass runs data-parallel under torchrun (README "Past one machine").

The same script serves another model's statistics as another stage (`vlm_retain_stats`: the
transformers CLIP the VLM's vision tower comes from): `--stage NAME --model DIR --out DIR
--metrics FILE`."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time

from unlearn import distributed
from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import read_manifest
from unlearn.data.pairs import pair_batches
from unlearn.io import atomic_outputs
from unlearn.methods.retain_stats import compute_retain_stats, save_retain_stats
from unlearn.models.adapter import load
from unlearn.params import stage_params
from unlearn.runs import write_metrics

MODEL, RETAIN, OUT, METRICS = "models/base", "data/retain", "models/retain", "metrics/retain_stats.json"
log = logging.getLogger("retain_stats")


def main() -> None:
    start = time.perf_counter()
    ap = argparse.ArgumentParser(prog="python -m stages.retain_stats")
    ap.add_argument("--stage", default="retain_stats")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--metrics", default=METRICS)
    args = ap.parse_args()
    model_dir = args.model
    p = stage_params(args.stage)
    batch_size, nproc = int(p("gradients.batch_size")), int(p("gradients.nproc"))
    manifest = read_manifest(RETAIN)  # a changed or truncated set fails here
    distributed.check_nproc(nproc, math.ceil(manifest["count"] / batch_size), "the retain set")
    if nproc > 1 and not distributed.under_torchrun():
        sys.exit(distributed.relaunch("stages.retain_stats", nproc))
    device = distributed.init(torch_device(p("model.device")))
    adapter = load(model_dir, device=device)
    stats = compute_retain_stats(adapter, lambda: pair_batches(RETAIN, adapter.preprocess, adapter.tokenize, batch_size), progress=True)
    if distributed.rank() == 0:
        with atomic_outputs(args.out, args.metrics) as (out, metrics):
            sidecar = save_retain_stats(out, stats, model_dir, f"{RETAIN}/manifest.json", batch_size, adapter.family)
            write_metrics(metrics, {"n_retain": stats.n_retain, "moment_tensors": len(stats.moments), "processes": distributed.world_size(),
                                 "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(),
                                 "retain_loss": sidecar["retain_loss"]}, args.stage)
        log.info("retain loss %.4f over %d pairs; moments of %d tensors", stats.loss, stats.n_retain, len(stats.moments))
    distributed.finish()


if __name__ == "__main__":
    run_stage("vlm_retain_stats" if "vlm_retain_stats" in sys.argv else "retain_stats", main)
