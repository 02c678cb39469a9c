"""Several concepts at once (unlearn/many.py): the joint search's evaluation sets, the modes'
checks and the sum's common-scale search.  The stage itself runs in tests/test_pipeline.py."""

from __future__ import annotations

import pytest

from unlearn.data.curate import Concept
from unlearn.errors import UnlearnError
from unlearn.eval.suite import concept_tasks
from unlearn.many import DOWN, UP, check_modes, combine, joint_tasks
from unlearn.methods.slug import SearchConfig

MUSK, SWIFT = Concept("Elon Musk", "identity"), Concept("Taylor Swift", "identity")
PRECONDITIONED = "retain_preconditioned"


def test_joint_tasks_forget_every_target_and_retain_only_the_others(tiny_world):
    one = {c.name: concept_tasks(tiny_world / "eval", c, "val", 0.34, 0) for c in (MUSK, SWIFT)}
    both = joint_tasks(tiny_world / "eval", [MUSK, SWIFT], "val", 0.34, 0)
    targets = {one[n].target for n in one}
    assert len(targets) == 2
    # forget: both targets' images, each under its own label
    assert both.forget.paths == one[MUSK.name].forget.paths + one[SWIFT.name].forget.paths
    assert set(both.forget.labels) == targets
    # retain: the kind's other images, neither target among them, none lost
    assert not set(both.retain.labels) & targets
    assert len(both.retain.paths) == len(one[MUSK.name].retain.paths) - len(one[SWIFT.name].forget.paths)
    assert set(both.retain.paths) == set(one[MUSK.name].retain.paths) - set(one[SWIFT.name].forget.paths)
    assert both.utility == one[MUSK.name].utility and both.forget.classnames == one[MUSK.name].forget.classnames
    # one target: the single-concept sets
    alone = joint_tasks(tiny_world / "eval", [MUSK], "val", 0.34, 0)
    assert alone == one[MUSK.name]


def test_modes_are_checked():
    assert check_modes(["sum", "joint"], [MUSK, SWIFT], PRECONDITIONED) == ("sum", "joint")
    for bad in ([], ["sum", "sum"], ["summed"]):
        with pytest.raises(UnlearnError, match="forget_many.modes"):
            check_modes(bad, [MUSK], PRECONDITIONED)
    with pytest.raises(UnlearnError, match="mixes kinds \\(identity, object\\).*drop joint"):
        check_modes(["joint"], [MUSK, Concept("rocket", "object")], PRECONDITIONED)
    with pytest.raises(UnlearnError, match="has joint, cumulative but .* mixes kinds .*drop joint, cumulative from forget_many.modes"):
        check_modes(["sum", "joint", "cumulative"], [MUSK, Concept("rocket", "object")], PRECONDITIONED)
    assert check_modes(["sum", "sequential"], [MUSK, Concept("rocket", "object")], PRECONDITIONED) == ("sum", "sequential")


def test_the_kept_mode_needs_the_preconditioned_direction():
    assert check_modes(["sum", "kept"], [MUSK], "retain_preconditioned") == ("sum", "kept")
    assert check_modes(["sum"], [MUSK], "gradient") == ("sum",)
    with pytest.raises(UnlearnError, match="forget_many.modes has kept.*slug.search.direction is gradient: drop kept"):
        check_modes(["sum", "kept"], [MUSK], "gradient")


def _result(top1: float, retain: float) -> dict:
    return {"targets": {"a": {"top1": top1, "top5": top1, "kind": "identity"}},
            "retain": {"identity": {"top1": retain, "top5": retain, "images": 10}, "object": {"top1": 0.9, "top5": 1.0, "images": 10}}}


BASE = _result(1.0, 0.9)


def test_combine_scales_up_while_a_target_is_recognised():
    # forgotten from a scale of 1.5: the first scale that forgets is kept, whatever the guard
    scale, trials = combine(lambda s: _result(0.0 if s >= 1.5 else 0.5, 0.5), BASE, SearchConfig())
    assert scale == 1.5 and [t["scale"] for t in trials] == [1.0, 1.25, 1.5]
    never, trials = combine(lambda s: _result(0.5, 0.9), BASE, SearchConfig())
    assert never == UP[-1] and [t["scale"] for t in trials] == [1.0, *UP] and not trials[-1]["forget_ok"]


