"""Stage `gradients`: one pass at the base weights, g_f = +grad L_f on the forget set and
g_r = grad L_r on the retain set, stored as safetensors with a sidecar (METHODS.md 1.2)."""

from __future__ import annotations

import logging
import time

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import read_manifest
from unlearn.data.pairs import pair_batches
from unlearn.io import atomic_outputs, sha256_file, write_json
from unlearn.methods.slug import GradientRecord, mean_gradient, save_gradients
from unlearn.models import openclip as oc
from unlearn.params import stage_params

MODEL, FORGET, RETAIN, OUT = "models/base", "data/forget", "data/retain", "models/grads"
log = logging.getLogger("gradients")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("gradients")
    seed, batch_size = int(p("gradients.seed")), int(p("gradients.batch_size"))
    torch.manual_seed(seed)
    adapter = oc.load(MODEL, device=torch_device(p("model.device")))
    adapter.model.eval()  # no dropout: the gradient is that of the deterministic model
    read_manifest(FORGET), read_manifest(RETAIN)  # a changed or truncated set fails here
    g_f, n_f, l_f = mean_gradient(adapter, adapter.forget_loss, pair_batches(FORGET, adapter.preprocess, adapter.tokenizer, batch_size), "forget gradient")
    g_r, n_r, l_r = mean_gradient(adapter, adapter.retain_loss, pair_batches(RETAIN, adapter.preprocess, adapter.tokenizer, batch_size), "retain gradient")
    record = GradientRecord(
        model_sha256=sha256_file(f"{MODEL}/{oc.WEIGHTS_FILE}"),
        forget_manifest_sha256=sha256_file(f"{FORGET}/manifest.json"), retain_manifest_sha256=sha256_file(f"{RETAIN}/manifest.json"),
        n_forget=n_f, n_retain=n_r, batch_size=batch_size, seed=seed, forget_loss=round(l_f, 6), retain_loss=round(l_r, 6),
    )
    with atomic_outputs(OUT) as (out,):
        save_gradients(out, g_f, g_r, record)
        write_json(out / "record.json", {"time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(), "params": p.declared()})
    log.info("forget loss %.4f over %d pairs, retain loss %.4f over %d pairs", l_f, n_f, l_r, n_r)


if __name__ == "__main__":
    run_stage("gradients", main)
