"""Every unlearning method by name, run the same way on the same data and judged by the same
evaluator: `run_method("salun", adapter, forget, retain, evaluator, kind, params)`.

- SLUG: one gradient pass, the Pareto ranking and the step search on the validation images;
  its time is gradients + ranking + search (the search's own evaluations included).
- Training baselines (FT, GA, GA+FT, SalUn): evaluated on the validation images after every
  epoch; the run stops at the first epoch with FA@1 = 0, else the model of its best epoch
  (lowest FA@1, then FA@5, then highest mean utility) is restored.  Its time is the training time
  up to that epoch plus any setup (SalUn's mask); the per-epoch evaluations are timed apart, not
  counted (the conservative choice for the comparison with SLUG).
- SSD: one shot (two importance passes and the dampening), evaluated once.
A baseline whose loss turns NaN or inf comes back with status "failed" and the error, never
silently dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import safetensors.torch
import torch

from unlearn.errors import UnlearnError
from unlearn.methods import METHODS, check_method  # noqa: F401  (re-exported)
from unlearn.methods import baselines as B
from unlearn.methods import slug as S
from unlearn.models.openclip import ClipAdapter
from unlearn.params import as_config

TRAINING = {"ft": B.finetune, "ga": B.gradient_ascent, "ga_ft": B.ga_ft}


@dataclass
class Outcome:
    """What a method did: status ok | not_forgotten (no validation FA@1 = 0 reached) | failed."""

    status: str
    time_s: dict[str, float]
    epoch: int | None = None                             # the reported epoch (1-based) of a training baseline
    epochs: list[dict] = field(default_factory=list)     # validation figures after every epoch
    details: dict = field(default_factory=dict)          # layer, rho, converged, error, ...


def chunks(pairs: B.Pairs, batch_size: int):
    images, tokens = pairs
    return ((images[s : s + batch_size], tokens[s : s + batch_size]) for s in range(0, images.shape[0], batch_size))


def changed_bytes(base: dict[str, torch.Tensor], adapter: ClipAdapter) -> int:
    """Bytes of a safetensors file holding every tensor the method changed: what one must store
    to ship the unlearned model as an edit of the base model."""
    changed = {n: p.detach().contiguous().cpu() for n, p in adapter.model.named_parameters() if not torch.equal(p.detach().cpu(), base[n])}
    return len(safetensors.torch.save(changed)) if changed else 0


def _best_key(result: dict) -> tuple:
    return (result["forget_top1"], result["forget_top5"], -S.utility_score(result))


class EpochJudge:
    """The per-epoch callback of the training baselines: evaluate on validation, keep the best
    state, stop at the first FA@1 = 0; `finish` restores the reported epoch's weights."""

    def __init__(self, adapter: ClipAdapter, evaluator, started: float):
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


def _slug(adapter, forget, retain, evaluator, kind, params, grad_batch) -> Outcome:
    missing = [k for k in ("rank", "search") if k not in params]
    if missing:
        raise UnlearnError(f"the slug params lack {', '.join(missing)}; copy them from params.yaml's slug section")
    rank = params["rank"]
    cfg = as_config(S.SearchConfig, params["search"], "slug.search")
    t0 = time.perf_counter()
    g_f, _, _ = S.mean_gradient(adapter, adapter.forget_loss, chunks(forget, grad_batch))
    g_r, _, _ = S.mean_gradient(adapter, adapter.retain_loss, chunks(retain, grad_batch))
    t1 = time.perf_counter()
    scores = S.layer_scores(adapter, g_f, g_r, adapter.candidate_layers(bool(rank["include_layernorm"])))
    ranking = S.rank_towers(scores, rank["alignment"])
    layers = S.plan_layers(ranking.front_scores(), ranking.order, cfg.max_layers)
    t2 = time.perf_counter()
    base = evaluator.evaluate()
    directions = S.step_directions(adapter, g_f, layers, cfg, lambda: chunks(retain, grad_batch))
    rows, choice = S.search_layers(adapter, evaluator, directions, layers, cfg, base, kind)
    param = dict(adapter.model.named_parameters())[choice["layer"]]
    with torch.no_grad():
        param.add_(S.edit_delta(param.detach(), directions[choice["layer"]], choice["rho"]))
    t3 = time.perf_counter()
    times = {"gradients": t1 - t0, "rank_layers": t2 - t1, "search": t3 - t2, "unlearn": t3 - t0}
    return Outcome("ok" if choice["converged"] else "not_forgotten", {k: round(v, 3) for k, v in times.items()},
                   details={"layer": choice["layer"], "rho": choice["rho"], "converged": choice["converged"], "evaluations": len(rows),
                            "direction": cfg.direction})


