"""The model-family protocol: everything SLUG, the evaluator, membership inference and the
baselines may ask of a model, and the registry that picks the adapter of a saved model.

A *family* is one way of building and running a CLIP-like model (open_clip, transformers'
CLIPModel, ...).  Each family is one module with one `Adapter` subclass, named in `FAMILIES`.
Every saved model records its family beside its weights (`unlearn_model.json`), so one call,
`load(directory)`, gives the right adapter back.  Callers never import a family's module: they
hold an `Adapter` and use only the methods below.

What the protocol covers (docs/families.md "Model families"):
- files: `save`, `load`, the weights' fingerprint (`fingerprint(directory)`);
- inputs: `preprocess` (a PIL image to a tensor), `tokenize` (strings to a [B, L] LongTensor on
  the CPU);
- encoders: `encode_images`, `encode_tokens`, `encode_texts`, `logit_scale`;
- losses: `forget_loss` (1 - cos of each pair) and `retain_loss` (the symmetric CLIP loss), also
  the contrastive training step (`retain_loss` + `clamp_logit_scale`);
- tensors: `towers`, `tower(name)`, `candidate_layers`, `short_name`, `input_layout`;
- caches: `image_block_of`, `image_hidden`, `image_hiddens`, `encode_images_from` (resume the
  vision tower at a block, so an edit of block b re-runs only blocks b..; `image_hiddens` gives
  the states entering several blocks from one forward pass);
- input statistics: `feed_inputs` runs the towers over batches and reports the input each
  candidate tensor multiplies (for the retain-preconditioned direction).
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from unlearn.errors import UnlearnError
from unlearn.io import sha256_file

FAMILY_FILE = "unlearn_model.json"
# family name -> "module:class".  A new family is one module and one line here.
FAMILIES: dict[str, str] = {
    "open_clip": "unlearn.models.openclip:OpenClipAdapter",
    "hf_clip": "unlearn.models.hf_clip:HFClipAdapter",
}
LAYOUTS = ("linear", "matmul", "scale", "rows")
Record = Callable[[str, torch.Tensor], None]


class _TowerDone(Exception):
    """Raised inside a forward once every asked tensor of the tower has reported its input."""


def check_family(name: str) -> str:
    if name not in FAMILIES:
        raise UnlearnError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)} (params.yaml model.family)")
    return name


def adapter_class(family: str) -> type[Adapter]:
    module, _, cls_name = FAMILIES[check_family(family)].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if cls.family != family:
        raise RuntimeError(f"{cls.__name__}.family is {cls.family!r}, registered as {family!r}")
    return cls


def read_family(directory: str | Path) -> dict:
    """The family record of a saved model; a folder without one is a one-line error."""
    directory = Path(directory)
    path = directory / FAMILY_FILE
    if not directory.is_dir():
        raise UnlearnError(f"model folder {directory} does not exist; run the base_model stage (dvc repro base_model)")
    if not path.is_file():
        raise UnlearnError(f"{directory} has no {FAMILY_FILE}, so its model family is unknown; re-create it with the base_model stage "
                           f"(or save it through unlearn.models.adapter)")
    try:
        info = json.loads(path.read_text())
        family = info["family"]
    except (ValueError, KeyError, TypeError):
        raise UnlearnError(f"{path} is not a family record (JSON with a 'family' key); re-create the model folder") from None
    check_family(family)
    return info


def load(directory: str | Path, device: str | torch.device = "cpu") -> Adapter:
    """The saved model in `directory` through the adapter of its recorded family."""
    info = read_family(directory)
    return adapter_class(info["family"]).load(directory, device)


def fingerprint(directory: str | Path) -> str:
    """A hash of the model's weight files (those its family record lists): what gradient files
    and patches are checked against.  One file: its sha256."""
    info = read_family(directory)
    files = [Path(directory) / f for f in info.get("weights", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise UnlearnError(f"{directory}: weight files {missing or '(none recorded)'} missing; re-create the model folder")
    if len(files) == 1:
        return sha256_file(files[0])
    import hashlib

    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def check_made_for(what: str, recorded: dict, model_dir: str | Path, fix: str) -> None:
    """A gradient file or patch records the family and fingerprint of its model: refuse it for
    another family or another model, naming `what` and the `fix`."""
    family = read_family(model_dir)["family"]
    if recorded.get("family", "open_clip") != family:  # files written before families existed are open_clip's
        raise UnlearnError(f"{what} was made for a {recorded.get('family')} model, but {model_dir} is {family}; {fix}")
    want = fingerprint(model_dir)
    if recorded.get("model_sha256") != want:
        raise UnlearnError(f"{what} was made for another model (hash {str(recorded.get('model_sha256'))[:12]}, "
                           f"{model_dir} is {want[:12]}); {fix}")


def read_inputs(entries: dict[int, nn.Module], run: Callable[[], Any],
                adapt: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """The first input of each module of `entries` (key -> module) during one call of `run`
    (forward pre-hooks, removed after), through `adapt(module, x)` if given: how a family's
    `text_hiddens` reads the states entering its blocks in one pass of its own forward."""
    captured: dict[int, torch.Tensor] = {}

    def reader(key: int):
        return lambda module, args: captured.__setitem__(key, args[0] if adapt is None else adapt(module, args[0]))

    handles = [m.register_forward_pre_hook(reader(k)) for k, m in entries.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {k: captured[k] for k in entries}


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The symmetric CLIP contrastive loss over a batch (each image's own caption is its label),
    with the same operations as open_clip's `ClipLoss` on one process."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device, dtype=torch.long)
    return (nn.functional.cross_entropy(logits_per_image, labels) + nn.functional.cross_entropy(logits_per_text, labels)) / 2


class Adapter(abc.ABC):
    """One model of one family.  Subclasses set the class attributes and implement the abstract
    methods; everything else is shared."""

    family: ClassVar[str]
    library: ClassVar[str]                 # the package the family's models come from (its version is recorded)
    weights: ClassVar[tuple[str, ...]]     # the weight files `save` writes (fingerprinted)
    towers: ClassVar[tuple[str, ...]] = ("image", "text")

    model: nn.Module

    # ------------------------------------------------------------------ files

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, pretrained: str, cache_dir: str | None = None, **model_params: Any) -> Adapter:
        """The family's published or local weights (`model.pretrained`); `model_params` are the
        other `model.*` params a family may need (open_clip: `arch`, `quick_gelu`)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Adapter:
        """The model saved in `directory` by `save` (weights from safetensors only)."""

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> None:
        """Write the family's own files (weights, configs, tokenizer) into `directory`."""

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        try:
            version = metadata.version(self.library)
        except metadata.PackageNotFoundError:
            version = None
        record = {"family": self.family, "library": self.library, "version": version, "class": type(self).__name__,
                  "weights": list(self.weights)}
        (directory / FAMILY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ inputs and encoders

    @abc.abstractmethod
    def preprocess(self, image: Any) -> torch.Tensor:
        """A PIL image as the model's input tensor [3, H, W]."""

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Captions as a [B, L] LongTensor on the CPU (fixed length L)."""

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, D] image embeddings."""

    @abc.abstractmethod
    def encode_tokens(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, D] text embeddings of already-tokenized texts."""

    def encode_texts(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts), normalize=normalize)

    @property
    @abc.abstractmethod
    def logit_scale_param(self) -> nn.Parameter:
        """The learnt log temperature (a scalar parameter)."""

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.logit_scale_param.exp()

    # ------------------------------------------------------------------ losses and training

    def forget_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean of (1 - cos(v_i, t_i)) over the batch, each image with its own caption."""
        v = self.encode_images(images.to(self.device), normalize=True)
        t = self.encode_tokens(tokens.to(self.device), normalize=True)
        return (1.0 - (v * t).sum(dim=-1)).mean()

    def retain_loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The symmetric CLIP contrastive loss over the batch at scale exp(logit_scale)."""
        v = self.encode_images(images.to(self.device), normalize=True)
        t = self.encode_tokens(tokens.to(self.device), normalize=True)
        return clip_loss(v, t, self.logit_scale)

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """After an optimiser step of contrastive training: keep exp(logit_scale) in [1, max]."""
        self.logit_scale_param.clamp_(0, math.log(max_scale))

    # ------------------------------------------------------------------ tensors

    @abc.abstractmethod
    def tower(self, name: str) -> str:
        """Which of `towers` the parameter `name` belongs to."""

    @abc.abstractmethod
    def candidate_layers(self, include_layernorm: bool = False) -> list[str]:
        """The parameters SLUG may edit: weight matrices (LayerNorm weights on request); never
        biases, token/positional/patch embeddings or the temperature."""

    def short_name(self, name: str) -> str:
        """A short label for plots and logs."""
        return name.removesuffix(".weight")

    def input_layout(self, name: str) -> str:
        """How tensor `name` meets its input x: `linear` (y = x W^T), `matmul` (y = x @ W),
        `scale` (a LayerNorm weight, y = w * x_hat) or `rows` (an embedding table read row by row,
        y = W[token]: `matmul` with a one-hot x, whose second moment is diagonal, the tokens'
        frequencies).  Shared rule: the weight of an nn.Linear is `linear`, of an nn.LayerNorm
        `scale`, of an nn.Embedding `rows`; families override for other modules."""
        owner, _, leaf = name.rpartition(".")
        module = dict(self.model.named_modules()).get(owner)
        if leaf == "weight" and isinstance(module, nn.Linear):
            return "linear"
        if leaf == "weight" and isinstance(module, nn.LayerNorm):
            return "scale"
        if leaf == "weight" and isinstance(module, nn.Embedding):
            return "rows"
        raise UnlearnError(f"no input statistics for tensor {name!r} (not a linear layer, attention projection, tower projection "
                           "or LayerNorm weight); set slug.search.direction=gradient to edit it")

    # ------------------------------------------------------------------ partial forwards (caches)

    @abc.abstractmethod
    def image_block_of(self, name: str) -> int | None:
        """The first vision block an edit of `name` changes (the block count for the pooling
        head), or None when the edit changes the text side only or the whole vision tower."""

    @abc.abstractmethod
    def image_hidden(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The vision tower's hidden states entering `block` (batch first)."""

    def image_hiddens(self, images: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """`{b: image_hidden(images, b)}` for every b of `blocks`, bit for bit.  This default
        runs one partial forward per block; a family overrides it with one forward pass that
        reads every block's input on the way (what the evaluator's cache fills with)."""
        return {b: self.image_hidden(images, b) for b in blocks}

    @abc.abstractmethod
    def encode_images_from(self, hidden: torch.Tensor, block: int, normalize: bool = True) -> torch.Tensor:
        """Image embeddings from hidden states entering `block`: equal to `encode_images` of
        the images `image_hidden` was given, for any edit of blocks >= `block`."""

    @abc.abstractmethod
    def text_block_of(self, name: str) -> int | None:
        """The first text block an edit of `name` changes (the block count for the final norm
        and the projection), or None when the edit changes the image side only or the whole
        text tower (the token and positional embeddings, which are never candidates)."""

    @abc.abstractmethod
    def text_hiddens(self, tokens: torch.Tensor, blocks: Sequence[int]) -> dict[int, torch.Tensor]:
        """The text tower's states entering each of `blocks` (batch first; block count: the
        final norm's input), read in one forward pass of the family's own text encoder."""

    @abc.abstractmethod
    def encode_tokens_from(self, hidden: torch.Tensor, block: int, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings of `tokens` from their states entering `block` (`text_hiddens`):
        the bits of `encode_tokens(tokens)` for any edit of blocks >= `block`, run through the
        family's own forward with the blocks before `block` skipped (`tokens` give the pooling
        position)."""

    # ------------------------------------------------------------------ input statistics

    @contextlib.contextmanager
    def _capture(self, layers: Sequence[str], record: Record) -> Iterator[None]:
        """While active, every forward reports record(name, x) for each tensor in `layers`,
        x the input it multiplies ([..., in_features]; x_hat for a LayerNorm weight; the token
        ids for an embedding table).  Shared: forward pre-hooks on the owning nn.Linear /
        nn.LayerNorm / nn.Embedding; families extend it."""
        modules = dict(self.model.named_modules())
        handles = []
        try:
            for name in layers:
                layout = self.input_layout(name)
                module = modules[name.rpartition(".")[0]]
                if layout == "scale":
                    handles.append(module.register_forward_pre_hook(
                        lambda m, args, name=name: record(name, nn.functional.layer_norm(args[0], m.normalized_shape, eps=m.eps))))
                elif isinstance(module, (nn.Linear, nn.Embedding)):
                    handles.append(module.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0])))
                else:
                    raise UnlearnError(f"{type(self).__name__} cannot read the inputs of {name!r}; set slug.search.direction=gradient")
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def feed_inputs(self, layers: Sequence[str], batches: Iterable[tuple[torch.Tensor, torch.Tensor]], record: Record) -> int:
        """Run the towers that `layers` belong to over `batches` ((images, tokens)), reporting
        the inputs of each tensor through `record`; returns the number of pairs.  A tower's
        forward stops once every asked tensor of it has reported its input for the batch (each
        tensor is applied once per forward), so the blocks after the deepest one never run: the
        same inputs, bit for bit, as the whole forward (tested for every family)."""
        wanted = {t: {n for n in layers if self.tower(n) == t} for t in ("image", "text")}
        seen: set[str] = set()
        tower = [""]

        def report(name: str, x: torch.Tensor) -> None:
            record(name, x)
            seen.add(name)
            if seen >= wanted[tower[0]]:
                raise _TowerDone

        encode = {"image": "encode_images", "text": "encode_tokens"}  # looked up in the capture: a family may wrap them there
        count = 0
        with self._capture(list(layers), report):
            for images, tokens in batches:
                for tower[0], inputs in (("image", images), ("text", tokens)):
                    if wanted[tower[0]]:
                        seen.clear()
                        try:
                            getattr(self, encode[tower[0]])(inputs.to(self.device), normalize=False)
                        except _TowerDone:
                            pass
                count += images.shape[0]
        return count
