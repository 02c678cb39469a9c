"""The judges: classifiers that say what a pipeline drew, one per axis (object, style), trained
on real world images only (never on generated ones).  Saved as safetensors beside a JSON config
(classes, channels, image size, held-out accuracy) and loaded by path; every later stage of the
diffusion track, the UnlearnCanvas benchmark included, asks them.

On the default a judge is a small CNN (three conv blocks, global pooling, a linear head).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from tqdm import tqdm

from unlearn.errors import UnlearnError

CONFIG = "judges.json"


@dataclass(frozen=True)
class JudgeConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    steps: int = 1500
    batch_size: int = 128
    lr: float = 0.002
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise UnlearnError(f"sd.judges.channels is {self.channels}; give positive channel counts, e.g. [32, 64, 128]")
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise UnlearnError(f"sd.judges.{key} is {getattr(self, key)}; it must be at least 1")


def _block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


class Judge(nn.Module):
    """Images in [-1, 1] (N, 3, S, S) -> logits over `classes`."""

    def __init__(self, classes: list[str], channels: list[int]):
        super().__init__()
        self.classes, self.channels = list(classes), list(channels)
        layers: list[nn.Module] = []
        prev = 3
        for k, c in enumerate(channels):
            layers += [_block(prev, c)] + ([nn.MaxPool2d(2)] if k < len(channels) - 1 else [])
            prev = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(prev, len(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        dev = next(self.parameters()).device
        return torch.cat([self(x[s : s + batch_size].to(dev)).argmax(-1).cpu() for s in range(0, x.shape[0], batch_size)])

    @torch.no_grad()
    def features_of(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The pooled features (N, channels[-1]): the feature space of the Fréchet distance."""
        dev = next(self.parameters()).device
        return torch.cat([self.features(x[s : s + batch_size].to(dev)).cpu() for s in range(0, x.shape[0], batch_size)])


def train_judge(x: torch.Tensor, y: torch.Tensor, classes: list[str], cfg: JudgeConfig, device: str = "cpu",
                progress: str | None = None) -> tuple[Judge, list[float]]:
    """Cross-entropy with flips and one-pixel shifts, AdamW, cosine schedule; `x` in [-1, 1]."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    judge = Judge(classes, cfg.channels).to(device).train()
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    losses = []
    for _ in tqdm(range(cfg.steps), desc=progress, disable=progress is None, mininterval=2.0):
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen)
        xb, yb = x[idx], y[idx]
        flip = torch.rand(xb.shape[0], generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
        loss = nn.functional.cross_entropy(judge(xb.to(device)), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return judge.eval(), losses


def save_judges(directory: Path, judges: dict[str, Judge], image_size: int, record: dict) -> None:
    config = {"image_size": image_size, "axes": {}, **record}
    for axis, judge in judges.items():
        safetensors.torch.save_file({k: v.contiguous().cpu() for k, v in judge.state_dict().items()}, directory / f"{axis}.safetensors")
        config["axes"][axis] = {"classes": judge.classes, "channels": judge.channels, "weights": f"{axis}.safetensors"}
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


@dataclass(frozen=True)
class Judges:
    by_axis: dict[str, Judge]
    image_size: int
    config: dict

    def __getitem__(self, axis: str) -> Judge:
        return self.by_axis[axis]


def load_judges(directory: str | Path, device: str = "cpu") -> Judges:
    directory = Path(directory)
    path = directory / CONFIG
    if not path.is_file():
        raise UnlearnError(f"no judges at {directory} ({CONFIG} missing); run `dvc repro sd_judges`")
    config = json.loads(path.read_text())
    out = {}
    for axis, spec in config["axes"].items():
        judge = Judge(spec["classes"], spec["channels"])
        try:
            state = safetensors.torch.load_file(directory / spec["weights"])
            judge.load_state_dict(state)
        except (OSError, RuntimeError, safetensors.SafetensorError) as e:
            raise UnlearnError(f"judge {directory / spec['weights']} does not load ({type(e).__name__}); re-run `dvc repro sd_judges`") from None
        out[axis] = judge.to(device).eval()
    return Judges(out, int(config["image_size"]), config)


def accuracy(judge: Judge, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Overall and per-class accuracy of `judge` on images `x` with labels `y`."""
    pred = judge.predict(x)
    per = {c: round(float((pred[y == k] == k).float().mean()), 4) for k, c in enumerate(judge.classes) if (y == k).any()}
    return {"accuracy": round(float((pred == y).float().mean()), 4), "images": int(y.numel()), "per_class": per}


def config_record(cfg: JudgeConfig) -> dict:
    return asdict(cfg)
