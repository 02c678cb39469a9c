"""UCE, unified concept editing (Gandikota et al., WACV 2024): a closed-form edit of the key and
value projections of every cross-attention layer of the UNet.  For each projection W, with c the
text encoder's states (one row per token position) of the target's text, c_a those of its anchor
at the same positions, and c_p those of the concepts to preserve:

    W' = (lambda W + s_e sum W c_a c^T + s_p sum W c_p c_p^T) (lambda I + s_e sum c c^T + s_p sum c_p c_p^T)^-1

so that W' c = W c_a (the target reads as its anchor) while W' c_p = W c_p.  As the paper does, the
texts are the concepts' names alone, positions up to the longer of the two texts' end token: the
target (e.g. "Sepia") mapped to "photo" for a style, to "" for an object; preserved: every other
style and object name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from unlearn.sd.data import PHOTO
from unlearn.sd.methods import Context, Result, register
from unlearn.sd.methods.common import attn2_params, changed_unet


@dataclass(frozen=True)
class UceConfig:
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lamb: float = 0.1

    RANGES: ClassVar[dict[str, str]] = {"erase_scale": "> 0", "lamb": "> 0", "preserve_scale": ">= 0"}


@torch.no_grad()
def name_states(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """States (N, L, D) of `texts` and each text's end-token position."""
    tok = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    out = pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]
    return out, tok.attention_mask.sum(1) - 1


@register("uce", UceConfig, "UCE: closed-form edit of the cross-attention keys and values, the target mapped to an anchor")
def run(ctx: Context, cfg: UceConfig) -> Result:
    pipe, unet, target = ctx.pipe, ctx.pipe.unet, ctx.target
    anchor = PHOTO if target.axis == "style" else ""
    preserved = [n for n in (*target.axes.styles[1:], *target.axes.objects) if n != target.name]
    s, ends = name_states(pipe, [target.name, anchor])
    last = int(ends.max()) + 1
    c, ca = s[0, :last].double(), s[1, :last].double()
    p_states, p_ends = name_states(pipe, preserved)
    cp = torch.cat([p_states[i, : int(p_ends[i]) + 1] for i in range(len(preserved))]).double()
    d = c.shape[1]
    params = attn2_params(unet, ("to_k", "to_v"))
    with torch.no_grad():
        for p in params.values():
            w = p.double()
            mat1 = cfg.lamb * w + cfg.erase_scale * (w @ ca.T) @ c + cfg.preserve_scale * (w @ cp.T) @ cp
            mat2 = cfg.lamb * torch.eye(d, dtype=w.dtype, device=w.device) + cfg.erase_scale * c.T @ c + cfg.preserve_scale * cp.T @ cp
            p.copy_(torch.linalg.solve(mat2, mat1.T).T.to(p.dtype))  # mat1 @ mat2^-1 (mat2 symmetric)
    return Result(changed_unet(unet, params), {"tensors": len(params), "edited_positions": last, "preserved": len(preserved)})
