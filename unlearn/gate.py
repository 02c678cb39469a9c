"""The CI gate: `dvc metrics diff` (HEAD's committed metrics -> the workspace after `dvc repro`)
checked against .ci/tolerances.yaml.  Prints the diff either way; exits 1, naming every breach,
when a forget accuracy rose or a utility accuracy fell beyond its tolerance.

    python -m unlearn.gate [--rev HEAD] [--tolerances .ci/tolerances.yaml]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from unlearn.errors import UnlearnError
from unlearn.params import load_yaml


def _dvc(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UnlearnError(f"dvc {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return proc.stdout


def breaches(diff: dict, tol: dict) -> list[str]:
    """Every gated key whose change exceeds its tolerance, as readable lines."""
    out = []
    ignore = tuple(tol.get("ignore_prefixes", []))
    bounds = {k: ("forget", tol["forget"]["tolerance"]) for k in tol["forget"]["keys"]}
    bounds |= {k: ("utility", tol["utility"]["tolerance"]) for k in tol["utility"]["keys"]}
    for path, keys in diff.items():
        for key, change in keys.items():
            leaf = key.split(".")[-1]
            if leaf not in bounds or key.startswith(ignore):
                continue
            old, new = change.get("old"), change.get("new")
            if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
                out.append(f"{path} {key}: {old} -> {new} (missing on one side)")
                continue
            kind, limit = bounds[leaf]
            delta = new - old
            if kind == "forget" and delta > limit:
                out.append(f"{path} {key}: forget accuracy rose {old:.4f} -> {new:.4f} (+{delta:.4f} > {limit})")
            if kind == "utility" and -delta > limit:
                out.append(f"{path} {key}: utility fell {old:.4f} -> {new:.4f} ({delta:.4f}, tolerance {limit})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="dvc metrics diff against committed metrics, with tolerances")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--tolerances", default=".ci/tolerances.yaml")
    args = ap.parse_args()
    try:
        tol = load_yaml(args.tolerances)
        files = [str(f) for f in tol["files"]]
        print(_dvc("metrics", "diff", args.rev, "--md", "--targets", *files) or "(no metric changed)")
        diff = json.loads(_dvc("metrics", "diff", args.rev, "--json", "--targets", *files) or "{}")
        bad = breaches(diff.get("diff", diff), tol)
    except UnlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if bad:
        print(f"GATE FAILED: {len(bad)} metric(s) beyond the tolerances in {args.tolerances}:", *bad, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    print(f"gate passed: no forget accuracy rose and no utility fell beyond {args.tolerances}")


if __name__ == "__main__":
    main()
