"""SLUG's step search on the UnlearnCanvas benchmark, configs side by side: what each costs (the
unlearning time per target, the validation drawings it took) and what it gives (UA / IRA / CRA)
on an answer set drawn from seeds the reported run never uses (`unlearncanvas.seed` + 3,000,000,
one drawing per prompt, as `bench/tune_unlearncanvas.py`), so a config chosen here is not chosen
on the reported figures.  Runs the benchmark's own stage (`python -m stages.unlearncanvas
--method slug`) in a scratch folder that links its inputs; the workspace's outputs are left as
they are.

Each --config is NAME:KEY=VALUE,KEY=VALUE over `unlearncanvas.slug` (no keys: the committed
config).  Needs the stage's inputs (`dvc repro unlearncanvas@slug`'s deps: models/sd_base,
models/sd_judges, models/hf/base, models/vlm_retain, data/).  Writes
bench/results/slug_canvas_search[_<tag>].{json,md}.

    python bench/slug_canvas_search.py --targets Sepia Sketch Mickey house \\
        --config committed: --config steps20:steps=20 --config tol0.25:rho_tolerance=0.25
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.tune_unlearncanvas import TUNING, fmt, summary  # noqa: E402
from bench.workspace import linked_workspace, run_stage  # noqa: E402
from unlearn.params import load_yaml, parse_yaml  # noqa: E402
from unlearn.runs import read_metrics  # noqa: E402

INPUTS = ("data/eval", "data/laion", "data/retain", "models/hf/base", "models/vlm_retain", "models/sd_judges", "models/sd_base")


def parse_config(text: str, slug: dict) -> tuple[str, dict]:
    """NAME:KEY=VALUE,... -> (NAME, {KEY: VALUE}); every KEY must be one of unlearncanvas.slug's."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        sys.exit(f"--config {text!r}: give NAME:KEY=VALUE,KEY=VALUE (NAME: for the committed config)")
    changes = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in slug:
            sys.exit(f"--config {text!r}: {key!r} is not a key of unlearncanvas.slug ({', '.join(slug)}); give KEY=VALUE with one of them")
        changes[key] = parse_yaml(value)
    return name, changes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True, metavar="NAME:KEY=VALUE,...", help="a SLUG config to run; repeatable")
    ap.add_argument("--targets", nargs="+", help="styles and objects of the canvas (default: unlearncanvas.targets)")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    params = load_yaml(ROOT / "params.yaml")
    committed = dict(params["unlearncanvas"]["slug"])
    configs = [parse_config(c, committed) for c in args.config]
    missing = [p for p in INPUTS if not (ROOT / p).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `dvc repro unlearncanvas_base vlm_retain_stats` first (its inputs are what this bench reuses)")
    seed = int(params["unlearncanvas"]["seed"]) + TUNING
    targets = args.targets or list(params["unlearncanvas"]["targets"])
    params["unlearncanvas"] |= {"targets": targets, "images_per_prompt": 1, "seed": seed}
    rows = []
    with linked_workspace("bench_slug_canvas_", INPUTS) as work:

        def run(method: str) -> tuple[list[dict], float]:
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            wall = run_stage(work, ["stages.unlearncanvas", "--method", method], what=f"unlearncanvas --method {method}")
            stage = f"unlearncanvas@{method}" if method != "base" else "unlearncanvas_base"
            return read_metrics(work / f"metrics/unlearncanvas/{method}.json", stage, work / "runs")["rows"], wall

        base, wall = run("base")
        rows.append(summary("base", None, base, wall) | {"config": "base", "changes": {}})
        for name, changes in configs:
            params["unlearncanvas"]["slug"] = committed | changes
            got, wall = run("slug")
            row = summary("slug", None, got, wall) | {"config": name, "changes": changes}
            for t, g in zip(row["targets"], got):
                phases = g.get("phases_s", {})
                t |= {"time_s": g.get("time_s"), "rho": g.get("rho"), "converged": g.get("converged"), "evaluations": g.get("evaluations"),
                      "drawings": g.get("validation_drawings"), "forget_s": phases.get("eval_forget"), "guard_s": phases.get("eval_guard")}
            counted = [t["drawings"] for t in row["targets"] if t["drawings"] is not None]  # a failed target has none
            row["drawings"] = round(sum(counted) / len(counted), 1) if counted else None
            rows.append(row)
            print(f"{name}: UA {fmt(row['UA'])}, IRA {fmt(row['IRA'])}, CRA {fmt(row['CRA'])}, unlearning {fmt(row['time_s'])} s per target, "
                  f"stage {row['stage_s']:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "slug_canvas_search" + (f"_{args.tag}" if args.tag else "")
    data = {"targets": targets, "seed": seed, "committed": committed, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = render(data)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def render(data: dict) -> list[str]:
    """The markdown table of a run's JSON."""
    lines = [f"SLUG search configs on the UnlearnCanvas stage, answer set seed {data['seed']} (one drawing per prompt; never the reported "
             f"run's), targets {', '.join(data['targets'])}; means over the targets in %", "",
             "| config | changes | UA | IRA | CRA | unlearning s / target | validation drawings / target | per target: UA / IRA / CRA, rho, "
             "steps scored, validation drawings, unlearning s (of which scoring the forget set + the guard sets) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        per = "; ".join(f"{t['target']} {t['UA']:.0f} / {t['IRA']:.0f} / {t['CRA']:.0f}"
                        + (f", rho {t['rho']:.3g}{'' if t['converged'] else ' (not converged)'}, {t['evaluations']} steps, {t['drawings']} drawings, "
                           f"{fmt(t['time_s'])} s" + (f" ({fmt(t['forget_s'])} + {fmt(t['guard_s'])})" if t["forget_s"] is not None else "")
                           if t.get("rho") is not None else "")
                        for t in r["targets"] if t["UA"] is not None)
        lines.append(f"| {r['config']} | {', '.join(f'{k}={v}' for k, v in r['changes'].items()) or '-'} | {fmt(r['UA'])} | {fmt(r['IRA'])} | "
                     f"{fmt(r['CRA'])} | {fmt(r['time_s'])} | {fmt(r.get('drawings'))} | {per} |")
    return lines


if __name__ == "__main__":
    main()
