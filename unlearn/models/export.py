"""Export to the transformers family: an open_clip CLIP written as a `transformers.CLIPModel`
folder (`save_pretrained`, safetensors) whose embeddings equal open_clip's.

This is how one base model serves every track: the exported text tower is what a Stable
Diffusion pipeline takes as its text encoder, the exported vision tower what a LLaVA model takes
as its vision tower.  The one module that knows two families, since it converts between them.

What exports (docs/families.md "Model families"): an `open_clip.CLIP` with a ViT vision tower pooled on its
class token (no attentional pooler, no layer scale), a causal text tower pooled at the end-of-text
token, projections without bias, GELU or QuickGELU, the OpenAI BPE tokenizer, and preprocessing by
resize of the shortest side and a centre crop.  Anything else is a one-line error; and every
export is checked on a probe batch (embeddings equal within `TOLERANCE`) before it is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from unlearn.errors import UnlearnError
from unlearn.models.adapter import Adapter
from unlearn.models.hf_clip import HFClipAdapter, _transformers

TOLERANCE = 1e-5
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def to_hf_clip(adapter: Adapter) -> HFClipAdapter:
    """The same model as a transformers CLIPModel adapter (an hf_clip model comes back as it is)."""
    if isinstance(adapter, HFClipAdapter):
        return adapter
    if adapter.family == "open_clip":
        return _from_open_clip(adapter)
    raise UnlearnError(f"no export from model family {adapter.family!r} to hf_clip; known: open_clip, hf_clip")


def _unsupported(what: str) -> UnlearnError:
    return UnlearnError(f"this open_clip model does not export to a transformers CLIPModel: {what}; "
                        "use model.family: open_clip for it (docs/families.md lists the configs that export)")


def _act(mlp: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    act = mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise _unsupported(f"activation {type(act).__name__}")


def _tower_config(transformer: nn.Module, what: str) -> dict:
    blocks = transformer.resblocks
    b = blocks[0]
    for name in ("ls_1", "ls_2", "ln_attn"):
        if not isinstance(getattr(b, name, nn.Identity()), nn.Identity):
            raise _unsupported(f"{what} blocks use {name} (layer scale or scaled attention)")
    if not isinstance(b.attn, nn.MultiheadAttention) or not b.attn._qkv_same_embed_dim or b.attn.in_proj_bias is None:
        raise _unsupported(f"{what} attention is not a standard nn.MultiheadAttention with q/k/v biases")
    ln = getattr(b.mlp, "ln", None)
    if ln is not None and not isinstance(ln, nn.Identity):
        raise _unsupported(f"{what} MLP has an inner LayerNorm")
    return {"hidden_size": b.attn.embed_dim, "intermediate_size": b.mlp.c_fc.out_features, "num_hidden_layers": len(blocks),
            "num_attention_heads": b.attn.num_heads, "hidden_act": _act(b.mlp), "layer_norm_eps": b.ln_1.eps, "attention_dropout": 0.0}


def _blocks(prefix_from: str, prefix_to: str, n: int, state: dict) -> dict:
    out = {}
    for i in range(n):
        f, t = f"{prefix_from}.{i}", f"{prefix_to}.{i}"
        q, k, v = state[f"{f}.attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[f"{f}.attn.in_proj_bias"].chunk(3)
        out |= {f"{t}.self_attn.q_proj.weight": q, f"{t}.self_attn.k_proj.weight": k, f"{t}.self_attn.v_proj.weight": v,
                f"{t}.self_attn.q_proj.bias": qb, f"{t}.self_attn.k_proj.bias": kb, f"{t}.self_attn.v_proj.bias": vb}
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            out[f"{t}.{b}.weight"], out[f"{t}.{b}.bias"] = state[f"{f}.{a}.weight"], state[f"{f}.{a}.bias"]
    return out


def _tokenizer(open_clip_tokenizer, context_length: int):
    """open_clip's BPE (the OpenAI vocabulary and merges) as a transformers CLIPTokenizer; padding
    with the end-of-text token, as OpenAI's transformers tokenizer does."""
    tf = _transformers()
    encoder = getattr(open_clip_tokenizer, "encoder", None)
    if encoder is None or not hasattr(open_clip_tokenizer, "bpe_ranks"):
        raise _unsupported(f"tokenizer {type(open_clip_tokenizer).__name__} is not open_clip's SimpleTokenizer (OpenAI BPE)")
    sot, eot = open_clip_tokenizer.sot_token_id, open_clip_tokenizer.eot_token_id
    ids = {v: k for k, v in encoder.items()}
    vocab = {k: v for k, v in encoder.items() if v not in (sot, eot)} | {BOS: sot, EOS: eot}
    merges = [pair for pair, _ in sorted(open_clip_tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])]
    if len(vocab) != len(ids):
        raise _unsupported("the tokenizer's vocabulary already holds the transformers special-token names")
    return tf.CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                            model_max_length=context_length)


def _processor(preprocess_cfg: dict):
    tf = _transformers()
    size = preprocess_cfg["size"]
    size = size[0] if isinstance(size, list) and len(set(size)) == 1 else size
    if not isinstance(size, int) or preprocess_cfg.get("resize_mode", "shortest") != "shortest" or preprocess_cfg.get("interpolation") != "bicubic":
        raise _unsupported(f"preprocessing {preprocess_cfg} (a square size, resize_mode shortest and bicubic interpolation export)")
    return tf.CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                                 crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                 image_mean=list(preprocess_cfg["mean"]), image_std=list(preprocess_cfg["std"]), do_convert_rgb=True)


