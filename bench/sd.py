"""The diffusion track's cost and outcome on the default world: `sd_judges` and `sd_base` (or
`sd_base_small`) run as their stages (`python -m stages.<stage>`) in a scratch folder that links
the pipeline's inputs, so the workspace's outputs are left as they are.

Needs `dvc repro export` (models/hf/base, data/eval).  Prints the wall time of each stage, the
split of sd_base's time (autoencoder, UNet training, sampling), the judges' accuracy on real
held-out images, what they recognise in the drawings on the test seeds, and the accuracy against
training minutes; writes it to --out (default bench/results/sd_<stage>.{json,md}).

    python bench/sd.py                        # sd_judges + sd_base (about 70 min on 2 CPU cores)
    python bench/sd.py --stage sd_base_small  # the small twin (about 18 min)
    python bench/sd.py --reuse-judges -S sd.base.unet.steps=4500 --tag 4500 --keep /tmp/sd_base_4500
        # the workspace's judges (models/sd_judges) instead of training them; a param changed; the
        # trained pipeline kept for `python bench/sd_unlearn.py --pipeline /tmp/sd_base_4500`
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.workspace import linked_workspace, override, run_stage  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402
from unlearn.runs import read_metrics  # noqa: E402

INPUTS = ("data/eval", "models/hf/base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="sd_base", choices=["sd_base", "sd_base_small"])
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the stages (default: torch's choice)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a param of params.yaml by its dotted key, the value read as YAML (as `dvc exp run -S`); repeatable")
    ap.add_argument("--tag", default="", help="suffix of the output files (sd_<stage>_<tag>.{json,md}), for runs with -S")
    ap.add_argument("--reuse-judges", action="store_true", help="judge with the workspace's models/sd_judges instead of training them")
    ap.add_argument("--keep", default=None, metavar="DIR", help="copy the trained pipeline (models/<stage>) to DIR, which must not exist")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    params = load_yaml(ROOT / "params.yaml")
    overrides = dict(override(params, s) for s in args.set)
    inputs = (*INPUTS, "models/sd_judges") if args.reuse_judges else INPUTS
    if args.keep and Path(args.keep).exists():
        sys.exit(f"--keep {args.keep} exists; name a new folder")
    missing = [p for p in inputs if not (ROOT / p).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `dvc repro {'sd_judges' if args.reuse_judges else 'export'}` first")
    with linked_workspace("bench_sd_", inputs) as work:
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        if args.reuse_judges:
            judges_s, judges = 0.0, read_metrics(ROOT / "metrics/sd_judges.json", "sd_judges", ROOT / "runs")
        else:
            judges_s = run_stage(work, ["stages.sd_judges"], args.threads)
            judges = read_metrics(work / "metrics/sd_judges.json", "sd_judges", work / "runs")
        print(f"sd_judges: {judges_s:.0f} s; held-out real images: object {judges['held_out_real']['object']['accuracy']:.3f}, "
              f"style {judges['held_out_real']['style']['accuracy']:.3f}", flush=True)
        base_s = run_stage(work, ["stages.sd_base", "--stage", args.stage], args.threads)
        m = read_metrics(work / f"metrics/{args.stage}.json", args.stage, work / "runs")  # the times are in the run record
        with open(work / f"plots/{args.stage}_curve.csv") as f:
            curve = [r | {"train_min": t} for r, t in zip(csv.DictReader(f), m["checkpoints_train_min"], strict=True)]
        if args.keep:
            shutil.copytree(work / f"models/{args.stage}", args.keep)
    rows = {"stage": args.stage, "overrides": overrides, "sd_judges_s": round(judges_s, 1), "stage_s": round(base_s, 1), "judges": judges["held_out_real"],
            "test": {a: m["test"][a]["accuracy"] for a in ("object", "style")}, "per_style": m["test"]["style"]["per_class"],
            "autoencoder": m["autoencoder"], "vae_s": m["vae_s"], "unet_train_s": m["unet_train_s"], "sample_s": m["sample_s"],
            "peak_memory_mb": m["peak_memory_mb"], "curve": curve, "threads": m["threads"]}
    changed = "; " + ", ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else ""
    lines = [f"{args.stage}{changed}: {base_s / 60:.1f} min wall (autoencoder {m['vae_s'] / 60:.1f} min, UNet {m['unet_train_s'] / 60:.1f} min, "
             f"test drawings {m['sample_s']:.0f} s), peak {m['peak_memory_mb']:.0f} MB; sd_judges {'reused' if args.reuse_judges else f'{judges_s / 60:.1f} min'}", "",
             "| | object | style |", "|---|---|---|",
             f"| judges on real held-out images | {100 * judges['held_out_real']['object']['accuracy']:.1f} % | "
             f"{100 * judges['held_out_real']['style']['accuracy']:.1f} % |",
             f"| judges on the autoencoder's reconstructions of them | {100 * m['autoencoder']['canvas']['judged_reconstructions']['object']:.1f} % | "
             f"{100 * m['autoencoder']['canvas']['judged_reconstructions']['style']:.1f} % |",
             f"| judges on its reconstructions of held-out images like the training ones | "
             f"{100 * m['autoencoder']['rendered']['judged_reconstructions']['object']:.1f} % | "
             f"{100 * m['autoencoder']['rendered']['judged_reconstructions']['style']:.1f} % |",
             f"| judges on the pipeline's drawings, test seeds ({m['test']['images']}) | {100 * m['test']['object']['accuracy']:.1f} % | "
             f"{100 * m['test']['style']['accuracy']:.1f} % |", "",
             "| UNet step | training minutes | object (validation) | style (validation) |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {float(r['train_min']):.1f} | {100 * float(r['object']):.1f} % | {100 * float(r['style']):.1f} % |" for r in curve]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sd_{args.stage}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
