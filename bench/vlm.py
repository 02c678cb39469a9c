"""The vision-language track's cost and outcome on the default world: `vlm_base` once and
`vlm_unlearn` per concept, each run as its stage (`python -m stages.<stage>`) in a scratch folder
that links the pipeline's inputs, so the workspace's outputs are left as they are.

Needs `dvc repro export vlm_retain_stats` (models/hf/base, models/vlm_retain, data/).  Prints a
table (wall time of each stage, the base LLaVA's test accuracy, per concept the test figures
before and after SLUG) and writes it to --out (default bench/results/vlm.{json,md}).

    python bench/vlm.py                                  # Elon Musk and Taylor Swift
    python bench/vlm.py --concepts "Elon Musk" --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.workspace import linked_workspace, run_stage  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402
from unlearn.runs import read_metrics  # noqa: E402

INPUTS = ("data/eval", "data/laion", "data/retain", "models/hf/base", "models/vlm_retain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", nargs="+", default=["Elon Musk", "Taylor Swift"])
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the stages (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    missing = [p for p in INPUTS if not (ROOT / p).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `dvc repro export vlm_retain_stats` first")
    rows: dict = {"concepts": {}}
    with linked_workspace("bench_vlm_", INPUTS) as work:
        params = load_yaml(ROOT / "params.yaml")
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rows["vlm_base_s"] = round(run_stage(work, ["stages.vlm_base"], args.threads), 1)
        base = read_metrics(work / "metrics/vlm_base.json", "vlm_base", work / "runs")
        rows["base"] = {"identity": base["test"]["identity"]["accuracy"], "object": base["test"]["object"]["accuracy"],
                        "train_s": base["train_s"], "peak_memory_mb": base["peak_memory_mb"]}
        print(f"vlm_base: {rows['vlm_base_s']} s (training {base['train_s']} s); test: identity named right "
              f"{100 * rows['base']['identity']:.1f} %, object {100 * rows['base']['object']:.1f} %", flush=True)
        for concept in args.concepts:
            params["vlm"]["concept"] = concept
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            wall = run_stage(work, ["stages.vlm_unlearn"], args.threads)
            m = read_metrics(work / "metrics/vlm_unlearn.json", "vlm_unlearn", work / "runs")
            rows["concepts"][concept] = {"stage_s": round(wall, 1), "unlearn_s": m["unlearn_s"], "layer": m["layer"], "rho": m["rho"],
                                         "converged": m["converged"], "base_test": m["base_test"], "test": m["test"],
                                         "says_instead": m["says_instead"], "peak_memory_mb": m["peak_memory_mb"],
                                         "stored_bytes": m["stored_bytes"], "retain_largest_drops": m["retain_largest_drops"]}
            print(f"vlm_unlearn {concept}: {wall:.1f} s", flush=True)
    lines = [f"vlm_base: {rows['vlm_base_s']} s wall (training {rows['base']['train_s']} s), peak {rows['base']['peak_memory_mb']:.0f} MB; "
             f"base LLaVA on test images: identity named right {100 * rows['base']['identity']:.1f} %, object right "
             f"{100 * rows['base']['object']:.1f} %", "",
             "| concept | layer | rho | converged | target named (base -> after) | other identities | objects | says \"I don't know\" | "
             "stage wall s | unlearn s | peak MB | patch bytes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for concept, r in rows["concepts"].items():
        b, t = r["base_test"], r["test"]
        lines.append(f"| {concept} | {r['layer'].replace('vision_model.encoder.', '')} | {r['rho']:.3g} | {r['converged']} | "
                     f"{100 * b['forget_identification']:.1f} -> {100 * t['forget_identification']:.1f} | "
                     f"{100 * b['retain_identification']:.2f} -> {100 * t['retain_identification']:.2f} | "
                     f"{100 * b['object_accuracy']:.2f} -> {100 * t['object_accuracy']:.2f} | {100 * r['says_instead']['dont_know']:.1f} % | "
                     f"{r['stage_s']} | {r['unlearn_s']} | {r['peak_memory_mb']:.0f} | {r['stored_bytes']:,} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vlm.json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    (out / "vlm.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
