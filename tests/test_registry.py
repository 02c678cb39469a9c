"""The method registry: names, the per-epoch judge (first FA@1 = 0, else the best epoch's
weights), divergence recorded as failed, and the stored-bytes rule."""

import copy

import pytest
import torch

from unlearn.errors import UnlearnError
from unlearn.methods.registry import EpochJudge, changed_bytes, check_method, check_methods, methods, run_method


class Scripted:
    """Validation results in a fixed order: the judge's logic is what is under test here."""

    def __init__(self, forget_top1):
        self.results = [{"forget_top1": f, "forget_top5": f, "retain_top1": 0.9, "retain_top5": 1.0, "utility_top1": 0.8, "utility_top5": 1.0}
                        for f in forget_top1]

    def evaluate(self):
        return self.results.pop(0)


@pytest.fixture
def model(tiny_clip):
    return copy.deepcopy(tiny_clip)


def test_unknown_method_lists_the_known_ones():
    assert check_method("salun") == "salun"
    with pytest.raises(UnlearnError, match=r"^unknown method 'SLUG'; known methods: ft, ga, ga_ft, salun, slug, ssd$"):
        check_method("SLUG")
    assert list(methods()) == ["ft", "ga", "ga_ft", "salun", "slug", "ssd"]
    assert check_methods(["slug", "ga_ft"]) == ["slug", "ga_ft"]
    with pytest.raises(UnlearnError, match="compare.methods is empty"):
        check_methods([])
    with pytest.raises(UnlearnError, match="names a method twice"):
        check_methods(["ga", "ga"])


def _mark(model, value):
    with torch.no_grad():
        model.model.visual.proj.fill_(value)


def test_judge_stops_at_the_first_zero(model):
    judge = EpochJudge(model, Scripted([0.5, 0.0, 0.0]), 0.0)
    assert judge(0) is False
    _mark(model, 2.0)
    assert judge(1) is True
    epoch, _, reached = judge.finish()
    assert (epoch, reached) == (2, True) and model.model.visual.proj[0, 0].item() == 2.0


def test_judge_restores_the_best_epoch_when_none_reaches_zero(model):
    judge = EpochJudge(model, Scripted([0.5, 0.2, 0.4]), 0.0)
    for epoch, value in enumerate((1.0, 2.0, 3.0)):
        _mark(model, value)
        assert judge(epoch) is False
    epoch, train_s, reached = judge.finish()
    assert (epoch, reached) == (2, False) and train_s > 0
    assert model.model.visual.proj[0, 0].item() == 2.0  # the weights of the reported epoch
    assert [r["epoch"] for r in judge.rows] == [1, 2, 3]


def test_divergence_comes_back_as_failed(model, data):
    forget, retain = data
    with torch.no_grad():
        model.model.visual.proj.fill_(float("nan"))
    out = run_method("ga", model, forget, retain, Scripted([]), "identity", {"lr": 1e-4, "epochs": 2, "batch_size": 16})
    assert out.status == "failed" and "ga diverged" in out.details["error"] and out.epoch is None


def test_unknown_param_of_a_method_is_one_line(model, data):
    forget, retain = data
    with pytest.raises(UnlearnError, match="params.yaml ga has unknown keys lr_max"):
        run_method("ga", model, forget, retain, Scripted([]), "identity", {"lr_max": 1e-4})


def test_stored_bytes_count_only_changed_tensors(model):
    base = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    assert changed_bytes(base, model) == 0
    proj = model.model.visual.proj
    with torch.no_grad():
        proj.add_(1.0)
    one = changed_bytes(base, model)
    assert proj.numel() * 4 < one < proj.numel() * 4 + 1024
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(1.0)
    total = sum(p.numel() for p in model.model.parameters()) * 4
    assert total < changed_bytes(base, model) < total + 64 * 1024
