"""Many concepts at once (stage `forget_many`): SLUG finds each concept's one-layer edit on the
base model independently (the shared retain statistics, each concept's own validation images);
the edits of the first k concepts are added up and the combined model is judged on every target
and on what is not a target.

The sum is checked on validation: every target must pass the forget criterion (FA@1 <= ..,
FA@5 <= ..) and the classes that are not targets the utility guard (identity retain and
ImageNet-style @1 within the search's bounds of the base model).  When it does not, one common
scale s multiplies every edit (the joint re-search): s grows (1.25, 1.5, 2) while a target is
still recognised, or shrinks (0.9, 0.8, 0.7) while the guard fails and every target stays
forgotten.  Every tried s is recorded; the figures on test are those of the kept s.

The joint mode searches one edit for the first k concepts together: the forget gradient over the
union of their forget sets, and SLUG's search judged by `JointEvaluator`: the forget criterion on
the worst target (each target's validation images scored apart, as the sum's check does), the
guard on the classes that are not targets (`joint_tasks`).  It needs targets of one kind (one
classifier, one guard).

The cumulative mode finds each concept's edit on the model that holds the previous ones (as the
sequential mode), but judges its search as the joint search does (the worst of every target so
far, the guard on the classes that are not among them) and guards it against the unedited model
(`BaseGuard`): the guard's bound then holds for the losses of all the edits together, where the
sequential mode grants it to each edit anew.  Also one kind of concept.

The kept mode adds up edits as the sum does, but finds each of the first k concepts' edits with
the retain input moments pooled with those of the pairs of every concept of the table that is not
among the first k (`unlearn.methods.kept.pool_moments`: every pair counted once, as if the kept concepts' pairs were
retain pairs).  The retain-preconditioned direction g_f (C + lam I)^-1 then moves little what
those concepts' inputs read, so the edits of several targets leave the concepts that stay
alone together, not only one at a time.  Only the moments change (g_r, the ranking and the
search do not), so it needs `slug.search.direction: retain_preconditioned`; any kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from unlearn.data.curate import Concept
from unlearn.errors import UnlearnError
from unlearn.eval.suite import SETS, ConceptTasks, Evaluator, ManyEvaluator, Task, concept_tasks
from unlearn.methods.slug import BOUND, SearchConfig

UP, DOWN = (1.25, 1.5, 2.0), (0.9, 0.8, 0.7)
MODES = ("sum", "sequential", "joint", "cumulative", "kept")
ONE_KIND = ("joint", "cumulative")   # modes whose search judges every target with one classifier and one guard


def check_modes(modes: Sequence[str], concepts: Sequence[Concept], direction: str) -> tuple[str, ...]:
    """`forget_many.modes`, checked against MODES, (for joint and cumulative) the concepts' kinds
    and (for kept, which changes the preconditioner only) `slug.search.direction`."""
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise UnlearnError(f"forget_many.modes is {list(modes)}; list some of {', '.join(MODES)}, each once")
    kinds = sorted({c.kind for c in concepts})
    one_kind = [m for m in modes if m in ONE_KIND]
    if one_kind and len(kinds) > 1:
        raise UnlearnError(f"forget_many.modes has {', '.join(one_kind)} but forget_many.concepts mixes kinds ({', '.join(kinds)}): their searches "
                           f"judge targets of one kind; list concepts of one kind or drop {', '.join(one_kind)} from forget_many.modes")
    if "kept" in modes and direction != "retain_preconditioned":
        raise UnlearnError(f"forget_many.modes has kept, which changes the retain-preconditioned direction's moments only, but "
                           f"slug.search.direction is {direction}: drop kept from forget_many.modes or set slug.search.direction=retain_preconditioned")
    return modes


def joint_tasks(eval_dir, concepts: Sequence[Concept], part: str, val_fraction: float, seed: int) -> ConceptTasks:
    """SLUG's evaluation sets for several targets of one kind searched as one: forget = every
    target's images (each labelled with its own class), retain = the images of the kind's classes
    that are not targets, utility = the other kind's set (as `concept_tasks` for one target)."""
    return merge_tasks([concept_tasks(eval_dir, c, part, val_fraction, seed) for c in concepts])


def merge_tasks(per: Sequence[ConceptTasks]) -> ConceptTasks:
    """`joint_tasks` from each target's own `concept_tasks`."""
    first, removed = per[0], {t.target for t in per}
    forget = Task([p for t in per for p in t.forget.paths], [y for t in per for y in t.forget.labels], first.forget.classnames, first.forget.templates)
    keep = [i for i, y in enumerate(first.retain.labels) if y not in removed]
    retain = Task([first.retain.paths[i] for i in keep], [first.retain.labels[i] for i in keep], first.retain.classnames, first.retain.templates)
    return ConceptTasks(forget, retain, first.utility, first.target)


