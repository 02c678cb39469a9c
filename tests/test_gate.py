"""The CI gate's rule on `dvc metrics diff` output: forget accuracies may not rise, utilities
may not fall, beyond the tolerances; the base model's figures inside unlearn.json are not gated."""

from tests.conftest import ROOT
from unlearn.gate import breaches
from unlearn.params import load_yaml

TOL = load_yaml(ROOT / ".ci" / "tolerances.yaml")


def _diff(**changes):
    return {"metrics/unlearn.json": {k.replace("__", "."): {"old": o, "new": n, "diff": n - o} for k, (o, n) in changes.items()}}


def test_a_rise_in_forget_accuracy_fails():
    bad = breaches(_diff(forget_top1=(0.0, 0.3), time_s__total=(60.0, 90.0)), TOL)
    assert bad == ["metrics/unlearn.json forget_top1: forget accuracy rose 0.0000 -> 0.3000 (+0.3000 > 0.0001)"]


def test_a_fall_in_utility_fails_and_nested_keys_count():
    bad = breaches({"metrics/compare.json": {"methods.slug.retain_top1": {"old": 0.99, "new": 0.95}}}, TOL)
    assert len(bad) == 1 and "methods.slug.retain_top1: utility fell 0.9900 -> 0.9500" in bad[0]


def test_improvements_noise_and_ungated_keys_pass():
    assert breaches(_diff(forget_top1=(0.2, 0.0), utility_top1=(0.90, 0.95), retain_top1=(0.9, 0.89995), rho=(0.1, 0.5),
                          peak_memory_mb=(1500, 1700), base__utility_top1=(0.98, 0.5)), TOL) == []


def test_a_metric_that_disappears_fails():
    assert breaches({"metrics/unlearn.json": {"forget_top1": {"old": 0.0, "new": None}}}, TOL)
