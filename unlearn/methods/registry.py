"""Every unlearning method by name, run the same way on the same data and judged by the same
evaluator: `run_method("salun", adapter, forget, retain, evaluator, kind, params)`.

A method is one file in `unlearn/methods/` that calls `register(name, config, run)`: `config`
builds the method's config from its own section of params.yaml (a dataclass: unknown or missing
keys are one-line errors), `run(ctx, cfg)` unlearns in place and returns an `Outcome`.  The
registry finds the files itself (every module of the package is imported once), so adding a
method touches no other file (README "Adding a method").

Shared rules:
- Training baselines are evaluated on the validation images after every epoch
  (`run_training`, `EpochJudge`): the run stops at the first epoch with FA@1 = 0, else the
  model of its best epoch (lowest FA@1, then FA@5, then highest mean utility) is restored.
  Their time is the training time up to that epoch plus any setup (SalUn's mask); the per-epoch
  evaluations are timed apart, not counted (the conservative choice for the comparison with SLUG).
- A baseline whose loss turns NaN or inf comes back with status "failed" and the error, never
  silently dropped.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import safetensors.torch
import torch

from unlearn.errors import UnlearnError
from unlearn.models.adapter import Adapter
from unlearn.params import as_config

Pairs = tuple[torch.Tensor, torch.Tensor]  # (preprocessed images, tokens)


class Diverged(UnlearnError):
    """A baseline's loss became NaN or inf: the run stops and is recorded as failed."""


@dataclass
class Outcome:
    """What a method did: status ok | not_forgotten (no validation FA@1 = 0 reached) | failed."""

    status: str
    time_s: dict[str, float]
    epoch: int | None = None                             # the reported epoch (1-based) of a training baseline
    epochs: list[dict] = field(default_factory=list)     # validation figures after every epoch
    details: dict = field(default_factory=dict)          # layer, rho, converged, error, ...


@dataclass(frozen=True)
class Context:
    """What every method is given: the model (edited in place), the forget and retain pairs, the
    evaluator of the target's validation images, the target's kind, the gradient batch size."""

    adapter: Adapter
    forget: Pairs
    retain: Pairs
    evaluator: object
    kind: str
    grad_batch: int = 128
    retain_stats: object = None   # SLUG's shared retain statistics (unlearn.methods.retain_stats), None: computed from `retain`
    retain_moments: object = None  # SLUG's kept moments of this concept, over `retain_stats` (`TableMoments.kept_source`), None: none given


@dataclass(frozen=True)
class Method:
    name: str
    config: Callable[[dict, str], object]   # (params section, its key) -> config
    run: Callable[[Context, object], Outcome]
    summary: str


_METHODS: dict[str, Method] = {}
_DISCOVERED = False


def register(name: str, config: type | Callable[[dict, str], object], summary: str) -> Callable:
    """Decorator of a method's `run(ctx, cfg)`.  `config` is a dataclass (built with
    `as_config`) or a function (params section, key) -> config."""

    def wrap(run: Callable[[Context, object], Outcome]) -> Callable:
        if name in _METHODS and _METHODS[name].run is not run:
            raise RuntimeError(f"method {name!r} is registered twice")
        build = (lambda values, key: as_config(config, values, key)) if dataclasses.is_dataclass(config) else config
        _METHODS[name] = Method(name, build, run, summary)
        return run

    return wrap


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        import unlearn.methods as package

        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
        _DISCOVERED = True


def methods() -> dict[str, Method]:
    _discover()
    return dict(sorted(_METHODS.items()))


def check_method(name: str) -> str:
    known = methods()
    if name not in known:
        raise UnlearnError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    return name


def check_methods(names: list, key: str = "compare.methods") -> list[str]:
    """A list of method names: non-empty, each known, none twice."""
    if not names:
        raise UnlearnError(f"{key} is empty; list methods from: {', '.join(methods())}")
    chosen = [check_method(str(n)) for n in names]
    if len(set(chosen)) != len(chosen):
        raise UnlearnError(f"{key} names a method twice: {', '.join(chosen)}")
    return chosen