def test_combine_scales_down_while_the_guard_fails_and_targets_stay_forgotten():
    # the guard passes from 0.8 down; the targets stay forgotten down to 0.8
    scale, trials = combine(lambda s: _result(0.0, 0.9 if s <= 0.8 else 0.5), BASE, SearchConfig())
    assert scale == 0.8 and trials[-1]["guard_ok"] and [t["scale"] for t in trials] == [1.0, 0.9, 0.8]
    # a target comes back at 0.8 before the guard passes: the last scale that forgets (0.9)
    scale, _ = combine(lambda s: _result(0.0 if s >= 0.9 else 0.5, 0.5), BASE, SearchConfig())
    assert scale == 0.9
    assert combine(lambda s: _result(0.0, 0.9), BASE, SearchConfig())[0] == 1.0
    assert DOWN == tuple(sorted(DOWN, reverse=True))


@pytest.mark.parametrize("layer", ["transformer.resblocks.1.mlp.c_proj.weight", "visual.transformer.resblocks.1.mlp.c_fc.weight"])
def test_joint_evaluator_judges_the_worst_target_and_the_classes_that_are_not_targets(tiny_clip, tiny_world, layer):
    import torch

    from unlearn.eval.suite import Evaluator
    from unlearn.many import JointEvaluator

    eval_dir = tiny_world / "eval"
    # on the tiny model these three differ on validation (FA@1 / FA@5: 0 / 0, 0 / 1, 1 / 1), so the worst target is not the union's mean
    targets = [MUSK, Concept("Emma Watson", "identity"), Concept("Lionel Messi", "identity")]
    joint = JointEvaluator(tiny_clip, eval_dir, targets, "val", 0.34, 0, batch_size=16)
    alone = {c.name: Evaluator(tiny_clip, concept_tasks(eval_dir, c, "val", 0.34, 0), 16) for c in targets}
    rest = Evaluator(tiny_clip, joint_tasks(eval_dir, targets, "val", 0.34, 0), 16)
    p = dict(tiny_clip.model.named_parameters())[layer]
    original = p.detach().clone()
    joint.reset()
    joint.evaluate(reference=True)
    joint.prepare(layer)
    try:
        with torch.no_grad():
            p.add_(0.01 * original.norm() * torch.randn_like(original, generator=torch.Generator().manual_seed(1)) / original.numel() ** 0.5)
        got = joint.evaluate(layer)   # through the caches of an edit
        each = {n: e.evaluate() for n, e in alone.items()}
        full = rest.evaluate()
        assert got["forget_top1"] == max(e["forget_top1"] for e in each.values())
        assert got["forget_top5"] == max(e["forget_top5"] for e in each.values())
        assert got["forget_top1"] > full["forget_top1"] and got["forget_top5"] > full["forget_top5"]   # not the union's mean
        for key in ("retain_top1", "retain_top5", "utility_top1", "utility_top5"):
            assert got[key] == full[key]
        assert set(joint.evaluate(layer, ("forget",))) == {"forget_top1", "forget_top5"}
    finally:
        with torch.no_grad():
            p.copy_(original)


def test_base_guard_reports_the_unedited_models_guard_figures_as_the_reference(tiny_clip, tiny_world):
    """BaseGuard hands SLUG's search the unedited model's retain and utility figures as the guard's
    reference (what `evaluate(reference=True)` returns), while scoring the model as it is now, its
    caches included."""
    import torch

    from unlearn.eval.suite import Evaluator
    from unlearn.many import BaseGuard

    layer = "transformer.resblocks.1.mlp.c_proj.weight"
    inner = Evaluator(tiny_clip, concept_tasks(tiny_world / "eval", MUSK, "val", 0.34, 0), 16)
    unedited = inner.evaluate()
    p = dict(tiny_clip.model.named_parameters())[layer]
    original = p.detach().clone()
    try:
        with torch.no_grad():   # an earlier edit: the model as the next search finds it
            p.add_(2.0 * original.norm() * torch.randn_like(original, generator=torch.Generator().manual_seed(2)) / original.numel() ** 0.5)
        now = inner.evaluate()
        keys = ("retain_top1", "retain_top5", "utility_top1", "utility_top5")
        assert any(now[k] != unedited[k] for k in keys)   # the case is real
        guard = BaseGuard(inner, unedited)
        guard.reset()
        ref = guard.evaluate(reference=True)
        assert {k: ref[k] for k in keys} == {k: unedited[k] for k in keys}
        assert (ref["forget_top1"], ref["forget_top5"]) == (now["forget_top1"], now["forget_top5"])
        guard.prepare(layer)
        assert guard.evaluate(layer) == now     # a step is scored as the model is now, through the caches of the reference
        assert guard.evaluate(layer, ("forget",)) == {"forget_top1": now["forget_top1"], "forget_top5": now["forget_top5"]}
    finally:
        with torch.no_grad():
            p.copy_(original)
