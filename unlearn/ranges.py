"""The valid range of every numeric param, checked by stage `check` before any other stage runs,
and the ranges a method's config declares for its own numbers, checked when `as_config` builds it.

An out-of-range number (`curate.retain_size: 0`, `eval.split.val_fraction: 1`, a negative
damping, `ga.lr: 0`...) would otherwise surface late, as an empty set, a division by zero, a
search that never moves or a baseline that trains nothing and reports the base model as its
result.  Each entry names the key and its range (`RANGES` here also what the key does), so the
one-line error says what to write instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from unlearn.errors import UnlearnError
from unlearn.params import lookup


@dataclass(frozen=True)
class Range:
    key: str
    low: float | None = None       # None: unbounded
    high: float | None = None
    low_open: bool = False         # True: low itself is out of range
    high_open: bool = False
    integer: bool = False
    what: str = ""

    def text(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value: object) -> None:
        """The one-line error of an out-of-range `value`, naming the key (and what it does, if said)."""
        if not self.holds(value):
            raise UnlearnError(f"params.yaml {self.key} is {value!r}; it must be {self.text()}" + (f" ({self.what})" if self.what else ""))

    def holds(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))


def _count(key: str, what: str) -> Range:
    return Range(key, 1, integer=True, what=what)


def _share(key: str, what: str) -> Range:
    return Range(key, 0, 1, what=what)


RANGES: tuple[Range, ...] = (
    _count("curate.forget_max", "the cap on forget pairs"),
    _count("curate.retain_size", "the retain pairs shared by every concept"),
    _count("gradients.batch_size", "pairs per batch of the gradient pass"),
    Range("eval.split.val_fraction", 0, 1, low_open=True, high_open=True,
          what="the share of every class's evaluation images used for validation; the rest is the test part"),
    _count("eval.batch_size", "images per evaluation batch"),
    Range("slug.search.rho_start", 0, low_open=True, what="the first relative step of the search"),
    Range("slug.search.rho_max", 0, low_open=True, what="the largest relative step the search tries"),
    _count("slug.search.max_layers", "layers the search tries"),
    _count("slug.search.evals_per_layer", "evaluations per layer"),
    Range("slug.search.rho_tolerance", 0, 1, low_open=True, what="the bisection's relative tolerance"),
    Range("slug.search.rho_margin", 1, what="the factor the edit steps past the smallest passing rho"),
    Range("slug.search.damping", 0, low_open=True, what="the damping of the retain-preconditioned direction"),
    _share("slug.search.forget_top1", "the forget criterion's FA@1 bound"),
    _share("slug.search.forget_top5", "the forget criterion's FA@5 bound"),
    _share("slug.search.max_identity_drop", "the identity guard"),
    _share("slug.search.max_object_drop", "the object guard"),
    _share("slug.search.max_style_drop", "the style guard"),
    Range("vlm.search.damping", 0, low_open=True, what="the VLM search's damping"),
    _share("vlm.search.forget_rate", "the VLM's forget criterion"),
    _share("vlm.search.max_identity_drop", "the VLM's identity guard"),
    _share("vlm.search.max_object_drop", "the VLM's object guard"),
    Range("sd.search.damping", 0, low_open=True, what="the diffusion search's damping"),
    _share("sd.search.forget_rate", "the diffusion forget criterion"),
    _share("sd.search.max_drop", "the diffusion guard"),
    _share("sd.search.prompt_moments", "the weight of the pipeline's prompts in the retain moments"),
    _count("sd.search.images_per_prompt", "validation drawings per guard prompt"),
    _count("sd.search.forget_images_per_prompt", "validation drawings per prompt naming the target"),
    _count("sd.search.steps", "DDIM steps of the validation drawings"),
    Range("sd.search.rho_tolerance", 0, 1, high_open=True, what="the diffusion search's bisection tolerance"),
    _count("sd.sample.steps", "DDIM steps"),
    _count("sd.sample.images_per_prompt", "test drawings per prompt"),
)
KEYS = tuple(r.key for r in RANGES)


# the bounds a config dataclass may declare for its numeric fields, as a class variable
# `RANGES: ClassVar[dict[str, str]] = {"lr": "> 0", "mask_fraction": "(0, 1]"}`; `as_config`
# checks them (a number out of its bound, NaN or inf is a one-line error naming the params key)
BOUNDS = {"> 0": {"low": 0, "low_open": True}, ">= 0": {"low": 0}, "(0, 1]": {"low": 0, "high": 1, "low_open": True},
          "[0, 1]": {"low": 0, "high": 1}, "[0, 1)": {"low": 0, "high": 1, "high_open": True}}


def check_fields(cfg: object, key: str) -> None:
    """The fields `type(cfg).RANGES` bounds, each within its bound, else `params.yaml <key>.<field>
    is <value>; it must be <range>`."""
    for name, bound in getattr(type(cfg), "RANGES", {}).items():
        if bound not in BOUNDS:
            raise ValueError(f"{type(cfg).__name__}.RANGES bounds {name} by {bound!r}; use one of {', '.join(BOUNDS)}")
        Range(f"{key}.{name}", **BOUNDS[bound]).check(getattr(cfg, name))


def check_ranges(params: object) -> None:
    """Stop with one line at the first param out of its range (`params`: a dict or a StageParams)."""
    get = params if callable(params) else (lambda key: lookup(params, key))
    for r in RANGES:
        r.check(get(r.key))
    if get("slug.search.rho_max") < get("slug.search.rho_start"):
        raise UnlearnError(f"params.yaml slug.search.rho_max ({get('slug.search.rho_max')}) is below slug.search.rho_start "
                           f"({get('slug.search.rho_start')}); it must be >= it")
