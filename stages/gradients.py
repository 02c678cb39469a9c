"""Stage `gradients`: one pass at the base weights, g_f = +grad L_f on the forget set and
g_r = grad L_r on the retain set, stored as safetensors with a sidecar (docs/methods.md, "SLUG")."""

from __future__ import annotations

import logging
import time

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import read_manifest
from unlearn.data.pairs import pair_batches
from unlearn.io import atomic_outputs, write_json
from unlearn.methods.slug import compute_gradients, gradient_record, save_gradients
from unlearn.models.adapter import load
from unlearn.params import stage_params

MODEL, FORGET, RETAIN, OUT = "models/base", "data/forget", "data/retain", "models/grads"
log = logging.getLogger("gradients")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("gradients")
    seed, batch_size = int(p("gradients.seed")), int(p("gradients.batch_size"))
    torch.manual_seed(seed)
    adapter = load(MODEL, device=torch_device(p("model.device")))
    read_manifest(FORGET), read_manifest(RETAIN)  # a changed or truncated set fails here
    grads = compute_gradients(adapter, pair_batches(FORGET, adapter.preprocess, adapter.tokenize, batch_size),
                              pair_batches(RETAIN, adapter.preprocess, adapter.tokenize, batch_size), progress=True)
    record = gradient_record(MODEL, f"{FORGET}/manifest.json", f"{RETAIN}/manifest.json", grads, batch_size, seed)
    with atomic_outputs(OUT) as (out,):
        save_gradients(out, grads.forget, grads.retain, record)
        write_json(out / "record.json", {"time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(), "params": p.declared()})
    log.info("forget loss %.4f over %d pairs, retain loss %.4f over %d pairs", grads.forget_loss, grads.n_forget, grads.retain_loss, grads.n_retain)


if __name__ == "__main__":
    run_stage("gradients", main)
