"""Unlearning methods, one file each, registered by name (registry.py): SLUG (slug.py) and the
baselines (ft.py, ga.py, ga_ft.py, salun.py, ssd.py; their shared training loop in baselines.py).
`registry.methods()` finds them all; this module holds only what the `check` stage needs without
loading a model."""

from __future__ import annotations

from unlearn.errors import UnlearnError

# SLUG's edit directions (slug.step_directions): the paper's forget gradient, or the forget
# gradient preconditioned by the second moments of the edited layer's inputs on the retain set.
DIRECTIONS = ("gradient", "retain_preconditioned")
# what SLUG's search keeps when no layer passes (slug.search_layers)
FALLBACKS = ("forget", "guard")


def check_direction(direction: str, damping: float) -> None:
    if direction not in DIRECTIONS:
        raise UnlearnError(f"slug.search.direction is {direction!r}; known: {', '.join(DIRECTIONS)}")
    if not (isinstance(damping, (int, float)) and damping > 0):
        raise UnlearnError(f"slug.search.damping must be a number > 0 (got {damping!r}); 0.1 is the default")


def check_fallback(fallback: str, key: str = "slug.search.fallback") -> None:
    """What an unconverged search keeps, `key` naming the param in the error (the CLIP track's
    `slug.search.fallback`, the diffusion track's `sd.search.fallback`, `unlearncanvas.slug.fallback`)."""
    if fallback not in FALLBACKS:
        raise UnlearnError(f"{key} is {fallback!r}; use forget (when no layer passes, keep the step that forgets most) "
                           "or guard (keep the step that forgets most among those within the guard)")
