"""SLUG's retain statistics, computed once per (model, retain set) and shared by every concept,
the comparison, and the diffusion and VLM tracks (stage `retain_stats`):

  g_r      grad L_r, the retain gradient of every parameter (the ranking's alignment);
  C_r      E[x x^T] of the input of every candidate tensor on the retain pairs (E[x_hat^2] for a
           LayerNorm weight), the metric of the retain-preconditioned step.

A per-concept run then pays only for its forget gradient.  The files carry the hash of the model
and of the retain set's manifest they were computed from, and each file's own hash, so a file of
another model, another retain set, or a corrupted one is refused with a one-line error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from unlearn.errors import UnlearnError
from unlearn.io import read_hashed_tensors, sha256_file
from unlearn.models.adapter import Adapter, check_made_for, fingerprint
from unlearn.models.gradients import mean_gradient
from unlearn.models.inputs import input_moments

GRADIENT, MOMENTS, SIDECAR = "gradient.safetensors", "moments.safetensors", "sidecar.json"
FIX = "re-run `dvc repro retain_stats`"


@dataclass(frozen=True)
class RetainStats:
    gradient: dict[str, torch.Tensor]   # g_r per parameter (float32, CPU)
    moments: dict[str, torch.Tensor]    # C_r per candidate tensor (float64, CPU)
    n_retain: int
    loss: float


def compute_retain_stats(adapter: Adapter, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], progress: bool = False,
                         with_moments: bool = True) -> RetainStats:
    """g_r and (with `with_moments`) C_r of every candidate tensor, LayerNorms included, at the
    current weights (eval mode)."""
    adapter.model.eval()
    g_r, n, loss = mean_gradient(adapter, adapter.retain_loss, batches(), "retain gradient" if progress else None)
    moments: dict[str, torch.Tensor] = {}
    if with_moments:
        moments, _ = input_moments(adapter, adapter.candidate_layers(True), batches())
        moments = {k: v.cpu().contiguous() for k, v in moments.items()}
    return RetainStats(g_r, moments, n, loss)


def save_retain_stats(directory: Path, stats: RetainStats, model_dir: str | Path, retain_manifest: str | Path, batch_size: int,
                      family: str) -> dict:
    safetensors.torch.save_file(stats.gradient, directory / GRADIENT)
    safetensors.torch.save_file(stats.moments, directory / MOMENTS)
    sidecar = {
        "family": family, "model_sha256": fingerprint(model_dir), "retain_manifest_sha256": sha256_file(retain_manifest),
        "n_retain": stats.n_retain, "batch_size": batch_size, "retain_loss": round(stats.loss, 6), "moment_tensors": len(stats.moments),
        "retain_loss_def": "symmetric CLIP contrastive loss (InfoNCE over each batch, scale exp(logit_scale)), batch-size-weighted mean",
        "files": {f: sha256_file(directory / f) for f in (GRADIENT, MOMENTS)},
    }
    (directory / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return sidecar


def load_retain_stats(directory: str | Path, adapter: Adapter, model_dir: str | Path, retain_manifest: str | Path | None = None) -> tuple[RetainStats, dict]:
    """The statistics in `directory`, checked: every file present and unchanged (its hash), made
    for the model in `model_dir` and (given) the retain set whose manifest is `retain_manifest`,
    tensors matching the model's and finite.  Any mismatch is a one-line error."""
    directory = Path(directory)
    sidecar, tensors = read_hashed_tensors(directory, SIDECAR, (GRADIENT, MOMENTS), lambda s: s["files"], "retain statistics", FIX,
                                           f"{FIX} (check the retain set for corrupt images)")
    check_made_for(f"retain statistics in {directory}", sidecar, model_dir, FIX)
    if retain_manifest is not None and sha256_file(retain_manifest) != sidecar.get("retain_manifest_sha256"):
        raise UnlearnError(f"retain statistics in {directory} were computed from another retain set than {retain_manifest}; {FIX}")
    params = {n: tuple(p.shape) for n, p in adapter.model.named_parameters()}
    gradient, moments = tensors[GRADIENT], tensors[MOMENTS]
    if set(gradient) != set(params) or any(tuple(g.shape) != params[n] for n, g in gradient.items()):
        raise UnlearnError(f"{directory / GRADIENT} does not match the model's tensors; {FIX}")
    unknown = sorted(set(moments) - set(params))
    if unknown:
        raise UnlearnError(f"{directory / MOMENTS} holds moments of tensors the model does not have ({unknown[:3]}); {FIX}")
    return RetainStats(gradient, moments, int(sidecar["n_retain"]), float(sidecar["retain_loss"])), sidecar
