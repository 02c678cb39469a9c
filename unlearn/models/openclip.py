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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from unlearn.errors import UnlearnError
from unlearn.models.adapter import Adapter, Record, read_family, read_inputs

CONFIG_DIR = Path(__file__).parent / "configs"
TINY_ARCH = "unlearn-tiny-vit"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

open_clip.add_model_config(CONFIG_DIR)  # registers the tiny architectures shipped with the project
log = logging.getLogger(__name__)

# Tensors that are never SLUG candidates: embeddings, positional embeddings, the patch embedding,
# the temperature (docs/methods.md, "Candidates").  Biases and other 1-d tensors are excluded by shape.
_NOT_CANDIDATE = re.compile(r"(^|\.)(token_embedding|positional_embedding|class_embedding|conv1|logit_scale)(\.|$)")
_VISUAL_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")
_VISUAL_TAIL = re.compile(r"^visual\.(ln_post|proj|attn_pool)")
_TEXT_BLOCK = re.compile(r"^(?:text\.)?transformer\.resblocks\.(\d+)\.")
_TEXT_TAIL = re.compile(r"^(?:text\.)?(ln_final|text_projection)(\.|$)")
PROJECTIONS = ("visual.proj", "text_projection")


class OpenClipAdapter(Adapter):
    """An open_clip CLIP (`open_clip.CLIP`): a vision and a text tower, fused attention
    (`in_proj_weight` holds q, k and v together), tower projections used as x @ W."""

    family = "open_clip"
    library = "open_clip_torch"
    weights = (WEIGHTS_FILE,)

    def __init__(self, model: nn.Module, tokenizer: Any, transform: Any, config: dict):
        self.model, self.tokenizer, self.transform, self.config = model, tokenizer, transform, config

    # ---- files

    @classmethod
    def from_pretrained(cls, pretrained: str, cache_dir: str | None = None, arch: str = "ViT-B-32", quick_gelu: bool = False,
                        **_model_params: Any) -> OpenClipAdapter:
        return from_pretrained(arch, pretrained, quick_gelu, cache_dir=cache_dir)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> OpenClipAdapter:
        return load(directory, device)

    def _save_files(self, directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        safetensors.torch.save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    # ---- inputs and encoders

    def preprocess(self, image: Any) -> torch.Tensor:
        return self.transform(image)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_image(images.to(self.device), normalize=normalize)

    def encode_tokens(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(tokens.to(self.device), normalize=normalize)

    @property
    def logit_scale_param(self) -> nn.Parameter:
        return self.model.logit_scale

    # ---- tensors

    def tower(self, name: str) -> str:
        """`image` for the vision tower's tensors, `text` for everything else that encodes text."""
        return "image" if name.startswith("visual.") else "text"

    def candidate_layers(self, include_layernorm: bool = False) -> list[str]:
        out = []
        for name, p in self.model.named_parameters():
            if _NOT_CANDIDATE.search(name) or name.endswith("bias"):
                continue
            is_norm = p.ndim == 1 and (".ln_" in name or name.startswith(("ln_", "visual.ln_")))
            if p.ndim >= 2 or (include_layernorm and is_norm):
                out.append(name)
        return out

    def short_name(self, name: str) -> str:
        """`visual.transformer.resblocks.3.mlp.c_fc.weight` -> `v3.mlp.c_fc`."""
        parts = name.replace(".weight", "").replace("_weight", "").split(".")
        if parts[:3] == ["visual", "transformer", "resblocks"]:
            return f"v{parts[3]}." + ".".join(parts[4:])
        if parts[:2] == ["transformer", "resblocks"]:
            return f"t{parts[2]}." + ".".join(parts[3:])
        return ".".join(parts)

    def input_layout(self, name: str) -> str:
        owner, _, leaf = name.rpartition(".")
        if name in PROJECTIONS and isinstance(dict(self.model.named_parameters()).get(name), nn.Parameter):
            return "matmul"
        if leaf == "in_proj_weight" and isinstance(dict(self.model.named_modules()).get(owner), nn.MultiheadAttention):
            return "linear"
        return super().input_layout(name)

    # ---- partial forwards

    def image_block_of(self, name: str) -> int | None:
        if (m := _VISUAL_BLOCK.match(name)) is not None:
            return int(m.group(1))
        if _VISUAL_TAIL.match(name):
            return len(self.model.visual.transformer.resblocks)
        return None

    @torch.no_grad()
    def image_hidden(self, images: torch.Tensor, block: int) -> torch.Tensor:
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
    def image_hiddens(self, images: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """One forward pass through open_clip's own `VisionTransformer.forward` over the blocks
        before the last one asked for: a pre-hook on each block asked for reads its input, the
        transformer's output is the last state (batch first, as `image_hidden`)."""
        transformer = self.model.visual.transformer
        wanted = sorted(set(blocks))
        if not wanted:
            return {}
        if not 0 <= wanted[0] <= wanted[-1] <= len(transformer.resblocks):
            raise ValueError(f"vision blocks {wanted} out of 0..{len(transformer.resblocks)}")
        last, captured = wanted[-1], {}

        def reader(b: int):
            def hook(_m, args):
                captured[b] = args[0] if transformer.batch_first else args[0].transpose(0, 1)
            return hook

        handles = [transformer.resblocks[b].register_forward_pre_hook(reader(b)) for b in wanted[:-1]]
        handles.append(transformer.register_forward_hook(lambda _m, _a, out: captured.__setitem__(last, out)))
        try:
            with self._only_blocks(range(last)):
                self.model.visual(images.to(self.device))
        finally:
            for h in handles:
                h.remove()
        return {b: captured[b] for b in wanted}

    @torch.no_grad()
    def encode_images_from(self, hidden: torch.Tensor, block: int, normalize: bool = True) -> torch.Tensor:
        """Runs blocks block.. and the pooling head through open_clip's own forward, skipping the
        patch embedding."""
        visual = self.model.visual
        with self._only_blocks(range(block, len(visual.transformer.resblocks))), _replace_attr(visual, "_embeds", lambda _x: hidden):
            out = visual(hidden)
        out = out[0] if isinstance(out, tuple) else out
        return nn.functional.normalize(out, dim=-1) if normalize else out

    @contextlib.contextmanager
    def _only_blocks(self, keep: range, transformer: nn.Module | None = None) -> Iterator[None]:
        transformer = self.model.visual.transformer if transformer is None else transformer
        full = transformer.resblocks
        transformer.resblocks = nn.ModuleList([full[i] for i in keep])
        try:
            yield
        finally:
            transformer.resblocks = full

    def _text_tower(self) -> tuple[nn.Module, str] | None:
        """The module holding the text transformer and `ln_final` (the CLIP itself, or a
        CustomTextCLIP's `text`) and its parameters' prefix; None for a text tower without
        them (an HF text model inside open_clip: no partial text forwards, every text edit
        encodes in full)."""
        text = getattr(self.model, "text", None)
        tower, prefix = (text, "text.") if isinstance(text, nn.Module) else (self.model, "")
        ok = hasattr(getattr(tower, "transformer", None), "resblocks") and isinstance(getattr(tower, "ln_final", None), nn.Module)
        return (tower, prefix) if ok else None

    def text_block_of(self, name: str) -> int | None:
        found = self._text_tower()
        if found is None or name.startswith("visual."):
            return None
        tower, prefix = found
        if (prefix == "text.") != name.startswith("text."):
            return None
        if (m := _TEXT_BLOCK.match(name)) is not None:
            return int(m.group(1))
        return len(tower.transformer.resblocks) if _TEXT_TAIL.match(name) else None

    def _text_entry(self, tower: nn.Module, block: int) -> nn.Module:
        """The module whose input is the state entering text block `block` (the final norm
        for the block count)."""
        blocks = tower.transformer.resblocks
        if not 0 <= block <= len(blocks):
            raise ValueError(f"text blocks {block} out of 0..{len(blocks)}")
        return blocks[block] if block < len(blocks) else tower.ln_final

    @torch.no_grad()
    def text_hiddens(self, tokens: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """Pre-hooks on each block asked for (and on `ln_final`) read their inputs during one run
        of open_clip's own `encode_text`; states are returned batch first."""
        wanted = sorted(set(blocks))
        if not wanted:
            return {}
        found = self._text_tower()
        if found is None:
            raise UnlearnError(f"{type(self.model).__name__} has no open_clip text transformer to read states from")
        tower = found[0]
        seq_first = not getattr(tower.transformer, "batch_first", True)
        return read_inputs({b: self._text_entry(tower, b) for b in wanted}, lambda: self.model.encode_text(tokens.to(self.device)),
                           lambda module, x: x.transpose(0, 1) if seq_first and module is not tower.ln_final else x)

    @torch.no_grad()
    def encode_tokens_from(self, hidden: torch.Tensor, block: int, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """open_clip's own `encode_text` with the blocks before `block` skipped and `hidden` put
        in as the input of `block` (or of `ln_final`, the transformer passing its input through:
        an empty block list would break open_clip's dtype lookup on the first block)."""
        found = self._text_tower()
        if found is None:
            raise UnlearnError(f"{type(self.model).__name__} has no open_clip text transformer to resume from")
        tower = found[0]
        entry = self._text_entry(tower, block)
        seq_first = not getattr(tower.transformer, "batch_first", True)
        state = hidden.to(self.device)
        state = state.transpose(0, 1) if seq_first and entry is not tower.ln_final else state
        handle = entry.register_forward_pre_hook(lambda _m, args: (state, *args[1:]))
        n = len(tower.transformer.resblocks)
        skip = self._only_blocks(range(block, n), tower.transformer) if block < n else _replace_attr(tower.transformer, "forward", lambda x, *_a, **_k: x)
        try:
            with skip:
                return self.model.encode_text(tokens.to(self.device), normalize=normalize)
        finally:
            handle.remove()

    # ---- input statistics

    @contextlib.contextmanager
    def _capture(self, layers: Sequence[str], record: Record) -> Iterator[None]:
        """open_clip's own cases, the rest through the shared hooks:
        - `*.attn.in_proj_weight`: the query entering the nn.MultiheadAttention (self-attention);
        - `*.attn.out_proj.weight`: the attention's output before its output projection, read by
          running the attention once more with that projection set to the identity (PyTorch
          applies it inside a fused function, so no hook on `out_proj` ever fires);
        - `visual.proj`, `text_projection`: the tower's pooled output with the projection taken out."""
        modules = dict(self.model.named_modules())
        shared, handles = [], []
        with contextlib.ExitStack() as stack:
            for name in layers:
                owner, _, leaf = name.rpartition(".")
                module, parent = modules.get(owner), modules.get(owner.rpartition(".")[0])
                if name == "visual.proj" and self.input_layout(name) == "matmul":
                    stack.enter_context(_without_param(self.model.visual, "proj"))
                    handles.append(self.model.visual.register_forward_hook(
                        lambda _m, _a, out: record("visual.proj", out[0] if isinstance(out, tuple) else out)))
                elif name == "text_projection" and self.input_layout(name) == "matmul":
                    stack.enter_context(_without_param(self.model, "text_projection"))
                    encode = self.encode_tokens

                    def encode_and_record(tokens: torch.Tensor, normalize: bool = True, encode=encode) -> torch.Tensor:
                        out = encode(tokens, normalize=False)
                        record("text_projection", out)
                        return out

                    stack.enter_context(_replace_attr(self, "encode_tokens", encode_and_record))
                elif leaf == "in_proj_weight" and isinstance(module, nn.MultiheadAttention):
                    handles.append(module.register_forward_pre_hook(
                        lambda _m, args, kwargs, name=name: record(name, args[0] if args else kwargs["query"]), with_kwargs=True))
                elif isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
                    handles.append(parent.register_forward_pre_hook(_attention_output_hook(name, record), with_kwargs=True))
                else:
                    shared.append(name)
            stack.enter_context(super()._capture(shared, record))
            try:
                yield
            finally:
                for h in handles:
                    h.remove()


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


def _wrap(model: nn.Module, model_name: str, model_cfg: dict) -> OpenClipAdapter:
    model.eval()
    pp_cfg = _preprocess_cfg(model)
    preprocess = image_transform_v2(PreprocessCfg(**pp_cfg), is_train=False)
    config = {"model_name": model_name, "model_cfg": model_cfg, "preprocess_cfg": pp_cfg}
    return OpenClipAdapter(model, open_clip.get_tokenizer(model_name), preprocess, config)


def create(arch: str, quick_gelu: bool = False, seed: int = 0) -> OpenClipAdapter:
    """A randomly initialised model of a registered architecture (seeded)."""
    cfg = _arch_config(arch, quick_gelu)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, force_quick_gelu=quick_gelu)
    return _wrap(model, arch, cfg)


def from_pretrained(arch: str, pretrained: str, quick_gelu: bool, cache_dir: str | None = None) -> OpenClipAdapter:
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


def load(directory: str | Path, device: str | torch.device = "cpu") -> OpenClipAdapter:
    """Load a model saved by `OpenClipAdapter.save` (open_clip's local-dir layout)."""
    directory = Path(directory)
    family = read_family(directory)["family"]
    if family != OpenClipAdapter.family:
        raise UnlearnError(f"{directory} holds a {family} model, not open_clip; load it with unlearn.models.adapter.load")
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


@contextlib.contextmanager
def _without_param(module: nn.Module, name: str) -> Iterator[None]:
    """Temporarily drop a registered parameter (open_clip then skips the projection it holds)."""
    saved = module._parameters[name]
    module._parameters[name] = None
    try:
        yield
    finally:
        module._parameters[name] = saved


def _attention_output_hook(name: str, record: Record) -> Any:
    """A forward pre-hook for an nn.MultiheadAttention that records the input of its output
    projection: it runs the attention once more with that projection set to the identity."""
    busy = [False]

    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        if busy[0]:
            return
        weight, bias = module.out_proj.weight, module.out_proj.bias
        saved = weight.data, None if bias is None else bias.data
        busy[0] = True
        try:
            weight.data = torch.eye(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
            if bias is not None:
                bias.data = torch.zeros_like(bias.data)
            out = module(*args, **kwargs)
        finally:
            weight.data = saved[0]
            if bias is not None:
                bias.data = saved[1]
            busy[0] = False
        record(name, out[0] if isinstance(out, tuple) else out)

    return hook
