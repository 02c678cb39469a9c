"""SLUG on the Stable Diffusion pipeline for several targets: stage `sd_unlearn` (or
`sd_unlearn_small`) run once per concept (`python -m stages.sd_unlearn` with `sd.concept` set) in
a scratch folder that links the stage's inputs, so the workspace's outputs are left as they are.

Needs the stage's inputs in the workspace (`dvc repro sd_base vlm_retain_stats`, or
`sd_base_small` with --stage sd_unlearn_small).  Prints per target the chosen layer and step, UA
on the prompts that name it (and by each alias or misspelling in `sd.other_names`), IRA and CRA
beside the base pipeline's, the stage's wall time and the unlearning time; writes them to
--out (default bench/results/<stage>.{json,md}), and each concept's search log (every step scored)
to <stage>_<concept>_search.csv beside them.

    python bench/sd_unlearn.py                              # Mickey, rocket, Sepia (about 4 min each on 2 CPU cores)
    python bench/sd_unlearn.py --concepts apple Neon        # other targets
    python bench/sd_unlearn.py --stage sd_unlearn_small     # on the small pipeline CI reproduces
    python bench/sd_unlearn.py --concepts Mickey -S sd.search.damping=0.01 --tag damping0.01   # a param changed (docs/sd.md "Stable Diffusion")
    python bench/sd_unlearn.py --pipeline /tmp/sd_base_4500 --tag base4500   # on another pipeline (`bench/sd.py --keep`)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.workspace import linked_workspace, locked_label, override, run_stage  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402
from unlearn.runs import read_metrics  # noqa: E402

INPUTS = ("data/eval", "data/laion", "data/retain", "models/hf/base", "models/vlm_retain", "models/sd_judges")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="sd_unlearn", choices=["sd_unlearn", "sd_unlearn_small"])
    ap.add_argument("--concepts", nargs="+", default=["Mickey", "rocket", "Sepia"], help="objects or styles of the concept table")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the stage (default: torch's choice)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a param of params.yaml by its dotted key, the value read as YAML (as `dvc exp run -S`); repeatable")
    ap.add_argument("--pipeline", default=None, metavar="DIR", help="the pipeline to edit instead of the workspace's models/sd_base (or _small)")
    ap.add_argument("--tag", default="", help="suffix of the output files (<stage>_<tag>.{json,md}), for runs with -S")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    pipeline = "models/" + args.stage.replace("unlearn", "base")
    params = load_yaml(ROOT / "params.yaml")
    overrides = dict(override(params, s) for s in args.set)
    if args.pipeline and not (Path(args.pipeline) / "model_index.json").is_file():
        sys.exit(f"--pipeline {args.pipeline} is not a saved diffusers pipeline (no model_index.json); give a folder `bench/sd.py --keep` wrote")
    missing = [p for p in (*INPUTS, *([] if args.pipeline else [pipeline])) if not (ROOT / p).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `dvc repro {args.stage}` first (its inputs are what this bench reuses)")
    # which pipeline the figures are from: a folder given, or dvc.lock's hash of the committed one (`dvc status` says whether the workspace holds it)
    source = args.pipeline or locked_label(pipeline.removeprefix("models/"), pipeline)
    results = []
    stem = args.stage + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with linked_workspace("bench_sd_unlearn_", INPUTS if args.pipeline else (*INPUTS, pipeline)) as work:
        if args.pipeline:
            (work / pipeline).symlink_to(Path(args.pipeline).resolve())
        for concept in args.concepts:
            params["sd"]["concept"] = concept
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            wall = run_stage(work, ["stages.sd_unlearn", "--stage", args.stage], args.threads, f"sd_unlearn for {concept}")
            shutil.copyfile(work / f"plots/{args.stage}_search.csv", out / f"{stem}_{concept.replace(' ', '_')}_search.csv")  # every step scored
            m = read_metrics(work / f"metrics/{args.stage}.json", args.stage, work / "runs")
            results.append({"concept": concept, "kind": m["kind"], "layer": m["layer"], "rho": m["rho"], "converged": m["converged"],
                            "test": m["test"], "base_test": m["base_test"], "other_names": m["other_names"], "validation": m["validation"],
                            "evaluations": m["evaluations"], "stage_s": round(wall, 1), "unlearn_s": m["unlearn_s"], "peak_memory_mb": m["peak_memory_mb"],
                            "stored_bytes": m["stored_bytes"], "unet_vae_unchanged": m["unet_vae_unchanged"], "threads": m["threads"],
                            "searched_layers": m["searched_layers"], "overrides": overrides, "pipeline": source})
            r = results[-1]
            print(f"{concept}: {r['layer']} rho {r['rho']:.3g} (converged {r['converged']}); UA {r['base_test']['UA']:.3f} -> {r['test']['UA']:.3f}, "
                  f"IRA {r['base_test']['IRA']:.3f} -> {r['test']['IRA']:.3f}, CRA {r['base_test']['CRA']:.3f} -> {r['test']['CRA']:.3f}; "
                  f"stage {wall:.0f} s, unlearning {r['unlearn_s']:.0f} s", flush=True)

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    changed = "; " + ", ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else ""
    lines = [f"{args.stage} on {source}, test seeds; UA / IRA / CRA in %, base pipeline -> after SLUG{changed}", "",
             "| target | kind | layer, rho | converged | UA | UA by other names | IRA | CRA | stage | unlearning | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        names = ", ".join(f"{n} {pct(v['base_UA'])} -> {pct(v['UA'])}" for n, v in r["other_names"].items()) or "-"
        lines.append(f"| {r['concept']} | {r['kind']} | {r['layer'].removeprefix('text_model.')} {r['rho']:.3g} | {r['converged']} | "
                     f"{pct(r['base_test']['UA'])} -> {pct(r['test']['UA'])} | {names} | {pct(r['base_test']['IRA'])} -> {pct(r['test']['IRA'])} | "
                     f"{pct(r['base_test']['CRA'])} -> {pct(r['test']['CRA'])} | {r['stage_s']:.0f} s | {r['unlearn_s']:.0f} s | {r['peak_memory_mb']:.0f} MB |")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
