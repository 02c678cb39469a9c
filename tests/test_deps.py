"""dvc.yaml's deps cover every project module a stage imports, transitively (also imports inside
functions, and the modules loaded by name: the model families and the registered methods), so
editing any of them makes `dvc repro` rerun the stage instead of reporting stale results."""

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from unlearn.models.adapter import FAMILIES


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[Path]:
    out: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in ("unlearn", "stages"):
                parts = name.split(".")
                for k in range(1, len(parts) + 1):  # a package's __init__ runs too
                    if (f := _module_file(".".join(parts[:k]))) is not None:
                        out.add(f)
    return out


def project_closure(start: Path) -> set[Path]:
    """Every project file that importing `start` can run."""
    dynamic = {
        ROOT / "unlearn/models/adapter.py": {_module_file(v.partition(":")[0]) for v in FAMILIES.values()},
        ROOT / "unlearn/methods/registry.py": set((ROOT / "unlearn/methods").glob("*.py")),
    }
    seen, todo = set(), [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(f) | dynamic.get(f, set()))
    return seen


def _stages():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        body = stage.get("do", stage)
        module = body["cmd"].split()[2]
        yield name, module, [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]


@pytest.mark.parametrize("name,module,deps", list(_stages()), ids=[s[0] for s in _stages()])
def test_every_imported_project_module_is_a_dependency(name, module, deps):
    files = project_closure(_module_file(module))
    missing = []
    for f in sorted(files):
        rel = f.relative_to(ROOT).as_posix()
        if rel.endswith("__init__.py") and f.stat().st_size == 0:
            continue  # an empty package marker runs nothing
        if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
            missing.append(rel)
    assert not missing, f"stage {name} imports {missing} without declaring them in dvc.yaml deps"


def test_the_closure_follows_imports_inside_functions_and_by_name():
    closure = {f.relative_to(ROOT).as_posix() for f in project_closure(ROOT / "stages/base_model.py")}
    assert "unlearn/models/export.py" in closure  # imported inside main() for hf_clip
    assert {"unlearn/models/openclip.py", "unlearn/models/hf_clip.py"} <= closure  # families loaded by name
    assert "unlearn/methods/salun.py" not in closure
    assert "unlearn/methods/salun.py" in {f.relative_to(ROOT).as_posix() for f in project_closure(ROOT / "stages/check.py")}