def _ssd(adapter, forget, retain, evaluator, params) -> Outcome:
    cfg = as_config(B.SSDConfig, params, "ssd")
    t0 = time.perf_counter()
    imp_f = B.squared_gradients(adapter, adapter.forget_loss, forget, cfg.batch_size)
    imp_r = B.squared_gradients(adapter, adapter.retain_loss, retain, cfg.batch_size)
    selected = B.ssd(adapter, imp_f, imp_r, cfg.alpha, cfg.dampening)
    t1 = time.perf_counter()
    result = evaluator.evaluate()
    t2 = time.perf_counter()
    return Outcome("ok" if result["forget_top1"] <= 0.0 else "not_forgotten", {"unlearn": round(t1 - t0, 3), "eval": round(t2 - t1, 3)},
                   epochs=[{"epoch": 1, "train_s": round(t1 - t0, 3), **result}], details={"selected": selected})


def _training(name, adapter, forget, retain, evaluator, params, grad_batch) -> Outcome:
    setup: dict = {}
    t0 = time.perf_counter()
    values = dict(params)
    if name == "salun" and "mask_fraction" not in values:
        raise UnlearnError("params.yaml salun lacks mask_fraction (SalUn's: 0.5, the top 50 % of |grad L_f|)")
    fraction = float(values.pop("mask_fraction")) if name == "salun" else None
    cfg = as_config(B.TrainConfig, values, name)
    run: Callable
    if name == "salun":
        g_f, _, _ = S.mean_gradient(adapter, adapter.forget_loss, chunks(forget, grad_batch))
        mask = B.saliency_mask(g_f, fraction)
        setup = {"mask_fraction_kept": round(float(sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())), 6)}
        run = lambda a, f, r, c, cb: B.salun(a, f, r, c, mask, cb)  # noqa: E731
    else:
        run = TRAINING[name]
    setup_s = time.perf_counter() - t0
    judge = EpochJudge(adapter, evaluator, time.perf_counter())
    try:
        run(adapter, forget, retain, cfg, judge)
    except B.Diverged as e:
        return Outcome("failed", {"unlearn": round(setup_s + judge.train_s, 3), "eval": round(judge.eval_s, 3)}, epochs=judge.rows,
                       details={"error": str(e), **setup})
    epoch, train_s, reached = judge.finish()
    return Outcome("ok" if reached else "not_forgotten",
                   {"setup": round(setup_s, 3), "train": round(train_s, 3), "unlearn": round(setup_s + train_s, 3), "eval": round(judge.eval_s, 3)},
                   epoch=epoch, epochs=judge.rows, details=setup)


def run_method(name: str, adapter: ClipAdapter, forget: B.Pairs, retain: B.Pairs, evaluator, kind: str, params: dict,
               grad_batch: int = 128) -> Outcome:
    """Unlearn in place with method `name` and its params section; `evaluator` holds the
    target's validation images (the decisions); report on test images afterwards."""
    check_method(name)
    if name == "slug":
        return _slug(adapter, forget, retain, evaluator, kind, params, grad_batch)
    if name == "ssd":
        return _ssd(adapter, forget, retain, evaluator, params)
    return _training(name, adapter, forget, retain, evaluator, params, grad_batch)
