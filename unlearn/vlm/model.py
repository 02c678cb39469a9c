"""The vision-language model: a `transformers.LlavaForConditionalGeneration` whose vision tower is
a CLIP's vision tower (the `hf_clip` family), and what SLUG needs of it.

- `train_tokenizer` / `build_llava` / `build_processor`: the tiny LLaVA of the default world (a
  byte-level BPE tokenizer trained here with `tokenizers`, a small Llama, LLaVA's two-layer
  projector, the CLIP base model's vision tower, frozen).
- `save_vlm` / `load_vlm`: `save_pretrained` (safetensors) and `from_pretrained` of the model
  and its `LlavaProcessor`, offline, by path.
- `check_vision_tower`: the LLaVA's vision tower must be the CLIP's vision tower (names, shapes
  and values), since SLUG's gradients come from that CLIP.
- `tie_vision_tower`: the LLaVA reads the CLIP adapter's vision modules, so an edit made through
  the adapter (the search) is an edit of the VLM.
- `used_vision_layers` / `check_patch_used`: LLaVA reads the hidden states of
  `vision_feature_layer`, never the CLIP's post-LayerNorm nor its projection: a tensor it does
  not read is not a candidate, and a patch of one is refused.
- `apply_vlm_patch`: a SLUG patch of the CLIP applied to a LLaVA's vision tower, in one call.
- `answer`: greedy `generate` over a batch of images with one question.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from unlearn.errors import UnlearnError
from unlearn.vlm.prompt import IMAGE_TOKEN, prompt

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
VISION_PREFIX = "vision_model."
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


@dataclass(frozen=True)
class LanguageConfig:
    """The tiny Llama of the default world and how the LLaVA reads its vision tower."""

    hidden_size: int = 128
    intermediate_size: int = 384
    layers: int = 2
    heads: int = 4
    vocab_size: int = 1024
    max_positions: int = 256
    feature_layer: int = -1          # LLaVA's vision_feature_layer (LLaVA-1.5: -2)
    select_strategy: str = "full"    # full: the CLS token too | default: patches only (LLaVA-1.5)


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer with the
    image token (left padding, for batched generation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tf = _transformers()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                      padding_side="left", model_max_length=4096)


def build_llava(vision_model: nn.Module, vision_config, tokenizer, cfg: LanguageConfig, seed: int):
    """A LLaVA around a copy of the CLIP vision tower `vision_model`, frozen; the projector and
    the language model initialised from `seed`."""
    tf = _transformers()
    text = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                          max_position_embeddings=cfg.max_positions, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = tf.LlavaConfig(vision_config=vision_config.to_dict(), text_config=text.to_dict(),
                            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=cfg.feature_layer,
                            vision_feature_select_strategy=cfg.select_strategy, projector_hidden_act="gelu")
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_processor(image_processor, tokenizer, model):
    tf = _transformers()
    # a CLIP's hidden states hold the CLS token beside the patches; strategy "default" drops it
    return tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=model.config.vision_config.patch_size,
                             vision_feature_select_strategy=model.config.vision_feature_select_strategy, chat_template=CHAT_TEMPLATE,
                             num_additional_image_tokens=1)


# ---------------------------------------------------------------- files

RECORD = "unlearn_vlm.json"


def save_vlm(model, processor, directory: str | Path, record: dict | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="1000GB")
    processor.save_pretrained(directory)
    (directory / RECORD).write_text(json.dumps(record or {}, indent=2, sort_keys=True) + "\n")


def load_vlm(path: str | Path, device: str = "cpu", half: bool = False):
    """A LLaVA folder (or hub id, from the local cache when offline): model and processor."""
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnlearnError(f"could not read a transformers config from {str(path)!r}: {first}; give a LLaVA folder (vlm.pretrained)") from None
    if config.model_type != "llava":
        raise UnlearnError(f"{str(path)!r} is a {config.model_type!r} checkpoint, not a LLaVA (config.model_type 'llava' expected); "
                           "give a LlavaForConditionalGeneration folder such as llava-1.5-7b-hf (vlm.pretrained)")
    if getattr(config.vision_config, "model_type", None) != "clip_vision_model":
        raise UnlearnError(f"{str(path)!r} has a {config.vision_config.model_type!r} vision tower; SLUG's vision track needs a CLIP one")
    dtype = torch.float16 if half else torch.float32
    model = tf.LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    model.to(device).eval()
    processor = tf.AutoProcessor.from_pretrained(str(path))
    processor.tokenizer.padding_side = "left"
    return model, processor


def open_vlm(directory: str | Path, device: str = "cpu", half: bool = False):
    """The VLM that stage `vlm_base` made: the folder itself (trained here), or the LLaVA its
    record points at (`vlm.pretrained`)."""
    directory = Path(directory)
    if not (directory / RECORD).is_file():
        raise UnlearnError(f"{directory} has no {RECORD}: run `dvc repro vlm_base`")
    pretrained = json.loads((directory / RECORD).read_text()).get("pretrained")
    return load_vlm(directory if pretrained == "synthetic" else pretrained, device, half)


# ---------------------------------------------------------------- the vision tower and its CLIP

def vision_tower(model) -> nn.Module:
    """The CLIP vision model inside a LLaVA (a `CLIPVisionModel`, like a CLIPModel's `vision_model`)."""
    return model.model.vision_tower


def check_vision_tower(model, clip_model: nn.Module, where: str, clip_where: str, atol: float = 1e-6) -> None:
    """The LLaVA's vision tower has the CLIP's vision tensors: same names, shapes and values."""
    mine = {n: p for n, p in vision_tower(model).state_dict().items()}
    theirs = {n: p for n, p in clip_model.vision_model.state_dict().items()}
    if set(mine) != set(theirs):
        extra, missing = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        raise UnlearnError(f"the vision tower of {where} does not match the CLIP {clip_where} (only in the LLaVA: {extra[:3]}, "
                           f"only in the CLIP: {missing[:3]}); set model.family: hf_clip and model.pretrained to the CLIPModel whose vision tower the LLaVA uses")
    for n in sorted(mine):
        if mine[n].shape != theirs[n].shape:
            raise UnlearnError(f"the vision tower of {where} does not match the CLIP {clip_where}: {n} is {tuple(mine[n].shape)} in the "
                               f"LLaVA, {tuple(theirs[n].shape)} in the CLIP; set model.family: hf_clip and model.pretrained to the CLIPModel whose vision tower the LLaVA uses")
        diff = (mine[n].float().cpu() - theirs[n].float().cpu()).abs().max().item() if mine[n].numel() else 0.0
        if diff > atol * max(1.0, theirs[n].float().abs().max().item()):
            raise UnlearnError(f"the vision tower of {where} differs from the CLIP {clip_where} in {n} (max |diff| {diff:.2e}); "
                               "SLUG's gradients would come from another model: set model.pretrained to the CLIP the LLaVA was built on")


def tie_vision_tower(model, clip_model: nn.Module) -> None:
    """Make the LLaVA read the CLIP's vision modules (after `check_vision_tower`): an edit of the
    CLIP adapter's vision tensors is then an edit of the VLM.  The tower keeps the CLIP's dtype
    (float32, for its gradients); a half-precision LLaVA gets its features cast at the projector."""
    model.model.vision_tower = clip_model.vision_model
    dtype = next(model.model.multi_modal_projector.parameters()).dtype
    if next(clip_model.vision_model.parameters()).dtype != dtype:
        model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, args: tuple(a.to(dtype) for a in args))


