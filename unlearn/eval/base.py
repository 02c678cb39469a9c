"""The base model's report card: zero-shot accuracy on the identity, object and style sets."""

from __future__ import annotations

from pathlib import Path

from unlearn.data.canvas import read_canvas
from unlearn.data.evalsets import read_celeba, read_imagenet
from unlearn.eval.zeroshot import (
    IDENTITY_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    STYLE_TEMPLATES,
    class_embeddings,
    image_embeddings,
    topk_accuracy,
)
from unlearn.models.adapter import Adapter


def base_metrics(adapter: Adapter, eval_dir: str | Path, batch_size: int = 256) -> dict:
    eval_dir = Path(eval_dir)
    out: dict = {}
    sets = [("identity", read_celeba, IDENTITY_TEMPLATES, "celeba"), ("object", read_imagenet, SIMPLE_IMAGENET_TEMPLATES, "imagenet")]
    if (eval_dir / "canvas").exists():  # real data may come without an UnlearnCanvas folder
        sets.append(("style", lambda d: read_canvas(d).by_style(), STYLE_TEMPLATES, "canvas"))
    for prefix, reader, templates, sub in sets:
        data = reader(eval_dir / sub)
        img = image_embeddings(adapter, data.paths, batch_size, progress=f"{prefix} images")
        acc = topk_accuracy(img, class_embeddings(adapter, data.classnames, templates), data.labels)
        out |= {f"{prefix}_top1": round(acc[1], 6), f"{prefix}_top5": round(acc[5], 6), f"{prefix}_images": len(data)}
    return out
