"""Learning-rate sweep of the UnlearnCanvas baselines on validation seeds (how the defaults of
`unlearncanvas.<method>` were chosen).  Runs the benchmark's own stage (`python -m
stages.unlearncanvas`, one protocol) in a scratch folder that links its inputs, with the answer set
drawn from seeds the reported run never uses (`unlearncanvas.seed` + 3,000,000; SLUG's decisions
use + 1,000,000), on the benchmark's targets (`unlearncanvas.targets`, or --targets), one drawing
per prompt; the workspace's outputs are left as they are.

Needs the stage's inputs (`dvc repro unlearncanvas_base`: models/sd_base, models/sd_judges,
data/eval/canvas).  Prints per (method, lr) UA / IRA / CRA on the tuning targets beside the base
pipeline's, and the unlearning time; writes bench/results/tune_unlearncanvas[_<tag>].{json,md}.  The rule
that picks a method's lr: among the lrs whose mean UA reaches --min-ua, the highest mean of IRA
and CRA; if none does, the highest UA.  --merge re-reads earlier sweeps of the same pipeline, seeds
and targets (their base rows must agree) and applies the rule over every lr they measured, without
running anything.

    python bench/tune_unlearncanvas.py --methods esd --lrs 5e-5 7e-5 1e-4 --tag all8_esd   # 3 lrs x the 8 default targets (~50 min, 1 thread)
    python bench/tune_unlearncanvas.py --methods ca --lrs 1e-4 2e-4 3e-4 --tag all8_ca
    python bench/tune_unlearncanvas.py --methods salun --targets Sepia Mickey          # a quicker look on two targets
    python bench/tune_unlearncanvas.py --merge bench/results/tune_unlearncanvas_esd_4500*.json --tag esd_4500_all   # one grid from several runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.workspace import linked_workspace, locked_label, override, run_stage  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402
from unlearn.runs import read_metrics  # noqa: E402

INPUTS = ("data/eval", "models/sd_judges", "models/sd_base")   # what the stage reads for the base and a baseline (SLUG would need more)
TUNING = 3_000_000   # the validation answer set's seed offset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", help="default: esd salun ca")
    ap.add_argument("--lrs", nargs="+", type=float, help="default: 3e-5 1e-4 3e-4")
    ap.add_argument("--targets", nargs="+", help="styles and objects of the canvas (default: unlearncanvas.targets, the benchmark's own)")
    ap.add_argument("--min-ua", type=float, default=85.0, help="the UA (%%) a chosen lr must reach on the mean, if any does")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="another param by its dotted key (as `dvc exp run -S`); repeatable")
    ap.add_argument("--tag", default="", help="suffix of the output files (tune_unlearncanvas_<tag>.{json,md}), e.g. for a finer grid")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="earlier results of this bench to combine into one grid (nothing is run)")
    args = ap.parse_args()
    out = Path(args.out)
    stem = "tune_unlearncanvas" + (f"_{args.tag}" if args.tag else "")
    if args.merge:
        given = [name for name, v in (("--methods", args.methods), ("--lrs", args.lrs), ("--targets", args.targets), ("-S", args.set)) if v]
        if given:
            sys.exit(f"--merge re-reads finished sweeps: {', '.join(given)} would be ignored; drop them, or run a sweep without --merge")
        result = merge(args.merge, args.min_ua)
        out.mkdir(parents=True, exist_ok=True)
        write(out, stem, result)
        return
    args.methods = args.methods or ["esd", "salun", "ca"]
    args.lrs = args.lrs or [3e-5, 1e-4, 3e-4]
    params = load_yaml(ROOT / "params.yaml")
    for m in args.methods:
        if m not in params["unlearncanvas"] or "lr" not in params["unlearncanvas"][m]:
            sys.exit(f"--methods {m}: unlearncanvas.{m} has no lr in params.yaml; pick methods with an lr (esd, salun, ca)")
    overrides = dict(override(params, s) for s in args.set)
    seed = int(params["unlearncanvas"]["seed"]) + TUNING
    args.targets = args.targets or list(params["unlearncanvas"]["targets"])
    params["unlearncanvas"] |= {"targets": args.targets, "images_per_prompt": 1, "seed": seed}
    missing = [p for p in INPUTS if not (ROOT / p).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `dvc repro unlearncanvas_base` first (its inputs are what this bench reuses)")
    out.mkdir(parents=True, exist_ok=True)
    pipeline = locked_label("sd_base", "models/sd_base")
    rows = []
    with linked_workspace("bench_tune_uc_", INPUTS) as work:

        def run(method: str) -> tuple[list[dict], float]:
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            wall = run_stage(work, ["stages.unlearncanvas", "--method", method], what=f"unlearncanvas --method {method}")
            m = read_metrics(work / f"metrics/unlearncanvas/{method}.json", f"unlearncanvas@{method}" if method != "base" else "unlearncanvas_base",
                             work / "runs")
            return m["rows"], wall

        base, wall = run("base")
        rows.append(summary("base", None, base, wall))
        print(line(rows[-1]), flush=True)
        for method in args.methods:
            default = params["unlearncanvas"][method]["lr"]
            for lr in args.lrs:
                params["unlearncanvas"][method]["lr"] = lr
                got, wall = run(method)
                rows.append(summary(method, lr, got, wall))
                print(line(rows[-1]), flush=True)
            params["unlearncanvas"][method]["lr"] = default
    chosen = {m: pick([r for r in rows if r["method"] == m], args.min_ua) for m in args.methods}
    write(out, stem, {"pipeline": pipeline, "targets": args.targets, "seed": seed, "min_ua": args.min_ua, "overrides": overrides,
                      "rows": rows, "chosen": chosen})


def merge(paths: list[str], min_ua: float) -> dict:
    """One grid from several runs of this bench: the same targets, seeds and overrides and equal base
    rows (the same pipeline and judges drew them), every (method, lr) once; the rule applied over all."""
    runs = []
    for p in paths:
        try:
            runs.append((p, json.loads(Path(p).read_text())))
        except (OSError, ValueError) as e:
            sys.exit(f"--merge {p}: not a result of this bench ({e}); give bench/results/tune_unlearncanvas_*.json files")
    first_path, first = runs[0]
    base = next((r for r in first.get("rows", []) if r.get("method") == "base"), None)
    if base is None:
        sys.exit(f"--merge {first_path}: no base row; give bench/results/tune_unlearncanvas_*.json files")
    rows, seen = [base], set()
    for p, run in runs:
        for key in ("targets", "seed", "overrides"):
            if run.get(key) != first.get(key):
                sys.exit(f"--merge {p}: its {key} ({run.get(key)}) differ from {first_path}'s ({first.get(key)}); merge runs of one config only")
        other = next((r for r in run.get("rows", []) if r.get("method") == "base"), None)
        if other is None or other["targets"] != base["targets"]:
            sys.exit(f"--merge {p}: its base rows differ from {first_path}'s, so another pipeline or judges drew them; merge runs of one pipeline only")
        for r in run["rows"]:
            if r["method"] == "base":
                continue
            if (r["method"], r["lr"]) in seen:
                sys.exit(f"--merge {p}: {r['method']} at lr {lr_text(r['lr'])} is in two of the files; give each lr once")
            seen.add((r["method"], r["lr"]))
            rows.append(r)
    rows = [base, *sorted(rows[1:], key=lambda r: (r["method"], r["lr"]))]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    recorded = {run["pipeline"] for _, run in runs if run.get("pipeline")}
    if len(recorded) > 1:
        sys.exit(f"--merge: the files name {len(recorded)} pipelines ({'; '.join(sorted(recorded))}); merge runs of one pipeline only")
    pipeline = next(iter(recorded), "not recorded")
    if recorded and any(not run.get("pipeline") for _, run in runs):
        pipeline += f" (recorded by {sum(bool(run.get('pipeline')) for _, run in runs)} of the {len(runs)} runs; every run's base rows agree)"
    return {"pipeline": pipeline, "targets": first["targets"], "seed": first["seed"], "min_ua": min_ua,
            "overrides": first.get("overrides", {}), "rows": rows,
            "chosen": {m: pick([r for r in rows if r["method"] == m], min_ua) for m in methods}, "merged": [str(p) for p in paths]}


def write(out: Path, stem: str, result: dict) -> None:
    rows, chosen, overrides = result["rows"], result["chosen"], result["overrides"]
    lines = [f"UnlearnCanvas baselines on validation seeds (answer set seed {result['seed']}, one drawing per prompt), pipeline "
             f"{result['pipeline']}, targets {', '.join(result['targets'])}; means over the targets in %; rule: the highest "
             f"(IRA + CRA) / 2 among lrs with UA >= {result['min_ua']:g}, else the highest UA"
             + (f"; {', '.join(f'{k}={v}' for k, v in overrides.items())}" if overrides else "")
             + (f"; merged from {', '.join(Path(p).name for p in result['merged'])}" if result.get("merged") else ""), "",
             "| method | lr | UA | IRA | CRA | per target UA / IRA / CRA | unlearning s / target | chosen |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = "; ".join(f"{t['target']} {t['UA']:.0f} / {t['IRA']:.0f} / {t['CRA']:.0f}" if t["UA"] is not None else f"{t['target']} failed"
                        for t in r["targets"])
        mark = "**yes**" if r["method"] in chosen and chosen[r["method"]] == r["lr"] else ""
        lines.append(f"| {r['method']} | {lr_text(r['lr'])} | {fmt(r['UA'])} | {fmt(r['IRA'])} | {fmt(r['CRA'])} | "
                     f"{per} | {fmt(r['time_s'])} | {mark} |")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def summary(method: str, lr: float | None, targets: list[dict], wall: float) -> dict:
    ok = [t for t in targets if t["status"] == "ok"]

    def mean(key: str) -> float | None:
        return round(sum(t[key] for t in ok) / len(ok), 2) if ok else None

    times = [t["time_s"] for t in ok if t.get("time_s") is not None]
    return {"method": method, "lr": lr, "UA": mean("UA"), "IRA": mean("IRA"), "CRA": mean("CRA"), "failed": len(targets) - len(ok),
            "time_s": round(sum(times) / len(times), 1) if times else None, "stage_s": round(wall, 1),
            "targets": [{"target": t["target"], "UA": t["UA"], "IRA": t["IRA"], "CRA": t["CRA"]} for t in targets]}


def pick(rows: list[dict], min_ua: float) -> float | None:
    """The rule of the module docstring; a config with a failed target is never picked."""
    ok = [r for r in rows if not r["failed"] and r["UA"] is not None]
    if not ok:
        return None
    reaching = [r for r in ok if r["UA"] >= min_ua]
    best = max(reaching, key=lambda r: r["IRA"] + r["CRA"]) if reaching else max(ok, key=lambda r: r["UA"])
    return best["lr"]


def lr_text(lr: float | None) -> str:
    """1e-04, 8.5e-05, 1.25e-04: the digits the grid was given, never rounded."""
    if lr is None:
        return "-"
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def line(r: dict) -> str:
    return (f"{r['method']:5s} lr {lr_text(r['lr'])}: UA {fmt(r['UA'])}, IRA {fmt(r['IRA'])}, CRA {fmt(r['CRA'])}, "
            f"failed {r['failed']}, unlearning {fmt(r['time_s'])} s per target, stage {r['stage_s']:.0f} s")


if __name__ == "__main__":
    main()
