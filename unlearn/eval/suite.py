"""The evaluator shared by SLUG's search, the evaluate stage and the baselines.

For a concept of kind K (identity, object or style) it measures, on one part of the evaluation sets:
  forget   the target's own images, classified among all classes of kind K (lower is better);
  retain   the images of every other class of kind K (the target excluded from the mean);
  utility  the evaluation set of the other kind (ImageNet-style for an identity or a style, the
           identity set for an object).
A style's images are the canvas's stylised objects (`data/eval/canvas`), classified among the styles.
Every class's images are split once, with a seed, into a validation part (used to choose steps,
epochs, layers) and a test part (reported), so no figure is chosen on the images it reports.

`Evaluator` caches what an edit cannot change: after an edit of text block b only the class
prompts are re-encoded, and only through blocks b.., from their states cached at b; after an edit
of vision block b only blocks b.. run, from hidden states cached at b; and it scores only the sets
asked for.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unlearn.data.canvas import read_canvas
from unlearn.data.curate import Concept
from unlearn.data.evalsets import LabelledImages, read_celeba, read_imagenet
from unlearn.errors import UnlearnError
from unlearn.eval.parts import equal_parts
from unlearn.eval.zeroshot import (
    IDENTITY_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    STYLE_TEMPLATES,
    class_embeddings,
    class_means,
    class_prompts,
    load_images,
    topk_accuracy,
    topk_hits,
)
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


# The evaluation set whose accuracy guards an edit of each kind besides the kind's own (utility).
OTHER_KIND = {"identity": "object", "object": "identity", "style": "object"}


def _domains(eval_dir: Path, kinds: tuple[str, ...] = ("identity", "object")) -> dict[str, tuple[LabelledImages, tuple[str, ...]]]:
    """The evaluation set and zero-shot templates of each of `kinds` (a style's set is the canvas's
    stylised images, classified among the styles)."""
    readers = {
        "identity": lambda: (read_celeba(eval_dir / "celeba"), IDENTITY_TEMPLATES),
        "object": lambda: (read_imagenet(eval_dir / "imagenet"), SIMPLE_IMAGENET_TEMPLATES),
        "style": lambda: (read_canvas(eval_dir / "canvas").by_style(), STYLE_TEMPLATES),
    }
    return {k: readers[k]() for k in dict.fromkeys(kinds)}


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
            where = Path(data.paths[0]).parent.parent if data.paths else "the evaluation set"
            raise UnlearnError(f"evaluation class {name!r} has no image (in {where}); add its images or remove the class, "
                               "then re-run the download stage")
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
    domains = _domains(Path(eval_dir), (concept.kind, OTHER_KIND[concept.kind]))
    own, own_templates = domains[concept.kind]
    other, other_templates = domains[OTHER_KIND[concept.kind]]
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


SETS = ("forget", "retain", "utility")
HIDDEN_CACHE_BYTES = 1 << 30  # every vision block's hidden states of every set kept at once up to 1 GiB (the default world: 108 MB)
# The one-pass cache is read, and cached hidden states are run through the rest of the vision
# tower, at most this many images at a time on a CPU, in chunks of equal size: the same bits as
# batches of `batch_size` (a contract test of every family; chunks of 1-3 images can take other
# kernels, hence no small last chunk), and faster once a batch's activations outgrow the CPU's
# caches (2 cores, the default world's 391 retain images: from block 0, 0.24 s in chunks of 64
# against 0.42 s in batches of 256 with open_clip, 0.25 against 0.37 with hf_clip; the one-pass
# read 0.26 against 0.30-0.37 s).  Elsewhere (a GPU) the batch size.
CHUNK_CPU = 64


def weights_checksum(adapter: Adapter) -> torch.Tensor:
    """Per parameter tensor, its sum and its sum of absolute values in float64: a cheap check
    that two models hold the same weights (not a cryptographic hash; any edit changes it)."""
    with torch.no_grad():
        return torch.stack([torch.stack((p.double().sum(), p.double().abs().sum())) for p in adapter.model.parameters()]).cpu()


class SharedBase:
    """The unedited model's reference pass, shared by the `Evaluator`s of several concepts of one
    model in one process (the comparison's concepts, a bench over every identity): per image
    path its states entering every cached vision block and its embedding, per (classes,
    templates) the class embeddings.  The concepts of a kind draw their forget, retain and
    other-kind sets from the same evaluation images, so the first concept's reference pass
    reads them all and each later concept's costs only what its sets add (nothing, on the
    default world): like the retain statistics, a cost per model, not per concept.  Each image
    is the same bits in any chunk (a contract test of every family), so the figures do not
    change.  It keeps the checksum of the weights it was read from and refuses another model's
    (`weights_checksum`)."""

    def __init__(self) -> None:
        self.states: dict[Path, dict[int, torch.Tensor]] = {}
        self.images: dict[Path, torch.Tensor] = {}
        self.classes: dict[tuple, torch.Tensor] = {}
        self.text_states: dict[tuple, dict[int, torch.Tensor]] = {}  # per (classes, templates): the prompts' states entering every cached text block
        self.checksum: torch.Tensor | None = None

    def check(self, adapter: Adapter) -> None:
        """Call with the unedited model before reading or adding anything."""
        now = weights_checksum(adapter)
        if self.checksum is None:
            self.checksum = now
        elif not torch.equal(now, self.checksum):
            raise RuntimeError("SharedBase was read from other weights than this model's: use one per model, and only while it is unedited")


class Evaluator:
    """Forget / retain / utility top-1 and top-5 of a model on one part, with caches for edits.

    `evaluate(edited, sets)` scores only the sets asked for (SLUG's search scores the target's
    images first and the other sets only where its choice reads them).  The caches hold only what
    no edit of the tensor being scored can change (image embeddings for a text-tower edit, class
    embeddings for an image-tower edit, the hidden states entering the edited vision block), so
    they may be filled while an edit is applied; they assume one tensor edited at a time from the
    same base weights: call `reset()` after changing the model otherwise.  The hidden states of
    every set are read for every vision block in one forward pass per set (`Adapter.image_hiddens`)
    on the unedited model: by the reference evaluation, which needs that pass anyway (its image
    embeddings are resumed from the last state), or, without one, by the first `prepare` of a
    vision-block tensor (read during an edit, the states past the edited block would hold it).
    The class prompts are tokenized once, and their states entering every text block are read
    the same way (`Adapter.text_hiddens`, by the reference evaluation or the first `prepare` of a
    text-block tensor) and kept when they fit the same budget; a text-block edit then re-encodes
    the prompts from its block on, in one batch as the full forward does (the same bits).
    They are kept when all of them together fit `hidden_cache_bytes` (default
    `HIDDEN_CACHE_BYTES`); otherwise one block is kept at a time, each filled by its own partial
    pass when first needed (a search that moves between blocks pays that pass again).  Either
    way the states are the same bits.  The one-pass read and the runs from cached states go
    `chunk_size` images at a time (default: `CHUNK_CPU` on a CPU, else `batch_size`), the same
    bits as in batches of `batch_size`.
    """

    def __init__(self, adapter: Adapter, tasks: ConceptTasks, batch_size: int = 256, hidden_cache_bytes: int | None = None,
                 chunk_size: int | None = None, shared: SharedBase | None = None):
        self.adapter = adapter
        self.shared = shared
        self.tasks = tasks
        self.batch_size = batch_size
        self.hidden_cache_bytes = HIDDEN_CACHE_BYTES if hidden_cache_bytes is None else hidden_cache_bytes
        if chunk_size is None:
            chunk_size = min(batch_size, CHUNK_CPU) if adapter.device.type == "cpu" else batch_size
        if chunk_size < 1 or batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1 (batch_size {batch_size}, chunk_size {chunk_size})")
        self.chunk_size = chunk_size
        self._images = {n: load_images(adapter, getattr(tasks, n).paths) for n in SETS}
        self._tokens: dict[str, torch.Tensor] = {}  # per domain, its class prompts tokenized (no weight changes them)
        self.reset()

    def reset(self) -> None:
        """Drop the caches (call after changing the model's weights outside an edit)."""
        self._prepared = False
        self._image_emb: dict[str, torch.Tensor] = {}            # unedited image embeddings, per set
        self._class_emb: dict[str, torch.Tensor] = {}            # unedited class embeddings, per domain (own, other)
        self._hidden: dict[tuple[int, str], torch.Tensor] = {}   # unedited hidden states at a vision block, per set
        self._all_blocks: list[int] | None = None                # the blocks read in one pass, if they fit (decided on first need)
        self._text: dict[tuple[int, str], torch.Tensor] = {}     # unedited class prompts' states at a text block, per domain
        self._text_blocks: list[int] | None = None               # the text blocks kept, if they fit (decided on first need)
        self._margin_order: dict[str, torch.Tensor] = {}         # per set, its images by the unedited model's top-1 margin
        self._misses: dict[str, torch.Tensor] = {}               # per set, how often each image was missed after an edit so far
        self._shared_checked = False                             # the shared reference pass checked against this model's weights

    @property
    def sizes(self) -> dict[str, int]:
        return {n: int(x.shape[0]) for n, x in self._images.items()}

    def _batched(self, fn, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(x[s : s + self.batch_size]).cpu() for s in range(0, x.shape[0], self.batch_size)])

    def _chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`x` in chunks of at most `chunk_size` images, of equal size within one image (no
        small last chunk, whose kernels could differ)."""
        return torch.tensor_split(x, equal_parts(x.shape[0], self.chunk_size))

    def _resuming(self, states: torch.Tensor, block: int) -> Iterator[torch.Tensor]:
        """Image embeddings from the cached states entering `block`, one chunk at a time."""
        a = self.adapter
        for h in self._chunks(states):
            yield a.encode_images_from(h.to(a.device), block).cpu()

    def _resumed(self, states: torch.Tensor, block: int) -> torch.Tensor:
        return torch.cat(list(self._resuming(states, block)))

    @torch.no_grad()
    def _encode_images(self, name: str, block: int | None) -> torch.Tensor:
        if block is None:
            return self._batched(self.adapter.encode_images, self._images[name])
        return self._resumed(self._states(name, block), block)

    def _states(self, name: str, block: int) -> torch.Tensor:
        """The cached unedited hidden states of set `name` entering vision block `block`."""
        a = self.adapter
        if (block, name) not in self._hidden:
            if block in self._cached_blocks():
                raise RuntimeError(f"no cached hidden states entering vision block {block}: call prepare(edited) on the unedited model first")
            self._hidden = {k: v for k, v in self._hidden.items() if k[0] == block}  # one block cached at a time
            self._hidden[(block, name)] = self._batched(lambda b: a.image_hidden(b, block), self._images[name])
        return self._hidden[(block, name)]

    @torch.no_grad()
    def _encode_until(self, name: str, block: int, class_emb: torch.Tensor, floor: float | None = None) -> torch.Tensor | None:
        """`_encode_images(name, block)`, chunk by chunk in `_hardest_first` order (noting each
        image missed), or None as soon as the set's top-1 (as `evaluate` rounds it) can no longer
        reach `floor` even if every image left were right."""
        labels = torch.as_tensor(list(getattr(self.tasks, name).labels))
        order = self._hardest_first(name)
        states, labels = self._states(name, block)[order], labels[order]
        right, seen, parts = 0, 0, []
        for emb in self._resuming(states, block):
            parts.append(emb)
            hits = topk_hits(emb, class_emb, labels[seen : seen + len(emb)])[1]  # as the full scoring ranks
            self._misses[name][order[seen : seen + len(emb)]] += ~hits
            right += int(hits.sum())
            seen += len(emb)
            if floor is not None and round((right + len(labels) - seen) / len(labels), 6) < floor:
                return None
        return torch.cat(parts)[torch.argsort(order)]  # back in the set's order

    def _hardest_first(self, name: str) -> torch.Tensor:
        """The order `_encode_until` scores set `name` in, so that a step that costs more images
        than the floor allows is given up in the set's first chunks rather than its last: the
        images missed most often by the edits scored so far first, then by the unedited model's
        top-1 margin (the true class's logit less the best other one), smallest first.  Each
        image's embedding is the same bits in any chunk (a contract test of every family), so
        the figures of a set scored to the end do not depend on the order."""
        labels = getattr(self.tasks, name).labels
        misses = self._misses.setdefault(name, torch.zeros(len(labels), dtype=torch.long))
        emb, cls = self._image_emb.get(name), self._class_emb.get(self._domain(name))
        if name not in self._margin_order and emb is not None and cls is not None:
            logits = emb @ cls.T.to(emb)
            y = torch.as_tensor(list(labels))[:, None]
            margin = logits.gather(1, y)[:, 0] - logits.scatter(1, y, float("-inf")).amax(dim=1)
            self._margin_order[name] = torch.sort(margin, stable=True).indices
        by_margin = self._margin_order.get(name, torch.arange(len(labels)))  # before the reference evaluation: the set's own order
        return by_margin[torch.sort(-misses[by_margin], stable=True).indices]

    def _cached_blocks(self) -> list[int]:
        """The vision blocks whose states are read in one pass and kept: every block an edit of
        a candidate tensor can start at, if their states for every set fit `hidden_cache_bytes`
        (measured on one image), else none."""
        if self._all_blocks is None:
            a = self.adapter
            blocks = sorted({b for n in a.candidate_layers(include_layernorm=True) if (b := a.image_block_of(n)) is not None})
            one = a.image_hidden(self._images["forget"][:1], 0) if blocks else None
            total = 0 if one is None else one.numel() * one.element_size() * len(blocks) * sum(self.sizes.values())
            self._all_blocks = blocks if 0 < total <= self.hidden_cache_bytes else []
        return self._all_blocks

    def _class_tokens(self, name: str) -> torch.Tensor:
        d = self._domain(name)
        if d not in self._tokens:
            task = getattr(self.tasks, name)
            self._tokens[d] = self.adapter.tokenize(class_prompts(task.classnames, task.templates))
        return self._tokens[d]

    @torch.no_grad()
    def _encode_classes(self, name: str) -> torch.Tensor:
        task = getattr(self.tasks, name)
        return class_embeddings(self.adapter, task.classnames, task.templates, tokens=self._class_tokens(name)).cpu()

    def _cached_text_blocks(self) -> list[int]:
        """The text blocks whose class-prompt states are read in one pass and kept: every block
        an edit of a candidate tensor can start at, if the states of both domains' prompts fit
        `hidden_cache_bytes` (measured on one prompt), else none (a text edit then encodes the
        prompts in full)."""
        if self._text_blocks is None:
            a = self.adapter
            blocks = sorted({b for n in a.candidate_layers(include_layernorm=True) if (b := a.text_block_of(n)) is not None})
            prompts = sum(len(self._class_tokens(n)) for n in ("retain", "utility"))
            one = a.text_hiddens(self._class_tokens("retain")[:1], blocks[:1])[blocks[0]] if blocks else None
            total = 0 if one is None else one.numel() * one.element_size() * len(blocks) * prompts
            self._text_blocks = blocks if 0 < total <= self.hidden_cache_bytes else []
        return self._text_blocks

    @torch.no_grad()
    def _fill_text(self, name: str) -> None:
        """Every cached text block's states for the class prompts of set `name`'s domain, one
        forward pass (the model must be unedited)."""
        blocks, d = self._cached_text_blocks(), self._domain(name)
        if not blocks or (blocks[0], d) in self._text:
            return
        task = getattr(self.tasks, name)
        key = (tuple(task.classnames), tuple(task.templates))
        if self.shared is not None:
            self._check_shared()  # one model's evaluators: the same candidates, so the same blocks
        states = None if self.shared is None else self.shared.text_states.get(key)
        if states is None:
            states = {b: s.cpu() for b, s in self.adapter.text_hiddens(self._class_tokens(name), blocks).items()}
            if self.shared is not None:
                self.shared.text_states[key] = states
        self._text.update({(b, d): states[b] for b in blocks})

    @torch.no_grad()
    def _classes_from(self, name: str, block: int) -> torch.Tensor:
        """Class embeddings of set `name`'s domain from the prompts' cached states entering text
        block `block` (the bits of `_encode_classes` for any edit of blocks >= `block`)."""
        key = (block, self._domain(name))
        if key not in self._text:
            raise RuntimeError(f"no cached states entering text block {block}: call prepare(edited) on the unedited model first")
        a, task = self.adapter, getattr(self.tasks, name)
        emb = a.encode_tokens_from(self._text[key].to(a.device), block, self._class_tokens(name))
        return class_means(emb, len(task.classnames)).cpu()

    def _edited_classes(self, name: str, edited: str) -> torch.Tensor:
        """Class embeddings after an edit of text tensor `edited`: resumed at its block when the
        states are kept, else encoded in full."""
        block = self.adapter.text_block_of(edited)
        if block is None or block not in self._cached_text_blocks():
            return self._encode_classes(name)
        return self._classes_from(name, block)

    @staticmethod
    def _domain(name: str) -> str:
        return "other" if name == "utility" else "own"  # forget and retain share the target kind's classes

    def prepare(self, edited: str | None = None) -> None:
        """Declare that `edited` is about to be edited from the base weights (the caches are
        filled per set when first needed, or here for every vision block at once; see the class
        docstring)."""
        self._prepared = True
        if edited is not None and self.adapter.image_block_of(edited) is not None:
            for name in SETS:
                self._fill_hidden(name)  # a no-op when the states do not fit (one block at a time, filled when needed)
        if edited is not None and self.adapter.text_block_of(edited) is not None:
            for name in ("retain", "utility"):  # one per domain (forget and retain share theirs)
                self._fill_text(name)  # a no-op when the states do not fit (the prompts encoded in full)

    @torch.no_grad()
    def _fill_hidden(self, name: str) -> None:
        """Every cached block's states for set `name`, one forward pass per batch (the model must
        be unedited)."""
        blocks = self._cached_blocks()
        if not blocks or (blocks[0], name) in self._hidden:
            return
        if self.shared is None:
            self._hidden.update({(b, name): states for b, states in self._read_hiddens(self._images[name], blocks).items()})
            return
        self._check_shared()
        paths, states = getattr(self.tasks, name).paths, self.shared.states
        todo = [i for i, path in enumerate(paths) if not all(b in states.get(path, {}) for b in blocks)]
        if todo:
            read = self._read_hiddens(self._images[name][todo], blocks)
            for j, i in enumerate(todo):
                states.setdefault(paths[i], {}).update({b: read[b][j] for b in blocks})
        for b in blocks:
            self._hidden[(b, name)] = torch.stack([states[path][b] for path in paths])

    def _read_hiddens(self, images: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
        """The states of `images` entering every one of `blocks`, in one forward pass per chunk."""
        parts = [self.adapter.image_hiddens(x, blocks) for x in self._chunks(images)]
        return {b: torch.cat([p[b].cpu() for p in parts]) for b in blocks}

    def _reference_images(self, name: str) -> torch.Tensor:
        """The unedited image embeddings of set `name`; with the one-pass cache, resumed from the
        last cached block's states, filling the cache on the way (the same bits as the full
        forward: a contract test of every family)."""
        blocks = self._cached_blocks()
        if self.shared is None:
            if not blocks:
                return self._encode_images(name, None)
            self._fill_hidden(name)
            return self._resumed(self._hidden[(blocks[-1], name)], blocks[-1])
        self._check_shared()
        self._fill_hidden(name)
        paths, known = getattr(self.tasks, name).paths, self.shared.images
        todo = [i for i, path in enumerate(paths) if path not in known]
        if todo:
            new = (self._resumed(self._hidden[(blocks[-1], name)][todo], blocks[-1]) if blocks
                   else self._batched(self.adapter.encode_images, self._images[name][todo]))
            known.update({paths[i]: new[j] for j, i in enumerate(todo)})
        return torch.stack([known[path] for path in paths])

    def _check_shared(self) -> None:
        """`SharedBase.check` once per evaluator until `reset` (its caches already assume the same
        base weights throughout; a checksum over every parameter is not free on a large model)."""
        if not self._shared_checked:
            self.shared.check(self.adapter)
            self._shared_checked = True

    def _reference_classes(self, name: str) -> torch.Tensor:
        """The unedited class embeddings of set `name`'s domain; with the text cache, resumed
        from the last cached text block's states, filling the cache on the way (the bits of the
        full forward: a contract test of every family)."""
        task = getattr(self.tasks, name)
        blocks = self._cached_text_blocks()
        self._fill_text(name)
        encode = (lambda: self._classes_from(name, blocks[-1])) if blocks else (lambda: self._encode_classes(name))
        if self.shared is None:
            return encode()
        key = (tuple(task.classnames), tuple(task.templates))
        if key not in self.shared.classes:
            self.shared.classes[key] = encode()
        return self.shared.classes[key]

    def _cached_images(self, name: str) -> torch.Tensor:
        if name not in self._image_emb:
            self._image_emb[name] = self._encode_images(name, None)
        return self._image_emb[name]

    def _cached_classes(self, name: str) -> torch.Tensor:
        d = self._domain(name)
        if d not in self._class_emb:
            self._class_emb[d] = self._encode_classes(name)
        return self._class_emb[d]

    stops_early = ("retain", "utility")  # `evaluate` takes `at_least` for these sets (SLUG's search asks for it when an evaluator names a set here)

    @torch.no_grad()
    def evaluate(self, edited: str | None = None, sets: tuple[str, ...] = SETS, reference: bool = False,
                 at_least: dict[str, float] | None = None) -> dict[str, float]:
        """Accuracies of the model as it is now on `sets`.  With `edited` (after `prepare(edited)`
        on the unedited model) only what that tensor can change is recomputed.  `reference`: the
        model is unedited; keep its embeddings as the caches' reference.  `at_least`: per set, a
        top-1 the caller rejects anything below; after a vision-block edit such a set is scored
        chunk by chunk and given up as soon as it cannot reach it (its figures None and
        `<set>_below` True); the figures of a set that can are those of a full scoring (the same
        chunks)."""
        unknown = [n for n in sets if n not in SETS]
        if unknown:
            raise ValueError(f"unknown evaluation sets {unknown}")
        if edited is not None and not self._prepared:
            raise RuntimeError("call prepare(edited) on the unedited model first")
        out: dict[str, float] = {}
        fresh_classes: dict[str, torch.Tensor] = {}
        for name in sets:
            if edited is None or self.adapter.tower(edited) == "text":
                if edited is not None:
                    image_emb = self._cached_images(name)
                else:
                    image_emb = self._reference_images(name) if reference else self._encode_images(name, None)
                d = self._domain(name)
                if d not in fresh_classes:
                    if edited is not None:
                        fresh_classes[d] = self._edited_classes(name, edited)
                    else:
                        fresh_classes[d] = self._reference_classes(name) if reference else self._encode_classes(name)
                class_emb = fresh_classes[d]
            else:
                block, class_emb = self.adapter.image_block_of(edited), self._cached_classes(name)
                floor = (at_least or {}).get(name)
                image_emb = self._encode_until(name, block, class_emb, floor)
                if image_emb is None:
                    out[f"{name}_top1"] = out[f"{name}_top5"] = None
                    out[f"{name}_below"] = True
                    continue
            if reference and edited is None:
                self._image_emb[name], self._class_emb[self._domain(name)] = image_emb, class_emb
            acc = topk_accuracy(image_emb, class_emb, getattr(self.tasks, name).labels)
            out[f"{name}_top1"], out[f"{name}_top5"] = round(acc[1], 6), round(acc[5], 6)
        return out


class ManyEvaluator:
    """Several targets at once (stage `forget_many`): on one part of the evaluation sets, each
    target's own accuracy (its images among every class of its kind), and per kind the accuracy
    on the images of every class that is not a target (identity retain, ImageNet-style)."""

    def __init__(self, adapter: Adapter, eval_dir: str | Path, concepts: list[Concept], part: str, val_fraction: float, seed: int,
                 batch_size: int = 256):
        self.adapter, self.batch_size = adapter, batch_size
        domains = _domains(Path(eval_dir), ("identity", "object", *(c.kind for c in concepts)))
        self.targets: dict[str, tuple[str, int]] = {}
        self._sets: dict[str, tuple[LabelledImages, tuple[str, ...], list[int], torch.Tensor]] = {}
        for kind, (data, templates) in domains.items():
            idx = split_part(data, part, val_fraction, seed)
            self._sets[kind] = (data, templates, [data.labels[i] for i in idx], load_images(adapter, [data.paths[i] for i in idx]))
        for c in concepts:
            self.targets[c.name] = (c.kind, class_index(domains[c.kind][0].classnames, c))

    @torch.no_grad()
    def evaluate(self, names: list[str] | None = None) -> dict:
        """With the targets `names` (default: all given) removed: {"targets": {name: {top1, top5}},
        "retain": {kind: {top1, top5, images}}}, retain over the classes that are not among them."""
        a = self.adapter
        chosen = {n: self.targets[n] for n in (names if names is not None else self.targets)}
        out: dict = {"targets": {}, "retain": {}}
        for kind, (data, templates, labels, images) in self._sets.items():
            image_emb = torch.cat([a.encode_images(images[s : s + self.batch_size]).cpu() for s in range(0, images.shape[0], self.batch_size)])
            class_emb = class_embeddings(a, data.classnames, templates).cpu()
            y = torch.as_tensor(labels)
            ranked = (image_emb @ class_emb.T).topk(5, dim=-1).indices
            hit1, hit5 = ranked[:, 0] == y, (ranked == y[:, None]).any(dim=-1)
            removed = {label for k, label in chosen.values() if k == kind}
            for name, (k, label) in chosen.items():
                if k == kind:
                    m = y == label
                    out["targets"][name] = {"top1": round(float(hit1[m].float().mean()), 6), "top5": round(float(hit5[m].float().mean()), 6), "kind": k}
            keep = torch.tensor([int(v) not in removed for v in labels])
            out["retain"][kind] = {"top1": round(float(hit1[keep].float().mean()), 6), "top5": round(float(hit5[keep].float().mean()), 6),
                                   "images": int(keep.sum())}
        return out
