"""The judges: classifiers that say what a pipeline drew, one per axis (object, style), trained
on real world images only (never on generated ones).  Saved as safetensors beside a JSON config
(classes, channels, image size, held-out accuracy) and loaded by path; every later stage of the
diffusion track, the UnlearnCanvas benchmark included, asks them.

On the default a judge is a small CNN (three conv blocks, global pooling, a linear head) trained
here.  On real data the judges are classifiers trained elsewhere, given by path and converted
once (`import_classifier`): UnlearnCanvas's style and object classifiers (a timm ViT-L/16 whose
head was replaced, saved with `torch.save({"model_state_dict": ...})`), read with
`weights_only=True` and stored here as safetensors beside the same JSON config.  Either kind
takes images in [-1, 1] at the pipeline's size (a timm judge resizes them to its input size:
UnlearnCanvas's `Normalize([0.5], [0.5])` is that range) and answers with indices into its
`classes`, which are the axes' order.
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

from unlearn.data.canvas import SEED_IMAGES, display_name
from unlearn.errors import UnlearnError
from unlearn.sd.data import Axes

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


class Classifier(nn.Module):
    """What every judge offers: images in [-1, 1] (N, 3, S, S) -> logits over `classes`
    (`forward`), the pooled features before the head (`embed`, `num_features` wide: the feature
    space of the Fréchet distance), and both batched."""

    classes: list[str]
    num_features: int
    batch_size = 512

    @property
    def axis_classes(self) -> list[str]:
        """The classes of the axis it judges (a classifier trained elsewhere may know more, after them)."""
        return self.classes

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        dev = next(self.parameters()).device
        return torch.cat([self(x[s : s + self.batch_size].to(dev)).argmax(-1).cpu() for s in range(0, x.shape[0], self.batch_size)])

    @torch.no_grad()
    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        dev = next(self.parameters()).device
        return torch.cat([self.embed(x[s : s + self.batch_size].to(dev)).cpu() for s in range(0, x.shape[0], self.batch_size)])

    def spec(self) -> dict:
        """What `load_judges` needs to rebuild it (besides the weights)."""
        raise NotImplementedError


class Judge(Classifier):
    """The judge trained here: a small CNN."""

    def __init__(self, classes: list[str], channels: list[int]):
        super().__init__()
        self.classes, self.channels, self.num_features = list(classes), list(channels), channels[-1]
        layers: list[nn.Module] = []
        prev = 3
        for k, c in enumerate(channels):
            layers += [_block(prev, c)] + ([nn.MaxPool2d(2)] if k < len(channels) - 1 else [])
            prev = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(prev, len(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def spec(self) -> dict:
        return {"classes": self.classes, "channels": self.channels}


class TimmJudge(Classifier):
    """A timm image classifier trained elsewhere (UnlearnCanvas's: `vit_large_patch16_224`, input
    224 px, images normalised to [-1, 1]); the pipeline's drawings are resized to its input."""

    batch_size = 64

    def __init__(self, classes: list[str], arch: str, input_size: int, on_axis: int | None = None):
        super().__init__()
        import timm

        self.classes, self.arch, self.input_size = list(classes), arch, int(input_size)
        self.on_axis = len(self.classes) if on_axis is None else int(on_axis)
        try:
            self.model = timm.create_model(arch, pretrained=False, num_classes=len(classes))
        except RuntimeError as e:  # timm's "Unknown model (...)"
            raise UnlearnError(f"sd.judges.timm.arch {arch!r} is not a timm model ({e}); UnlearnCanvas's classifiers are vit_large_patch16_224") from None
        self.num_features = int(self.model.num_features)

    def _resized(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.input_size and x.shape[-2] == self.input_size:
            return x
        return nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._resized(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(self._resized(x)), pre_logits=True)

    def spec(self) -> dict:
        return {"kind": "timm", "classes": self.classes, "on_axis": self.on_axis, "arch": self.arch, "input_size": self.input_size}

    @property
    def axis_classes(self) -> list[str]:
        return self.classes[: self.on_axis]


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


def save_judges(directory: Path, judges: dict[str, Classifier], image_size: int, record: dict) -> None:
    config = {"image_size": image_size, "axes": {}, **record}
    for axis, judge in judges.items():
        safetensors.torch.save_file({k: v.contiguous().cpu() for k, v in judge.state_dict().items()}, directory / f"{axis}.safetensors")
        config["axes"][axis] = judge.spec() | {"weights": f"{axis}.safetensors"}
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# UnlearnCanvas's classifiers answer with indices into these lists (its evaluation code's
# STYLES_AVAILABLE and OBJECTS_AVAILABLE: the dataset's folder names, sorted); Seed_Images are
# the un-stylised photos, the axis's "photo".
UNLEARNCANVAS_CLASSES = {
    "style": ["Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm", "Color_Fantasy",
              "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn", "Expressionism", "Fauvism", "French",
              "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism", "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube",
              "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic", "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso",
              "Pop_Art", "Red_Blue_Ink", "Rust", "Seed_Images", "Sketch", "Sponge_Dabbed", "Structuralism", "Superstring",
              "Surrealism", "Ukiyoe", "Van_Gogh", "Vibrant_Flow", "Warm_Love", "Warm_Smear", "Watercolor", "Winter"],
    "object": ["Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs", "Horses",
               "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls"],
}


@dataclass(frozen=True)
class TimmConfig:
    """The architecture of classifiers given by path (`sd.judges.timm`)."""

    arch: str = "vit_large_patch16_224"
    input_size: int = 224


def classifier_classes(folder: Path, axis: str) -> list[str]:
    """The order a foreign classifier answers in: `classes.json` in its folder ({"object": [...],
    "style": [...]}) where there is one, else UnlearnCanvas's."""
    path = folder / "classes.json"
    if not path.is_file():
        return list(UNLEARNCANVAS_CLASSES[axis])
    try:
        classes = json.loads(path.read_text())[axis]
    except (ValueError, KeyError, TypeError):
        raise UnlearnError(f"{path} does not list the {axis} classes; write {{\"object\": [...], \"style\": [...]}} in the classifier's output order") from None
    return [str(c) for c in classes]


def import_classifier(path: Path, classes: list[str], axis_names: list[str], arch: str, input_size: int, photo: str) -> TimmJudge:
    """A timm classifier saved elsewhere (`torch.save` of its state dict, or of {"model_state_dict":
    ...} as UnlearnCanvas ships it), read with `weights_only=True`; `classes` is the order it
    answers in.  Its head's rows are reordered to `axis_names` (the axis of the canvas; "Seed_Images"
    is `photo`), so that it answers like the judges trained here.  Every axis class must be one of
    its classes; classes it knows beyond the axis keep their rows after the axis's (a drawing it
    puts there counts as wrong)."""
    if not path.is_file():
        raise UnlearnError(f"no classifier at {path}; put UnlearnCanvas's {path.name} there (sd.judges.pretrained is its folder)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle.UnpicklingError, RuntimeError, EOFError ...: all mean "not readable safely")
        raise UnlearnError(f"{path} is not a weights-only torch checkpoint ({type(e).__name__}); re-save its state dict with "
                           "torch.save(model.state_dict(), path)") from None
    state = blob.get("model_state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnlearnError(f"{path} holds no state dict (expected tensors, or {{'model_state_dict': tensors}})")
    named = [photo if c == SEED_IMAGES else display_name(c) for c in classes]  # "Van_Gogh" is the canvas's "Van Gogh"
    missing = [c for c in axis_names if c not in named]
    if missing:
        raise UnlearnError(f"the classifier {path} does not know {', '.join(missing)} of the canvas (it knows {len(named)} classes: "
                           f"{', '.join(named[:6])}, ...); give judges of this canvas's classes, or list its classes in classes.json")
    order = [named.index(c) for c in axis_names] + [k for k, c in enumerate(named) if c not in axis_names]
    judge = TimmJudge([named[k] for k in order], arch, input_size, on_axis=len(axis_names))
    head = judge.model.pretrained_cfg.get("classifier", "head")  # the head's name in the state dict ("head" for a ViT)
    state = dict(state)
    for k in (f"{head}.weight", f"{head}.bias"):
        if k in state:
            if state[k].shape[0] != len(classes):
                raise UnlearnError(f"the classifier {path} answers over {state[k].shape[0]} classes but its class list has {len(classes)}; "
                                   "give classes.json (its classes in its output order) in its folder")
            state[k] = state[k][order]
    try:
        judge.model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)[:200]]
        raise UnlearnError(f"the classifier {path} is not a {arch} ({first[0].strip()}); set sd.judges.timm.arch to its architecture") from None
    return judge.eval()


@dataclass(frozen=True)
class Judges:
    by_axis: dict[str, Classifier]
    image_size: int
    config: dict

    def __getitem__(self, axis: str) -> Classifier:
        return self.by_axis[axis]

    @property
    def axes(self) -> Axes:
        """What they judge: every later stage draws and scores on these axes."""
        return Axes(tuple(self["object"].axis_classes), tuple(self["style"].axis_classes))


def load_judges(directory: str | Path, device: str = "cpu") -> Judges:
    directory = Path(directory)
    path = directory / CONFIG
    if not path.is_file():
        raise UnlearnError(f"no judges at {directory} ({CONFIG} missing); run `dvc repro sd_judges`")
    config = json.loads(path.read_text())
    out = {}
    for axis, spec in config["axes"].items():
        judge = (TimmJudge(spec["classes"], spec["arch"], spec["input_size"], spec.get("on_axis")) if spec.get("kind") == "timm"
                 else Judge(spec["classes"], spec["channels"]))
        try:
            state = safetensors.torch.load_file(directory / spec["weights"])
            judge.load_state_dict(state)
        except (OSError, RuntimeError, safetensors.SafetensorError) as e:
            raise UnlearnError(f"judge {directory / spec['weights']} does not load ({type(e).__name__}); re-run `dvc repro sd_judges`") from None
        out[axis] = judge.to(device).eval()
    return Judges(out, int(config["image_size"]), config)


def accuracy(judge: Classifier, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Overall and per-class accuracy of `judge` on images `x` with labels `y`."""
    pred = judge.predict(x)
    per = {c: round(float((pred[y == k] == k).float().mean()), 4) for k, c in enumerate(judge.classes) if (y == k).any()}
    return {"accuracy": round(float((pred == y).float().mean()), 4), "images": int(y.numel()), "per_class": per}


def config_record(cfg: JudgeConfig) -> dict:
    return asdict(cfg)
