"""How closely two adapters of one model agree (the export's check): the largest absolute
difference of their normalised embeddings on the same input tensors, of their preprocessing on
the same images, and whether their tokenizers give the same ids up to the end-of-text token."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from unlearn.models.adapter import Adapter


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