class JointEvaluator:
    """SLUG's evaluator (the `Evaluator` interface the search uses) for several targets of one
    kind: forget_top1/top5 of the worst target, each target's validation images scored apart (a
    union's mean would let one target stay recognised), retain and utility over the classes that
    are not targets."""

    def __init__(self, adapter, eval_dir, concepts: Sequence[Concept], part: str, val_fraction: float, seed: int, batch_size: int = 256):
        per = [concept_tasks(eval_dir, c, part, val_fraction, seed) for c in concepts]
        self.joint = Evaluator(adapter, merge_tasks(per), batch_size)
        # one evaluator per target whose only set that is ever scored is its forget set (the Evaluator
        # loads three sets: the forget set stands in for the other two)
        self.each = [Evaluator(adapter, ConceptTasks(t.forget, t.forget, t.forget, t.target), batch_size) for t in per]

    def reset(self) -> None:
        for e in (self.joint, *self.each):
            e.reset()

    def prepare(self, edited: str | None = None) -> None:
        for e in (self.joint, *self.each):
            e.prepare(edited)

    def evaluate(self, edited: str | None = None, sets: tuple[str, ...] = SETS, reference: bool = False) -> dict[str, float]:
        others = tuple(s for s in sets if s != "forget")
        out = self.joint.evaluate(edited, others, reference) if others else {}
        if "forget" in sets:
            per = [e.evaluate(edited, ("forget",), reference) for e in self.each]
            out = {"forget_top1": max(p["forget_top1"] for p in per), "forget_top5": max(p["forget_top5"] for p in per), **out}
        return out


class BaseGuard:
    """An evaluator whose reference figures (what SLUG's guard compares a step with, read by the
    search from `evaluate(reference=True)`) are `base`, the unedited model's, instead of the model's
    as it is now; the forget figures and the caches are the inner evaluator's."""

    def __init__(self, inner, base: dict[str, float]):
        self.inner, self.base = inner, {k: v for k, v in base.items() if not k.startswith("forget_")}

    def reset(self) -> None:
        self.inner.reset()

    def prepare(self, edited: str | None = None) -> None:
        self.inner.prepare(edited)

    def evaluate(self, edited: str | None = None, sets: tuple[str, ...] = SETS, reference: bool = False) -> dict[str, float]:
        out = self.inner.evaluate(edited, sets, reference)
        return {**out, **{k: v for k, v in self.base.items() if k in out}} if reference else out


@dataclass(frozen=True)
class ConceptEdit:
    name: str
    layer: str
    delta: torch.Tensor


def set_sum(adapter, base: dict[str, torch.Tensor], edits: Sequence[ConceptEdit], scale: float) -> None:
    """The model's weights := base + scale x the sum of `edits` (edits of one layer add up)."""
    params = dict(adapter.model.named_parameters())
    with torch.no_grad():
        for name in {e.layer for e in edits} | set(base):
            params[name].copy_(base[name])
        for e in edits:
            params[e.layer].add_(scale * e.delta.to(params[e.layer]))


def forget_ok_all(result: dict, cfg: SearchConfig) -> bool:
    return all(t["top1"] <= cfg.forget_top1 + 1e-9 and (t["kind"] not in cfg.top5_kinds or t["top5"] <= cfg.forget_top5 + 1e-9)
               for t in result["targets"].values())


def guard_ok_all(result: dict, base: dict, cfg: SearchConfig) -> bool:
    return all(r["top1"] >= base["retain"][k]["top1"] - getattr(cfg, BOUND[k]) - 1e-9 for k, r in result["retain"].items())


def combine(evaluate: Callable[[float], dict], base_val: dict, cfg: SearchConfig) -> tuple[float, list[dict]]:
    """The common scale of the summed edits (see the module docstring) and every trial."""
    trials = []

    def trial(s: float) -> dict:
        r = evaluate(s)
        trials.append({"scale": s, "forget_ok": forget_ok_all(r, cfg), "guard_ok": guard_ok_all(r, base_val, cfg), **r})
        return trials[-1]

    first = trial(1.0)
    if first["forget_ok"] and first["guard_ok"]:
        return 1.0, trials
    if not first["forget_ok"]:
        for s in UP:
            if trial(s)["forget_ok"]:
                return s, trials
        return UP[-1], trials
    kept = 1.0
    for s in DOWN:
        t = trial(s)
        if not t["forget_ok"]:
            break
        kept = s
        if t["guard_ok"]:
            break
    return kept, trials


def judge(adapter, base: dict[str, torch.Tensor], edits: Sequence[ConceptEdit], val: ManyEvaluator, test: ManyEvaluator,
          cfg: SearchConfig, base_val: dict, base_test: dict) -> dict:
    """The first len(edits) concepts removed together: combined figures on validation (the scale
    decision, against `base_val`, the unedited model's `val.evaluate(names)`) and test (reported,
    with `base_test` beside them).  Leaves the model at the base weights."""
    names = [e.name for e in edits]

    def evaluate(s: float) -> dict:
        set_sum(adapter, base, edits, s)
        return val.evaluate(names)

    scale, trials = combine(evaluate, base_val, cfg)
    set_sum(adapter, base, edits, scale)
    after = test.evaluate(names)
    kept = next(t for t in trials if t["scale"] == scale)
    set_sum(adapter, base, edits, 0.0)
    return {"k": len(edits), "concepts": names, "scale": scale, "rescaled": scale != 1.0, "converged": kept["forget_ok"] and kept["guard_ok"],
            "trials": [{k: t[k] for k in ("scale", "forget_ok", "guard_ok")} for t in trials],
            "validation": {k: kept[k] for k in ("targets", "retain")}, "test": after, "base_test": base_test}
