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
    for path, keys in diff.items():
        for key, change in keys.items():
            leaf = key.split(".")[-1]
            if key.startswith(ignore) or not isinstance(change.get("new"), (int, float)) or not isinstance(change.get("old"), (int, float)):
                if leaf in tol["forget"]["keys"] + tol["utility"]["keys"] and not key.startswith(ignore) and change.get("old") != change.get("new"):
                    out.append(f"{path} {key}: {change.get('old')} -> {change.get('new')} (missing on one side)")
                continue
            delta = change["new"] - change["old"]
            if leaf in tol["forget"]["keys"] and delta > tol["forget"]["tolerance"]:
                out.append(f"{path} {key}: forget accuracy rose {change['old']:.4f} -> {change['new']:.4f} (+{delta:.4f} > {tol['forget']['tolerance']})")
            if leaf in tol["utility"]["keys"] and -delta > tol["utility"]["tolerance"]:
                out.append(f"{path} {key}: utility fell {change['old']:.4f} -> {change['new']:.4f} ({delta:.4f}, tolerance {tol['utility']['tolerance']})")
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
