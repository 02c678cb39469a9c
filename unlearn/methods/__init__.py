"""Unlearning methods: SLUG (slug.py), the baselines (baselines.py), and the registry that runs any
of them by name (registry.py).  The names live here, free of heavy imports, so that the `check`
stage can validate params.yaml in a moment."""

from __future__ import annotations

from unlearn.errors import UnlearnError

METHODS = ("slug", "ft", "ga", "ga_ft", "salun", "ssd")


def check_method(name: str) -> str:
    if name not in METHODS:
        raise UnlearnError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return name


def check_methods(names: list, key: str = "compare.methods") -> list[str]:
    """A list of method names: non-empty, each known, none twice."""
    if not names:
        raise UnlearnError(f"{key} is empty; list methods from: {', '.join(METHODS)}")
    methods = [check_method(str(n)) for n in names]
    if len(set(methods)) != len(methods):
        raise UnlearnError(f"{key} names a method twice: {', '.join(methods)}")
    return methods


# SLUG's edit directions (slug.step_directions): the paper's forget gradient, or the forget
# gradient preconditioned by the second moments of the edited layer's inputs on the retain set.
DIRECTIONS = ("gradient", "retain_preconditioned")


def check_direction(direction: str, damping: float) -> None:
    if direction not in DIRECTIONS:
        raise UnlearnError(f"slug.search.direction is {direction!r}; known: {', '.join(DIRECTIONS)}")
    if not (isinstance(damping, (int, float)) and damping > 0):
        raise UnlearnError(f"slug.search.damping must be a number > 0 (got {damping!r}); 0.1 is the default")
