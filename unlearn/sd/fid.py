"""A Fréchet distance between real and drawn images in the judges' feature space, computed with
torchmetrics' FrechetInceptionDistance given the judges as its feature extractor (Inception
weights cannot be downloaded here).  It measures how far what a pipeline draws is from real
images as the judges see them; it is NOT comparable with published FIDs (another network,
another feature space, 32 px images)."""

from __future__ import annotations

import torch
from torch import nn

from unlearn.sd.judges import Judges


class JudgeFeatures(nn.Module):
    """The pooled features of every judge, side by side; takes floats in [0, 1] (torchmetrics'
    `normalize=True` convention), the judges take [-1, 1]."""

    def __init__(self, judges: Judges):
        super().__init__()
        self.judges = nn.ModuleList(judges.by_axis[a] for a in sorted(judges.by_axis))
        self.num_features = sum(j.num_features for j in self.judges)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2 - 1
        return torch.cat([j.embed(x) for j in self.judges], dim=1)


def frechet_distance(judges: Judges, real: torch.Tensor, drawn: torch.Tensor, batch_size: int = 256) -> float:
    """Between `real` and `drawn` images in [-1, 1] (N, 3, S, S)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=JudgeFeatures(judges), normalize=True)
    for images, is_real in ((real, True), (drawn, False)):
        for s in range(0, images.shape[0], batch_size):
            fid.update(((images[s : s + batch_size].float() + 1) / 2).clamp(0, 1), real=is_real)
    return float(fid.compute())