def run_method(name: str, adapter: Adapter, forget: Pairs, retain: Pairs, evaluator, kind: str, params: dict,
               grad_batch: int = 128, retain_stats=None, retain_moments=None) -> Outcome:
    """Unlearn in place with method `name` and its params section; `evaluator` holds the
    target's validation images (the decisions); report on test images afterwards.
    `retain_stats`: statistics of `retain` computed once for every concept (SLUG reads them);
    `retain_moments`: SLUG's kept moments of this concept (`Context.retain_moments`)."""
    method = methods()[check_method(name)]
    return method.run(Context(adapter, forget, retain, evaluator, kind, grad_batch, retain_stats, retain_moments), method.config(params, name))


# ---------------------------------------------------------------- shared by the methods

def chunks(pairs: Pairs, batch_size: int):
    images, tokens = pairs
    return ((images[s : s + batch_size], tokens[s : s + batch_size]) for s in range(0, images.shape[0], batch_size))


def changed_bytes(base: dict[str, torch.Tensor], adapter: Adapter) -> int:
    """Bytes of a safetensors file holding every tensor the method changed: what one must store
    to ship the unlearned model as an edit of the base model."""
    changed = {n: p.detach().contiguous().cpu() for n, p in adapter.model.named_parameters() if not torch.equal(p.detach().cpu(), base[n])}
    return len(safetensors.torch.save(changed)) if changed else 0


def utility_score(result: dict) -> float:
    return (result["retain_top1"] + result["utility_top1"]) / 2


def _best_key(result: dict) -> tuple:
    return (result["forget_top1"], result["forget_top5"], -utility_score(result))


class EpochJudge:
    """The per-epoch callback of the training baselines: evaluate on validation, keep the best
    state, stop at the first FA@1 = 0; `finish` restores the reported epoch's weights."""

    def __init__(self, adapter: Adapter, evaluator, started: float):
        self.adapter, self.evaluator = adapter, evaluator
        self.mark = started
        self.train_s = self.eval_s = 0.0
        self.rows: list[dict] = []
        self.best: tuple | None = None  # (key, epoch, train time, state)

    def __call__(self, epoch: int) -> bool:
        self.train_s += time.perf_counter() - self.mark
        t = time.perf_counter()
        result = self.evaluator.evaluate()
        self.eval_s += time.perf_counter() - t
        self.rows.append({"epoch": epoch + 1, "train_s": round(self.train_s, 3), **result})
        if self.best is None or _best_key(result) < self.best[0]:
            state = {k: v.detach().clone() for k, v in self.adapter.model.state_dict().items()}
            self.best = (_best_key(result), epoch + 1, self.train_s, state)
        self.mark = time.perf_counter()
        return result["forget_top1"] <= 0.0

    def finish(self) -> tuple[int, float, bool]:
        """(reported epoch, training time up to it, whether it reached FA@1 = 0)."""
        if self.best is None:
            raise UnlearnError("the baseline ran no epoch; set its epochs >= 1")
        key, epoch, train_s, state = self.best
        if epoch != self.rows[-1]["epoch"]:
            self.adapter.model.load_state_dict(state)
        return epoch, train_s, key[0] <= 0.0


def run_training(ctx: Context, train: Callable[[Callable[[int], bool]], object], setup: Callable[[], dict] | None = None) -> Outcome:
    """A training baseline under the shared rules: `setup()` (timed as part of unlearning, e.g.
    SalUn's mask) returns details for the row; `train(on_epoch)` trains, calling the judge after
    every epoch."""
    t0 = time.perf_counter()
    details = setup() if setup is not None else {}
    setup_s = time.perf_counter() - t0
    judge = EpochJudge(ctx.adapter, ctx.evaluator, time.perf_counter())
    try:
        train(judge)
    except Diverged as e:
        return Outcome("failed", {"unlearn": round(setup_s + judge.train_s, 3), "eval": round(judge.eval_s, 3)}, epochs=judge.rows,
                       details={"error": str(e), **details})
    epoch, train_s, reached = judge.finish()
    return Outcome("ok" if reached else "not_forgotten",
                   {"setup": round(setup_s, 3), "train": round(train_s, 3), "unlearn": round(setup_s + train_s, 3), "eval": round(judge.eval_s, 3)},
                   epoch=epoch, epochs=judge.rows, details=details)
