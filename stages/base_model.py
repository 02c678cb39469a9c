"""Stage `base_model`: the base model of `model.family`, saved with its family record in
models/base, and its zero-shot accuracy on the identity and object evaluation sets.

- `model.pretrained: synthetic`: train the tiny CLIP (`model.arch`, an open_clip architecture) on
  the shards; for `model.family: hf_clip` the trained model is then exported to a transformers
  CLIPModel (the same weights; `unlearn.models.export`), so both families start from one model.
- otherwise, the family's own weights: an open_clip tag or `.safetensors` checkpoint (open_clip),
  a transformers CLIP folder or hub id (hf_clip).
"""

from __future__ import annotations

import logging
import time

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.eval.base import base_metrics
from unlearn.io import atomic_outputs, write_json
from unlearn.models.adapter import adapter_class, check_family
from unlearn.models.train import TrainConfig, load_pairs, train_contrastive
from unlearn.params import as_config, stage_params
from unlearn.runs import write_run

SHARDS, EVAL = "data/laion", "data/eval"
MODEL, METRICS = "models/base", "metrics/base.json"
log = logging.getLogger("base_model")


def main() -> None:
    p = stage_params("base_model")
    family = check_family(str(p("model.family")))
    torch.manual_seed(p("model.train.seed"))
    device = torch_device(p("model.device"))
    arch, pretrained, quick_gelu = p("model.arch"), str(p("model.pretrained")), bool(p("model.quick_gelu"))
    record: dict = {"family": family, "arch": arch, "pretrained": pretrained, "quick_gelu": quick_gelu, "device": device}
    start = time.perf_counter()
    if pretrained == "synthetic":
        from unlearn.models import openclip as oc  # the tiny architectures are open_clip configs

        adapter = oc.create(arch, quick_gelu=quick_gelu, seed=p("model.train.seed"))
        images, tokens = load_pairs(adapter, SHARDS)
        adapter.model.to(device)
        cfg = as_config(TrainConfig, p("model.train"), "model.train")
        record["loss_per_epoch"] = train_contrastive(adapter, images.to(device), tokens.to(device), cfg)
        record["train_samples"] = int(images.shape[0])
        if family != adapter.family:
            from unlearn.models.export import to_hf_clip

            adapter = to_hf_clip(adapter)
            record["exported_from"] = "open_clip"
    else:
        adapter = adapter_class(family).from_pretrained(pretrained, cache_dir=p("model.cache_dir"), arch=arch, quick_gelu=quick_gelu)
    adapter.model.to(device)
    build_time_s = round(time.perf_counter() - start, 1)
    metrics = base_metrics(adapter, EVAL, batch_size=p("model.eval_batch_size"))
    with atomic_outputs(MODEL, METRICS) as (model_dir, metrics_file):
        adapter.model.cpu()
        adapter.save(model_dir)
        write_json(model_dir / "record.json", record)
        write_json(metrics_file, metrics)
    write_run("base_model", build_time_s=build_time_s, time_s=round(time.perf_counter() - start, 1), peak_memory_mb=peak_memory_mb())
    log.info("%s: identity top-1 %.3f, object top-1 %.3f", family, metrics["identity_top1"], metrics["object_top1"])


if __name__ == "__main__":
    run_stage("base_model", main)