def _from_open_clip(adapter: Adapter) -> HFClipAdapter:
    import open_clip

    tf = _transformers()
    model = adapter.model
    if type(model) is not open_clip.CLIP:
        raise _unsupported(f"model class {type(model).__name__} (only open_clip.CLIP: a ViT image tower and open_clip's own text tower)")
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise _unsupported(f"image tower {type(visual).__name__} (a ViT exports)")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
        raise _unsupported("the image tower is not pooled on its class token")
    if visual.conv1.bias is not None or not isinstance(visual.proj, nn.Parameter):
        raise _unsupported("the patch embedding has a bias or the image projection is not a plain matrix")
    if getattr(model, "text_pool_type", "argmax") != "argmax" or not isinstance(model.text_projection, nn.Parameter) or model.attn_mask is None:
        raise _unsupported("the text tower is not causal, pooled at the end-of-text token, with a plain projection")
    if getattr(model, "logit_bias", None) is not None:
        raise _unsupported("the model has a logit bias (SigLIP)")
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    patch = visual.conv1.kernel_size[0]
    text_ctx = int(model.positional_embedding.shape[0])
    vision_cfg = _tower_config(visual.transformer, "image") | {"image_size": image_size, "patch_size": patch}
    text_cfg = _tower_config(model.transformer, "text") | {
        "vocab_size": int(model.token_embedding.num_embeddings), "max_position_embeddings": text_ctx,
        "bos_token_id": adapter.tokenizer.sot_token_id, "eos_token_id": adapter.tokenizer.eot_token_id, "pad_token_id": adapter.tokenizer.eot_token_id}
    embed_dim = int(model.text_projection.shape[1])
    config = tf.CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=embed_dim,
                           logit_scale_init_value=float(state["logit_scale"]))
    hf = tf.CLIPModel(config).eval()
    n_vis, n_txt = vision_cfg["num_hidden_layers"], text_cfg["num_hidden_layers"]
    mapped = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"], "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"], "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T.contiguous(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"], "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T.contiguous(),
        "logit_scale": state["logit_scale"],
    }
    mapped |= _blocks("visual.transformer.resblocks", "vision_model.encoder.layers", n_vis, state)
    mapped |= _blocks("transformer.resblocks", "text_model.encoder.layers", n_txt, state)
    target = hf.state_dict()
    missing = sorted(set(target) - set(mapped))
    if missing:
        raise _unsupported(f"no open_clip tensor for {missing[:3]}")
    bad = [k for k in mapped if tuple(mapped[k].shape) != tuple(target[k].shape)]
    if bad:
        raise _unsupported(f"shape mismatch for {bad[:3]}")
    hf.load_state_dict(mapped, strict=True)
    out = HFClipAdapter(hf.to(adapter.device), _tokenizer(adapter.tokenizer, text_ctx), _processor(adapter.config["preprocess_cfg"]))
    _check_probe(adapter, out, image_size)
    return out


@torch.no_grad()
def max_embedding_difference(a: Adapter, b: Adapter, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """The largest absolute difference of the normalised image and text embeddings of two
    adapters on the same input tensors."""
    img = (a.encode_images(images).cpu() - b.encode_images(images).cpu()).abs().max()
    txt = (a.encode_tokens(tokens).cpu() - b.encode_tokens(tokens).cpu()).abs().max()
    return {"image": float(img), "text": float(txt)}


def _check_probe(source: Adapter, exported: HFClipAdapter, image_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, image_size, image_size, generator=gen)
    tokens = source.tokenize(["a photo of a rocket.", "Elon Musk at the beach", "itap of a fish.", "art of the guitar."])
    diff = max_embedding_difference(source, exported, images, tokens)
    if max(diff.values()) > TOLERANCE:
        raise _unsupported(f"the exported embeddings differ by up to {max(diff.values()):.2e} (> {TOLERANCE}) on a probe batch")


# ---------------------------------------------------------------- how closely an export agrees with its source

def _eot_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True up to and including the first end-of-text token (the largest id of each row)."""
    eot = tokens.argmax(dim=-1)
    return torch.arange(tokens.shape[1])[None, :] <= eot[:, None]


@torch.no_grad()
def compare_adapters(source: Adapter, other: Adapter, image_paths: Sequence[Path], texts: Sequence[str], batch_size: int = 256) -> dict:
    """Embeddings of `source` and `other` on the images as `source` preprocesses them and on the
    texts as `source` tokenizes them, plus how `other`'s own preprocessing and tokenizer differ."""
    img_diff = pre_diff = 0.0
    for s in range(0, len(image_paths), batch_size):
        images = []
        for p in image_paths[s : s + batch_size]:
            with Image.open(p) as im:
                rgb = im.convert("RGB")
            a, b = source.preprocess(rgb), other.preprocess(rgb)
            pre_diff = max(pre_diff, float((a - b).abs().max()))
            images.append(a)
        x = torch.stack(images)
        img_diff = max(img_diff, float((source.encode_images(x).cpu() - other.encode_images(x).cpu()).abs().max()))
    txt_diff, mismatched = 0.0, 0
    for s in range(0, len(texts), batch_size):
        chunk = list(texts[s : s + batch_size])
        ta, tb = source.tokenize(chunk), other.tokenize(chunk)
        mask = _eot_mask(ta)
        mismatched += int((((ta != tb) & mask).any(dim=1)).sum()) if ta.shape == tb.shape else len(chunk)
        txt_diff = max(txt_diff, float((source.encode_tokens(ta).cpu() - other.encode_tokens(ta).cpu()).abs().max()))
    return {"images": len(image_paths), "texts": len(texts), "image_embedding_max_abs_diff": img_diff, "text_embedding_max_abs_diff": txt_diff,
            "preprocess_max_abs_diff": pre_diff, "token_mismatches": mismatched}
