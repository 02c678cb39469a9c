"""Params as a stage sees them: only the keys that dvc.yaml declares for that stage.

A stage never opens params.yaml directly.  `stage_params("download")` reads the stage's
`params:` list from dvc.yaml and returns a view that holds those keys and nothing else, so code
that reads an undeclared key fails loudly instead of silently escaping DVC's dependency
tracking.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from unlearn.errors import UnlearnError

_MISSING = object()


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: PyYAML (YAML 1.1) reads `1e-05` as the string
    "1e-05", and that is how `dvc exp run -S ga.lr=1e-5` writes the number into params.yaml
    (DVC dumps with ruamel, YAML 1.2), so a stage would be handed a string for a learning rate.
    Everything PyYAML already reads as a float reads the same."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML text as the stages read it (safe, with YAML 1.2's exponent floats)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise UnlearnError(f"{p} not found: run from the project root (where dvc.yaml and params.yaml live)")
    return parse_yaml(p.read_text()) or {}


def lookup(tree: dict, dotted: str, default: Any = _MISSING) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise KeyError(dotted)
            return default
        node = node[part]
    return node


def declared_params(dvc_yaml: dict, stage: str) -> list[str]:
    """The params.yaml keys a stage declares (dvc.yaml's `params:` entries for the default file).
    A `foreach` stage over a list is named `stage@item`; its `${item}` entries are filled in."""
    stages = dvc_yaml.get("stages", {})
    name, _, item = stage.partition("@")
    if name not in stages or bool(item) != ("foreach" in stages[name]):
        raise UnlearnError(f"stage {stage!r} is not in dvc.yaml; known stages: {', '.join(stages)}")
    spec = stages[name]["do"] if item else stages[name]
    keys: list[str] = []
    for entry in spec.get("params", []) or []:
        if isinstance(entry, str):
            keys.append(entry.replace("${item}", item))
        elif isinstance(entry, dict):
            for file, names in entry.items():
                if file == "params.yaml":
                    keys.extend(n.replace("${item}", item) for n in names)
    return keys


class StageParams:
    """Read-only access to the declared subset of params.yaml."""

    def __init__(self, stage: str, values: dict, declared: list[str]):
        self.stage = stage
        self._values = values
        self._declared = declared

    def __call__(self, key: str, default: Any = _MISSING) -> Any:
        if not any(key == d or key.startswith(d + ".") for d in self._declared):
            raise UnlearnError(
                f"stage {self.stage!r} reads param {key!r} that dvc.yaml does not declare for it; "
                f"add it to the stage's params in dvc.yaml"
            )
        try:
            return lookup(self._values, key) if default is _MISSING else lookup(self._values, key, default)
        except KeyError:
            raise UnlearnError(f"params.yaml has no {key!r} (needed by stage {self.stage!r}); add it") from None

    def declared(self) -> dict[str, Any]:
        return {k: lookup(self._values, k, None) for k in self._declared}


def stage_params(stage: str, root: str | Path = ".") -> StageParams:
    root = Path(root)
    dvc_yaml = load_yaml(root / "dvc.yaml")
    values = load_yaml(root / "params.yaml")
    declared = declared_params(dvc_yaml, stage)
    for key in declared:
        try:
            lookup(values, key)
        except KeyError:
            raise UnlearnError(f"dvc.yaml declares param {key!r} for stage {stage!r} but params.yaml lacks it") from None
    return StageParams(stage, values, declared)


def as_config(cls: type, values: dict, key: str) -> Any:
    """Build a config dataclass from a params section; unknown keys, a word where a number belongs
    and a number outside the bounds the class declares (`RANGES`, unlearn/ranges.py) are one-line
    errors naming the key."""
    import dataclasses

    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    if not isinstance(values, dict):
        raise UnlearnError(f"params.yaml {key} must be a mapping of {', '.join(sorted(known))} (got {values!r})")
    unknown = sorted(set(values) - known)
    if unknown:
        raise UnlearnError(f"params.yaml {key} has unknown keys {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if required:
        raise UnlearnError(f"params.yaml {key} lacks {', '.join(required)}; add it (see README for its meaning)")
    for f in fields:
        if f.name in values:
            _check_number(f, values[f.name], f"{key}.{f.name}")
    from unlearn.ranges import check_fields  # ranges reads params' lookup

    cfg = cls(**values)
    check_fields(cfg, key)  # the bounds the class declares (`RANGES`)
    return cfg


def _check_number(field: Any, value: Any, key: str) -> None:
    """A field declared `int` or `float` (optionally `| None`) holds a number of that kind: a quoted
    number, a word or a boolean would otherwise fail deep inside torch, or be used as 1 (`true`).
    The declaration is a string under `from __future__ import annotations`, a class without it."""
    declared = field.type.__name__ if isinstance(field.type, type) else str(field.type)
    kind, optional = declared.removesuffix(" | None"), declared.endswith(" | None")
    if kind not in ("int", "float") or (value is None and optional):
        return
    if isinstance(value, bool) or not isinstance(value, int if kind == "int" else int | float):
        raise UnlearnError(f"params.yaml {key} is {value!r}; it must be {'an integer' if kind == 'int' else 'a number'}"
                           f"{' (e.g. 1.0e-5)' if kind == 'float' else ''}")