def used_vision_layers(model) -> int:
    """How many encoder layers of the vision tower the LLaVA reads (up to `vision_feature_layer`)."""
    n = model.config.vision_config.num_hidden_layers
    layers = model.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    # hidden_states[0] is the embeddings, hidden_states[k] the output of layer k
    return max((k if k >= 0 else n + 1 + k) for k in layers)


def reads(model, name: str) -> bool:
    """Whether the LLaVA reads the CLIP tensor `name` (a CLIPModel parameter name)."""
    if not name.startswith(VISION_PREFIX):
        return False
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)) < used_vision_layers(model)
    return name.startswith(("vision_model.embeddings.", "vision_model.pre_layrnorm."))


def apply_vlm_patch(model, directory: str | Path) -> dict:
    """Add a SLUG patch of the CLIP's vision tower (`stages.vlm_unlearn`'s output) to a LLaVA, in
    place; returns its metadata.  A patch of a tensor the LLaVA does not read, or of another shape,
    is refused."""
    from unlearn.methods.slug import read_patch

    meta, tensors = read_patch(directory, "run `dvc repro vlm_unlearn`")
    params = dict(vision_tower(model).named_parameters())
    for name, delta in tensors.items():
        check_patch_used(model, name, str(directory))
        local = name[len(VISION_PREFIX):]
        if local not in params or tuple(params[local].shape) != tuple(delta.shape):
            raise UnlearnError(f"patch {directory} edits {name} {tuple(delta.shape)}, which this LLaVA's vision tower does not have "
                               "(a patch for another encoder); re-run vlm_unlearn for this model")
        with torch.no_grad():
            params[local].add_(delta.to(params[local]))
    return meta


def check_patch_used(model, name: str, what: str) -> None:
    if not reads(model, name):
        raise UnlearnError(f"{what} edits {name}, which this LLaVA never reads (it takes vision_feature_layer "
                           f"{model.config.vision_feature_layer}: {used_vision_layers(model)} encoder layers, no post-LayerNorm or projection); "
                           "the edit would be silently lost: search only the layers it reads")


# ---------------------------------------------------------------- answers

def _images(images: Sequence[Image.Image | str | Path]) -> list[Image.Image]:
    return [Image.open(x).convert("RGB") if isinstance(x, (str, Path)) else x for x in images]


def prepare_inputs(model, processor, images: Sequence[Image.Image | str | Path], question: str, template: str) -> dict[str, torch.Tensor]:
    """The processor's inputs for one question about each image (left-padded), on the model's
    device, pixels in the vision tower's dtype; reusable across edits of the model."""
    inputs = processor(images=_images(images), text=[prompt(template, question)] * len(images), return_tensors="pt", padding=True)
    inputs = {k: v.to(next(model.parameters()).device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(next(vision_tower(model).parameters()).dtype)
    return inputs


@torch.no_grad()
def generate_answers(model, processor, inputs: dict[str, torch.Tensor], max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
    """Greedy answers for `prepare_inputs`' rows, `batch_size` at a time."""
    model.eval()
    out: list[str] = []
    n = inputs["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        chunk = {k: v[i:i + batch_size] for k, v in inputs.items()}
        ids = model.generate(**chunk, max_new_tokens=max_new_tokens, do_sample=False)
        out += [s.strip() for s in processor.tokenizer.batch_decode(ids[:, chunk["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def answer(model, processor, images: Sequence[Image.Image | str | Path], question: str, template: str, max_new_tokens: int = 8,
           batch_size: int = 64) -> list[str]:
    """Greedy answers to one question about each image."""
    return generate_answers(model, processor, prepare_inputs(model, processor, images, question, template), max_new_tokens, batch_size)


def config_record(cfg: LanguageConfig) -> dict:
    return asdict(cfg)
