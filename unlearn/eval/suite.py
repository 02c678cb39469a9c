"""The evaluator shared by SLUG's search, the evaluate stage and the baselines.

For a concept of kind K (identity or object) it measures, on one part of the evaluation sets:
  forget   the target's own images, classified among all classes of kind K (lower is better);
  retain   the images of every other class of kind K (the target excluded from the mean);
  utility  the evaluation set of the other kind (ImageNet-style for an identity, the identity
           set for an object).
Every class's images are split once, with a seed, into a validation part (used to choose steps,
epochs, layers) and a test part (reported), so no figure is chosen on the images it reports.

`Evaluator` caches what an edit cannot change: after an edit of a text-tower tensor only the class
prompts are re-encoded; after an edit of vision block b only blocks b.. run, from hidden states
cached at b.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unlearn.data.curate import Concept
from unlearn.data.evalsets import LabelledImages, read_celeba, read_imagenet
from unlearn.errors import UnlearnError
from unlearn.eval.zeroshot import IDENTITY_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES, class_embeddings, load_images, topk_accuracy
from unlearn.models.adapter import Adapter

PARTS = ("val", "test")
ACCURACY_KEYS = ("forget_top1", "forget_top5", "retain_top1", "retain_top5", "utility_top1", "utility_top5")


@dataclass(frozen=True)
class Task:
    """Images with labels into `classnames`, zero-shot with `templates`."""

    paths: list[Path]
    labels: list[int]
    classnames: list[str]
    templates: tuple[str, ...]


def _domains(eval_dir: Path) -> dict[str, tuple[LabelledImages, tuple[str, ...]]]:
    return {
        "identity": (read_celeba(eval_dir / "celeba"), IDENTITY_TEMPLATES),
        "object": (read_imagenet(eval_dir / "imagenet"), SIMPLE_IMAGENET_TEMPLATES),
    }


def split_part(data: LabelledImages, part: str, val_fraction: float, seed: int) -> list[int]:
    """Indices of `part` ("val" or "test"): per class a seeded shuffle, the first
    round(val_fraction * n) images to validation, the rest to test."""
    if part not in PARTS:
        raise ValueError(part)
    labels = np.asarray(data.labels)
    out: list[int] = []
    for c, name in enumerate(data.classnames):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(val_fraction * len(idx)))
        out.extend(int(i) for i in (idx[:n_val] if part == "val" else idx[n_val:]))
    return sorted(out)


def class_index(classnames: list[str], concept: Concept) -> int:
    folded = [c.casefold() for c in classnames]
    for phrase in concept.phrases:
        if phrase.casefold() in folded:
            return folded.index(phrase.casefold())
    raise UnlearnError(f"concept {concept.name!r} has no class in the {concept.kind} evaluation set (classes: {', '.join(classnames[:5])}, ...); add its images or pick another concept")


@dataclass(frozen=True)
class ConceptTasks:
    forget: Task
    retain: Task
    utility: Task
    target: int  # the target's label among forget/retain classnames


def concept_tasks(eval_dir: str | Path, concept: Concept, part: str, val_fraction: float, seed: int) -> ConceptTasks:
    domains = _domains(Path(eval_dir))
    own, own_templates = domains[concept.kind]
    other, other_templates = domains["object" if concept.kind == "identity" else "identity"]
    target = class_index(own.classnames, concept)
    own_idx = split_part(own, part, val_fraction, seed)
    forget = [i for i in own_idx if own.labels[i] == target]
    retain = [i for i in own_idx if own.labels[i] != target]
    if not forget:
        raise UnlearnError(f"the {part} part holds no image of {concept.name!r}: it needs at least 2 evaluation images (eval.split.val_fraction {val_fraction})")
    util = split_part(other, part, val_fraction, seed)

    def task(data: LabelledImages, idx: list[int], templates: tuple[str, ...]) -> Task:
        return Task([data.paths[i] for i in idx], [data.labels[i] for i in idx], list(data.classnames), templates)

    return ConceptTasks(task(own, forget, own_templates), task(own, retain, own_templates), task(other, util, other_templates), target)


class Evaluator:
    """Forget / retain / utility top-1 and top-5 of a model on one part, with caches for edits."""

    def __init__(self, adapter: Adapter, tasks: ConceptTasks, batch_size: int = 256):
        self.adapter = adapter
        self.tasks = tasks
        self.batch_size = batch_size
        names = ("forget", "retain", "utility")
        self._images = {n: load_images(adapter, getattr(tasks, n).paths) for n in names}
        self._image_emb: dict[str, torch.Tensor] | None = None
        self._class_emb: dict[str, torch.Tensor] | None = None
        self._hidden: tuple[int, dict[str, torch.Tensor]] | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return {n: int(x.shape[0]) for n, x in self._images.items()}

    def _batched(self, fn, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(x[s : s + self.batch_size]).cpu() for s in range(0, x.shape[0], self.batch_size)])

    @torch.no_grad()
    def _encode_images(self, block: int | None) -> dict[str, torch.Tensor]:
        a = self.adapter
        if block is None:
            return {n: self._batched(a.encode_images, x) for n, x in self._images.items()}
        if self._hidden is None or self._hidden[0] != block:
            self._hidden = (block, {n: self._batched(lambda b, blk=block: a.image_hidden(b, blk), x) for n, x in self._images.items()})
        return {n: self._batched(lambda h, blk=block: a.encode_images_from(h.to(a.device), blk), h) for n, h in self._hidden[1].items()}

    @torch.no_grad()
    def _encode_classes(self) -> dict[str, torch.Tensor]:
        t = self.tasks
        own = class_embeddings(self.adapter, t.forget.classnames, t.forget.templates).cpu()
        return {"forget": own, "retain": own, "utility": class_embeddings(self.adapter, t.utility.classnames, t.utility.templates).cpu()}

    def prepare(self, edited: str | None = None) -> None:
        """Cache the embeddings that an edit of the tensor `edited` leaves unchanged (call it with
        the model unedited)."""
        block = self.adapter.image_block_of(edited) if edited else None
        self._image_emb = self._encode_images(None)
        self._class_emb = self._encode_classes()
        if block is not None:
            self._encode_images(block)

    @torch.no_grad()
    def evaluate(self, edited: str | None = None) -> dict[str, float]:
        """Accuracies of the model as it is now.  With `edited` (after `prepare(edited)` on the
        unedited model) only what that tensor can change is recomputed."""
        if edited is None:
            image_emb, class_emb = self._encode_images(None), self._encode_classes()
        elif self._image_emb is None or self._class_emb is None:
            raise RuntimeError("call prepare(edited) on the unedited model first")
        elif self.adapter.tower(edited) == "text":
            image_emb, class_emb = self._image_emb, self._encode_classes()
        else:
            block = self.adapter.image_block_of(edited)
            image_emb, class_emb = self._encode_images(block), self._class_emb
        out: dict[str, float] = {}
        for name in ("forget", "retain", "utility"):
            acc = topk_accuracy(image_emb[name], class_emb[name], getattr(self.tasks, name).labels)
            out[f"{name}_top1"], out[f"{name}_top5"] = round(acc[1], 6), round(acc[5], 6)
        return out
