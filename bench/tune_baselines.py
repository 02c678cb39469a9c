"""Learning-rate sweep of the training baselines on one concept's validation images (how the
defaults in params.yaml were chosen).  Needs `dvc repro curate` for the concept (data/forget,
data/retain) and models/base.  Prints one line per (method, lr): the reported epoch, validation
FA@1 / FA@5 / retain@1 / other-kind@1, and the unlearning time.

    python bench/tune_baselines.py --methods ga ga_ft salun ft --lrs 1e-6 1e-5 1e-4 --epochs 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from unlearn.data.curate import resolve_concept  # noqa: E402
from unlearn.errors import UnlearnError  # noqa: E402
from unlearn.eval.suite import Evaluator, concept_tasks  # noqa: E402
from unlearn.methods.registry import check_method, methods, run_method  # noqa: E402
from unlearn.models.adapter import load  # noqa: E402
from unlearn.models.train import load_pairs  # noqa: E402
from unlearn.params import load_yaml, parse_yaml  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concept", default=None, help="default: params.yaml's concept (must match data/forget)")
    ap.add_argument("--methods", nargs="+", default=["ga", "ga_ft", "salun", "ft"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-6, 1e-5, 1e-4])
    ap.add_argument("--epochs", type=int, default=None, help="override each method's epochs")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override other keys of each method's params (alpha=2)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    params = load_yaml("params.yaml")
    overrides = {}
    for kv in args.set:
        key, sep, text = kv.partition("=")
        if not (sep and key):
            sys.exit(f"--set {kv!r}: give KEY=VALUE, e.g. --set alpha=2")
        overrides[key] = parse_yaml(text)

    def config_of(method: str, lr: float) -> dict:
        return dict(params[method]) | {"lr": lr} | ({"epochs": args.epochs} if args.epochs is not None else {}) | overrides

    try:   # every (method, lr) config is valid before the first one trains
        for method in args.methods:
            for lr in args.lrs:
                methods()[check_method(method)].config(config_of(method, lr), method)
    except UnlearnError as e:
        sys.exit(f"error: {e}")
    concept = resolve_concept(args.concept or params["concept"], params["concepts"])
    base = load("models/base")
    forget, retain = load_pairs(base, "data/forget"), load_pairs(base, "data/retain")
    split = params["eval"]["split"]
    tasks = concept_tasks("data/eval", concept, "val", split["val_fraction"], split["seed"])
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    evaluator = Evaluator(base, tasks, params["eval"]["batch_size"])
    print(f"{concept.name}: base val {evaluator.evaluate()}")
    for method in args.methods:
        for lr in args.lrs:
            base.model.load_state_dict(state)
            cfg = config_of(method, lr)
            t = time.perf_counter()
            out = run_method(method, base, forget, retain, evaluator, concept.kind, cfg, params["gradients"]["batch_size"])
            wall = time.perf_counter() - t
            row = next((r for r in out.epochs if r["epoch"] == out.epoch), out.epochs[-1] if out.epochs else {})
            print(f"{method:6s} lr {lr:7.1e} {overrides or ''}: {out.status:13s} epoch {out.epoch} FA@1 {row.get('forget_top1', float('nan')):.3f} "
                  f"FA@5 {row.get('forget_top5', float('nan')):.3f} retain@1 {row.get('retain_top1', float('nan')):.3f} "
                  f"other@1 {row.get('utility_top1', float('nan')):.3f} unlearn {out.time_s['unlearn']:.1f}s (wall {wall:.1f}s) {out.details.get('error', '')}",
                  flush=True)


if __name__ == "__main__":
    main()
