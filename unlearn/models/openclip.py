"""The open_clip model adapter: the one place that knows how an open_clip CLIP is built,
loaded, saved, and used (image and text encoders, tokenizer, preprocessing).

A saved model is a folder in open_clip's own hub layout, `open_clip_config.json` (model and
preprocess config) beside `open_clip_model.safetensors`, so `open_clip.create_model_and_transforms(
"local-dir:models/base")` loads it too.  Weights load from safetensors only.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from unlearn.errors import UnlearnError

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_ARCH = "unlearn-tiny-vit"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

open_clip.add_model_config(CONFIG_DIR)  # registers the tiny architectures shipped with the project
log = logging.getLogger(__name__)
_CLIP_LOSS = open_clip.ClipLoss()

# Tensors that are never SLUG candidates: embeddings, positional embeddings, the patch embedding,
# the temperature (METHODS.md 1.3).  Biases and other 1-d tensors are excluded by shape.
_NOT_CANDIDATE = re.compile(r"(^|\.)(token_embedding|positional_embedding|class_embedding|conv1|logit_scale)(\.|$)")
_VISUAL_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")
_VISUAL_TAIL = re.compile(r"^visual\.(ln_post|proj|attn_pool)")


@dataclass
class ClipAdapter:
    model: nn.Module
    tokenizer: Any
    preprocess: Any
    config: dict  # {"model_name", "model_cfg", "preprocess_cfg"} as in open_clip_config.json

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.device)

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device), normalize=normalize)

    def encode_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(self.tokenize(texts), normalize=normalize)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    # ---- what SLUG and the baselines need to know about an open_clip CLIP ----

    @staticmethod
    def tower(name: str) -> str:
        """`image` for the vision tower's tensors, `text` for everything else that encodes text."""
        return "image" if name.startswith("visual.") else "text"

    def candidate_layers(self, include_layernorm: bool = False) -> list[str]:
        """Parameter names SLUG may edit: weight matrices of both towers (LayerNorm weights on
        request); no biases, embeddings, positional embeddings, patch embedding or logit_scale."""
        out = []
        for name, p in self.model.named_parameters():
            if _NOT_CANDIDATE.search(name) or name.endswith("bias"):
                continue
            is_norm = p.ndim == 1 and (".ln_" in name or name.startswith(("ln_", "visual.ln_")))
            if p.ndim >= 2 or (include_layernorm and is_norm):
                out.append(name)
        return out

    def image_block_of(self, name: str) -> int | None:
        """The first vision block an edit of `name` changes (the block count for the pooling
        head), or None when the edit changes the text side only or everything in the image tower."""
        if (m := _VISUAL_BLOCK.match(name)) is not None:
            return int(m.group(1))
        if _VISUAL_TAIL.match(name):
            return len(self.model.visual.transformer.resblocks)
        return None

    def forget_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean of (1 - cos(v_i, t_i)) over the batch, each image with its own caption."""
        v = self.model.encode_image(images.to(self.device), normalize=True)
        t = self.model.encode_text(tokens.to(self.device), normalize=True)
        return (1.0 - (v * t).sum(dim=-1)).mean()

    def retain_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The symmetric CLIP contrastive loss over the batch at scale exp(logit_scale) (open_clip's)."""
        v = self.model.encode_image(images.to(self.device), normalize=True)
        t = self.model.encode_text(tokens.to(self.device), normalize=True)
        return _CLIP_LOSS(v, t, self.logit_scale)

    @torch.no_grad()
    def image_hidden(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The vision tower's hidden states entering `block` (batch first; the block count gives
        the transformer's output), to resume from with `encode_images_from`."""
        visual = self.model.visual
        captured: list[torch.Tensor] = []
        handle = visual.transformer.register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            with self._only_blocks(range(block)):
                visual(images.to(self.device))
        finally:
            handle.remove()
        return captured[0]  # Transformer.forward returns batch-first (N, L, D)

    @torch.no_grad()
    def encode_images_from(self, hidden: torch.Tensor, block: int, normalize: bool = True) -> torch.Tensor:
        """Image embeddings from hidden states entering `block`: runs blocks block.. and the
        pooling head through open_clip's own forward, skipping the patch embedding."""
        visual = self.model.visual
        with self._only_blocks(range(block, len(visual.transformer.resblocks))), _replace_attr(visual, "_embeds", lambda _x: hidden):
            out = visual(hidden)
        out = out[0] if isinstance(out, tuple) else out
        return nn.functional.normalize(out, dim=-1) if normalize else out

    @contextlib.contextmanager
    def _only_blocks(self, keep: range) -> Iterator[None]:
        transformer = self.model.visual.transformer
        full = transformer.resblocks
        transformer.resblocks = nn.ModuleList([full[i] for i in keep])
        try:
            yield
        finally:
            transformer.resblocks = full

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        safetensors.torch.save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _replace_attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    setattr(obj, name, value)
    try:
        yield
    finally:
        delattr(obj, name)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning when weights are loaded right after."""
    root, quiet = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _preprocess_cfg(model: nn.Module) -> dict:
    visual = model.visual
    size = visual.image_size
    return {
        "size": list(size) if isinstance(size, tuple) else size,
        "mean": list(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        "std": list(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def _arch_config(arch: str, quick_gelu: bool) -> dict:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        known = open_clip.list_models()
        close = difflib.get_close_matches(arch, known, n=3)
        raise UnlearnError(f"unknown open_clip architecture {arch!r}; closest known: {', '.join(close) or 'none'} (see open_clip.list_models())")
    cfg = json.loads(json.dumps(cfg))
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


def _wrap(model: nn.Module, model_name: str, model_cfg: dict) -> ClipAdapter:
    model.eval()
    pp_cfg = _preprocess_cfg(model)
    preprocess = image_transform_v2(PreprocessCfg(**pp_cfg), is_train=False)
    config = {"model_name": model_name, "model_cfg": model_cfg, "preprocess_cfg": pp_cfg}
    return ClipAdapter(model=model, tokenizer=open_clip.get_tokenizer(model_name), preprocess=preprocess, config=config)


def create(arch: str, quick_gelu: bool = False, seed: int = 0) -> ClipAdapter:
    """A randomly initialised model of a registered architecture (seeded)."""
    cfg = _arch_config(arch, quick_gelu)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, force_quick_gelu=quick_gelu)
    return _wrap(model, arch, cfg)


def from_pretrained(arch: str, pretrained: str, quick_gelu: bool, cache_dir: str | None = None) -> ClipAdapter:
    """open_clip weights: a pretrained tag of `arch` (downloaded by open_clip) or a local
    checkpoint file (.safetensors only)."""
    cfg = _arch_config(arch, quick_gelu)
    path = Path(pretrained)
    if path.suffix or "/" in pretrained:
        if not path.is_file():
            raise UnlearnError(f"checkpoint {path} not found: give an existing .safetensors file or an open_clip tag of {arch}")
        if path.suffix != ".safetensors":
            raise UnlearnError(f"checkpoint {path} is not .safetensors: convert it (safetensors.torch.save_file) before loading; pickles are not loaded")
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            raise UnlearnError(f"unknown pretrained tag {pretrained!r} for {arch}; known tags: {', '.join(tags) or 'none'}")
        trained_with = bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))
        if trained_with != quick_gelu:
            log.warning("%s/%s was trained with quick_gelu=%s but model.quick_gelu=%s: accuracy will be lower (set it to %s to match)",
                        arch, pretrained, trained_with, quick_gelu, trained_with)
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, force_quick_gelu=quick_gelu, cache_dir=cache_dir, require_pretrained=True)
    except Exception as e:  # download or load failure from open_clip / huggingface_hub
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnlearnError(f"could not load {arch} weights {pretrained!r}: {first}; check the network or the cache dir") from None
    return _wrap(model, arch, cfg)


def load(directory: str | Path, device: str | torch.device = "cpu") -> ClipAdapter:
    """Load a model saved by `ClipAdapter.save` (open_clip's local-dir layout)."""
    directory = Path(directory)
    config_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights.is_file():
        raise UnlearnError(f"{directory} is not a saved model ({CONFIG_FILE} + {WEIGHTS_FILE} expected): run the base_model stage")
    config = json.loads(config_path.read_text())
    name = config["model_name"]
    if open_clip.get_model_config(name) is None:
        open_clip.factory._MODEL_CONFIGS[name] = config["model_cfg"]
    with _quiet_random_init():  # the weights are loaded right below
        model = open_clip.create_model(name, **({"force_quick_gelu": True} if config["model_cfg"].get("quick_gelu") else {}))
    state = safetensors.torch.load_file(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnlearnError(f"weights in {weights} do not match {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    adapter = _wrap(model.to(device), name, config["model_cfg"])
    adapter.config = config
    return adapter
