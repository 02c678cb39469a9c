"""Why single-layer edits do not add up on the default world: the first k concepts of
`forget_many.concepts` (default 5), on test images.

1. From the patches `forget_many` saved (models/many/<concept>, each found alone on the base
   model): every edit alone, every pair, all k, and all k but one, each judged as the stage
   judges a sum (every target's FA@1/FA@5, identity @1 over the identities that are not targets,
   ImageNet-style @1), unscaled.
2. With `--towers image text`: the stage's sum mode (each edit found alone, the first 1, 2 and k
   summed, the common scale searched on validation) with every search restricted to one tower
   (`slug.rank.towers`), to see whether edits of one tower interact less.

Needs `dvc repro forget_many`.  Writes bench/results/forget_many_interactions.{json,md}.

    python bench/forget_many_interactions.py                       # part 1 (about 3 min on 2 CPU cores)
    python bench/forget_many_interactions.py --towers image text   # and part 2 (about 5 min per tower)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from unlearn.data.curate import curate_forget, resolve_concepts, table_concepts  # noqa: E402
from unlearn.errors import UnlearnError  # noqa: E402
from unlearn.eval.suite import Evaluator, ManyEvaluator, concept_tasks  # noqa: E402
from unlearn.many import ConceptEdit, judge, set_sum  # noqa: E402
from unlearn.methods.registry import chunks  # noqa: E402
from unlearn.methods.retain_stats import load_retain_stats  # noqa: E402
from unlearn.methods.slug import find_edit, read_patch, slug_config  # noqa: E402
from unlearn.models.adapter import load  # noqa: E402
from unlearn.models.train import load_pairs  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402


def figures(r: dict, base: dict) -> dict:
    """The sum's test figures as the stage reports them, in %."""
    worst = max((v["top1"], v["top5"]) for v in r["targets"].values())
    return {"worst_fa1": round(100 * worst[0], 2), "worst_fa5": round(100 * worst[1], 2),
            "identity": round(100 * r["retain"]["identity"]["top1"], 2), "identity_base": round(100 * base["retain"]["identity"]["top1"], 2),
            "object": round(100 * r["retain"]["object"]["top1"], 2), "object_base": round(100 * base["retain"]["object"]["top1"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", type=int, default=5, help="the first k concepts of forget_many.concepts")
    ap.add_argument("--towers", nargs="*", default=[], help="part 2 for each of these towers (image, text)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    p = load_yaml("params.yaml")
    concepts = resolve_concepts(p["forget_many"]["concepts"], p["concepts"], "forget_many.concepts")
    if not 2 <= args.k <= len(concepts):
        sys.exit(f"error: -k must be between 2 and {len(concepts)} (the length of forget_many.concepts)")
    concepts = concepts[: args.k]
    cfg = slug_config(p["slug"])
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, moments="shared"))  # as forget_many's paper modes: the shared retain moments
    adapter = load("models/base")
    for t in args.towers:
        if t not in adapter.towers:
            sys.exit(f"error: --towers names {t!r}; this model's towers are {', '.join(adapter.towers)}")
    split = (float(p["eval"]["split"]["val_fraction"]), int(p["eval"]["split"]["seed"]))
    batch, grad_batch = int(p["eval"]["batch_size"]), int(p["gradients"]["batch_size"])
    val = ManyEvaluator(adapter, "data/eval", concepts, "val", *split, batch)
    test = ManyEvaluator(adapter, "data/eval", concepts, "test", *split, batch)
    params = dict(adapter.model.named_parameters())

    # 1. the stage's own edits, in every combination
    edits = []
    for c in concepts:
        try:
            meta, tensors = read_patch(f"models/many/{c.slug}", "run `dvc repro forget_many`")
        except UnlearnError as e:
            sys.exit(f"error: {e}")
        edits.append(ConceptEdit(c.name, meta["layer"], tensors[meta["layer"]]))
    base = {e.layer: params[e.layer].detach().clone() for e in edits}

    def combined(subset) -> dict:
        names = [e.name for e in subset]
        set_sum(adapter, base, [], 0.0)
        before = test.evaluate(names)
        set_sum(adapter, base, list(subset), 1.0)
        after = test.evaluate(names)
        set_sum(adapter, base, [], 0.0)
        return {"concepts": names, "layers": [adapter.short_name(e.layer) for e in subset], **figures(after, before)}

    rows = [{"set": "alone", **combined([e])} for e in edits]
    rows += [{"set": "pair", **combined(pair)} for pair in itertools.combinations(edits, 2)]
    rows += [{"set": f"all {args.k}", **combined(edits)}]
    rows += [{"set": "all but one", **combined([x for x in edits if x is not e])} for e in edits]
    for r in rows:
        print(f"{r['set']:>11}: {' + '.join(r['concepts'])}: identity {r['identity_base']} -> {r['identity']}, "
              f"ImageNet-style {r['object_base']} -> {r['object']}, worst FA@1/FA@5 {r['worst_fa1']}/{r['worst_fa5']}", flush=True)

    # 2. the sum mode with every search on one tower
    towers = {}
    solo = table_concepts(p["concepts"]) if p["curate"]["solo"] else ()
    stats = load_retain_stats("models/retain", adapter, "models/base", "data/retain/manifest.json")[0] if args.towers else None
    for tower in args.towers:
        rank = dataclasses.replace(cfg.rank, towers=[tower])
        found = []
        for c in concepts:
            with tempfile.TemporaryDirectory() as tmp:
                curate_forget("data/laion", c, int(p["curate"]["forget_max"]), int(p["curate"]["seed"]), Path(tmp), solo,
                              joined=bool(p["curate"]["joined"]))
                forget = load_pairs(adapter, tmp)
            evaluator = Evaluator(adapter, concept_tasks("data/eval", c, "val", *split), batch)
            edit, _ = find_edit(adapter, lambda f=forget: chunks(f, grad_batch), stats, evaluator, c.kind, rank, cfg.search)
            found.append((ConceptEdit(c.name, edit.layer, edit.delta), edit.rho, edit.converged))
            print(f"{tower}: {c.name}: {adapter.short_name(edit.layer)} rho {edit.rho:.3g} (converged {edit.converged})", flush=True)
        tower_base = {e.layer: params[e.layer].detach().clone() for e, _, _ in found}
        sums = []
        for k in sorted({1, 2, args.k}):
            names = [e.name for e, _, _ in found[:k]]
            r = judge(adapter, tower_base, [e for e, _, _ in found[:k]], val, test, cfg.search, val.evaluate(names), test.evaluate(names))
            sums.append({"k": k, "scale": r["scale"], "passes_validation": r["converged"], **figures(r["test"], r["base_test"])})
            print(f"{tower}: first {k} summed (scale {r['scale']}, passes validation {r['converged']}): identity "
                  f"{sums[-1]['identity_base']} -> {sums[-1]['identity']}, ImageNet-style {sums[-1]['object_base']} -> {sums[-1]['object']}, "
                  f"worst FA@1/FA@5 {sums[-1]['worst_fa1']}/{sums[-1]['worst_fa5']}", flush=True)
        towers[tower] = {"edits": [{"concept": e.name, "layer": adapter.short_name(e.layer), "rho": round(rho, 4), "converged": ok}
                                   for e, rho, ok in found], "sums": sums}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "forget_many_interactions.json").write_text(json.dumps({"k": args.k, "combinations": rows, "towers": towers}, indent=1) + "\n")
    md = [f"The first {args.k} edits of `forget_many` (models/many), unscaled, test images, % (bench/forget_many_interactions.py)", "",
          "| edits | layers | identity @1 (not targets) | ImageNet-style @1 | worst FA@1 / FA@5 |", "|---|---|---|---|---|"]
    md += [f"| {r['set']}: {' + '.join(r['concepts'])} | {', '.join(r['layers'])} | {r['identity_base']} → {r['identity']} | "
           f"{r['object_base']} → {r['object']} | {r['worst_fa1']} / {r['worst_fa5']} |" for r in rows]
    for tower, t in towers.items():
        md += ["", f"Sum mode with every search on the {tower} tower: " + "; ".join(
            f"{e['concept']} {e['layer']} ρ {e['rho']:.3g}{'' if e['converged'] else ' (not converged)'}" for e in t["edits"]), "",
            "| summed | scale | passes validation | identity @1 | ImageNet-style @1 | worst FA@1 / FA@5 |", "|---|---|---|---|---|---|"]
        md += [f"| {s['k']} | {s['scale']} | {s['passes_validation']} | {s['identity_base']} → {s['identity']} | {s['object_base']} → {s['object']} | "
               f"{s['worst_fa1']} / {s['worst_fa5']} |" for s in t["sums"]]
    (out / "forget_many_interactions.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
