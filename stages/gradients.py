"""Stage `gradients`: the per-concept part of SLUG's one gradient pass, g_f = +grad L_f on the
forget set at the base weights, stored as safetensors with a sidecar (docs/methods.md, "SLUG").
The retain gradient is shared by every concept (stage `retain_stats`).  With `gradients.nproc`
> 1 the pass runs data-parallel under torchrun."""

from __future__ import annotations

import logging
import math
import sys
import time

import torch

from unlearn import distributed
from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import read_manifest
from unlearn.data.pairs import pair_batches
from unlearn.io import atomic_outputs
from unlearn.methods.slug import forget_gradient, gradient_record, save_gradients
from unlearn.models.adapter import load
from unlearn.params import stage_params
from unlearn.runs import write_run

MODEL, FORGET, OUT = "models/base", "data/forget", "models/grads"
log = logging.getLogger("gradients")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("gradients")
    seed, batch_size, nproc = int(p("gradients.seed")), int(p("gradients.batch_size")), int(p("gradients.nproc"))
    manifest = read_manifest(FORGET)  # a changed or truncated set fails here
    distributed.check_nproc(nproc, math.ceil(manifest["count"] / batch_size), "the forget set")
    if nproc > 1 and not distributed.under_torchrun():
        sys.exit(distributed.relaunch("stages.gradients", nproc))
    torch.manual_seed(seed)
    adapter = load(MODEL, device=distributed.init(torch_device(p("model.device"))))
    g_f, n, loss = forget_gradient(adapter, pair_batches(FORGET, adapter.preprocess, adapter.tokenize, batch_size), progress=True)
    if distributed.rank() == 0:
        record = gradient_record(MODEL, f"{FORGET}/manifest.json", n, loss, batch_size, seed)
        with atomic_outputs(OUT) as (out,):
            save_gradients(out, g_f, record)
        write_run("gradients", time_s=round(time.perf_counter() - start, 2), peak_memory_mb=peak_memory_mb(),
                  processes=distributed.world_size())
        log.info("forget loss %.4f over %d pairs", loss, n)
    distributed.finish()


if __name__ == "__main__":
    run_stage("gradients", main)
