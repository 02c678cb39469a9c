"""The transformers family: `transformers.CLIPModel`, the CLIP of Stable Diffusion's text encoder
(`CLIPTextModel`) and of LLaVA's vision tower (`CLIPVisionModel`).

A saved model is a folder that `transformers.CLIPModel.from_pretrained(folder)` loads as it is:
`config.json` and `model.safetensors` (`save_pretrained`), the tokenizer's files and
`preprocessor_config.json` (a `CLIPImageProcessor`), plus the family record.

Unlike open_clip's fused `in_proj_weight`, the attention's q, k and v projections are separate
`nn.Linear`s here, so each is a SLUG candidate of its own (docs/families.md "Model families").  Every
candidate is an `nn.Linear` or `nn.LayerNorm` weight, so the shared input hooks read them all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unlearn.errors import UnlearnError
from unlearn.models.adapter import Adapter, read_family, read_inputs

WEIGHTS_FILE = "model.safetensors"
_NOT_CANDIDATE = re.compile(r"(^|\.)(token_embedding|position_embedding|patch_embedding|class_embedding|logit_scale)(\.|$)")
_NORM = re.compile(r"(^|\.)(layer_norm1|layer_norm2|pre_layrnorm|post_layernorm|final_layer_norm)\.weight$")
_VISION_BLOCK = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
_VISION_TAIL = re.compile(r"^(vision_model\.post_layernorm|visual_projection)\.")
_TEXT_BLOCK = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
_TEXT_TAIL = re.compile(r"^(text_model\.final_layer_norm|text_projection)\.")


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # no "you should train this model" chatter on load
    transformers.logging.disable_progress_bar()  # nor a bar per save and load of a small folder
    return transformers


class HFClipAdapter(Adapter):
    family = "hf_clip"
    library = "transformers"
    weights = (WEIGHTS_FILE,)

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any):
        model.eval()
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.context_length = int(model.config.text_config.max_position_embeddings)

    # ---- files

    @classmethod
    def from_pretrained(cls, name_or_path: str, cache_dir: str | None = None, **_model_params: Any) -> HFClipAdapter:
        """A transformers CLIP folder (or a hub id, fetched by huggingface_hub into `cache_dir`):
        model, tokenizer and image processor.  A checkpoint whose config is not a CLIP is a
        one-line error.  (`model.arch` and `model.quick_gelu` are open_clip's: the folder's
        config.json says both.)"""
        tf = _transformers()
        try:
            config = tf.AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnlearnError(f"could not read a transformers config from {name_or_path!r}: {first}; give a CLIPModel folder or hub id") from None
        if config.model_type != "clip":
            raise UnlearnError(f"{name_or_path!r} is a {config.model_type!r} checkpoint, not a CLIP (config.model_type 'clip' expected); "
                               "give a transformers CLIPModel folder, or set model.family: open_clip for open_clip weights")
        model = tf.CLIPModel.from_pretrained(name_or_path, cache_dir=cache_dir)
        tokenizer = tf.CLIPTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
        processor = tf.CLIPImageProcessor.from_pretrained(name_or_path, cache_dir=cache_dir)
        return cls(model, tokenizer, processor)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> HFClipAdapter:
        directory = Path(directory)
        family = read_family(directory)["family"]
        if family != cls.family:
            raise UnlearnError(f"{directory} holds a {family} model, not hf_clip; load it with unlearn.models.adapter.load")
        if not (directory / WEIGHTS_FILE).is_file():
            raise UnlearnError(f"{directory} has no {WEIGHTS_FILE}: re-create it (save_pretrained writes safetensors)")
        adapter = cls.from_pretrained(str(directory))
        adapter.model.to(device)
        return adapter

    def _save_files(self, directory: Path) -> None:
        self.model.save_pretrained(directory, max_shard_size="1000GB")  # one safetensors file, fingerprinted
        self.tokenizer.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    # ---- inputs and encoders

    def preprocess(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=images.to(self.device)).pooler_output
        out = self.model.visual_projection(pooled)
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_tokens(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled = self.model.text_model(input_ids=tokens.to(self.device)).pooler_output
        out = self.model.text_projection(pooled)
        return nn.functional.normalize(out, dim=-1) if normalize else out

    @property
    def logit_scale_param(self) -> nn.Parameter:
        return self.model.logit_scale

    # ---- tensors

    def tower(self, name: str) -> str:
        return "image" if name.startswith(("vision_model.", "visual_projection.")) else "text"

    def candidate_layers(self, include_layernorm: bool = False) -> list[str]:
        out = []
        for name, p in self.model.named_parameters():
            if _NOT_CANDIDATE.search(name) or name.endswith("bias"):
                continue
            if p.ndim >= 2 or (include_layernorm and _NORM.search(name)):
                out.append(name)
        return out

    def short_name(self, name: str) -> str:
        """`vision_model.encoder.layers.3.self_attn.q_proj.weight` -> `v3.self_attn.q_proj`."""
        name = name.removesuffix(".weight")
        if (m := re.match(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.*)$", name)) is not None:
            return f"{m.group(1)[0]}{m.group(2)}.{m.group(3)}"
        return name.removeprefix("text_model.").removeprefix("vision_model.")

    # ---- partial forwards

    def image_block_of(self, name: str) -> int | None:
        if (m := _VISION_BLOCK.match(name)) is not None:
            return int(m.group(1))
        if _VISION_TAIL.match(name):
            return len(self.model.vision_model.encoder.layers)
        return None

    @torch.no_grad()
    def image_hidden(self, images: torch.Tensor, block: int) -> torch.Tensor:
        vm = self.model.vision_model
        hidden = vm.pre_layrnorm(vm.embeddings(images.to(self.device)))
        for layer in vm.encoder.layers[:block]:
            hidden = layer(hidden, None)
        return hidden

    @torch.no_grad()
    def image_hiddens(self, images: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """One pass over the encoder layers up to the last block asked for, keeping the state
        entering each block asked for (as `image_hidden`)."""
        vm = self.model.vision_model
        wanted = sorted(set(blocks))
        if wanted and not 0 <= wanted[0] <= wanted[-1] <= len(vm.encoder.layers):
            raise ValueError(f"vision blocks {wanted} out of 0..{len(vm.encoder.layers)}")
        out: dict[int, torch.Tensor] = {}
        if not wanted:
            return out
        hidden = vm.pre_layrnorm(vm.embeddings(images.to(self.device)))
        for b in range(wanted[-1] + 1):
            if b in wanted:
                out[b] = hidden
            if b < wanted[-1]:
                hidden = vm.encoder.layers[b](hidden, None)
        return out

    @torch.no_grad()
    def encode_images_from(self, hidden: torch.Tensor, block: int, normalize: bool = True) -> torch.Tensor:
        vm = self.model.vision_model
        for layer in vm.encoder.layers[block:]:
            hidden = layer(hidden, None)
        out = self.model.visual_projection(vm.post_layernorm(hidden[:, 0, :]))
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def text_block_of(self, name: str) -> int | None:
        if (m := _TEXT_BLOCK.match(name)) is not None:
            return int(m.group(1))
        return len(self.model.text_model.encoder.layers) if _TEXT_TAIL.match(name) else None

    def _text_entry(self, block: int) -> nn.Module:
        """The module whose input is the state entering text layer `block` (the final norm for
        the layer count)."""
        tm = self.model.text_model
        if not 0 <= block <= len(tm.encoder.layers):
            raise ValueError(f"text blocks {block} out of 0..{len(tm.encoder.layers)}")
        return tm.encoder.layers[block] if block < len(tm.encoder.layers) else tm.final_layer_norm

    @torch.no_grad()
    def text_hiddens(self, tokens: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """Pre-hooks on each layer asked for (and on the final norm) read their inputs during one
        run of transformers' own text forward (its causal mask and pooling untouched)."""
        wanted = sorted(set(blocks))
        if not wanted:
            return {}
        return read_inputs({b: self._text_entry(b) for b in wanted}, lambda: self.model.text_model(input_ids=tokens.to(self.device)))

    @torch.no_grad()
    def encode_tokens_from(self, hidden: torch.Tensor, block: int, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """transformers' own text forward with the layers before `block` skipped and `hidden`
        put in as the input of layer `block` (or of the final norm)."""
        encoder = self.model.text_model.encoder
        entry, full, state = self._text_entry(block), encoder.layers, hidden.to(self.device)
        handle = entry.register_forward_pre_hook(lambda _m, args: (state, *args[1:]))
        encoder.layers = nn.ModuleList(list(full)[block:])
        try:
            return self.encode_tokens(tokens, normalize=normalize)
        finally:
            encoder.layers = full
            handle.remove()
