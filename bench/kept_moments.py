"""One concept at a time, SLUG with the shared retain moments against the kept moments.

The kept moments (`slug.search.moments: kept`, the default since 2026-12-05; docs/clip.md "The kept
moments") pool the retain input moments with those of the pairs of every other concept of the
table.  Per identity, the search stage's SLUG (`find_edit`, validation images) once with
`moments: shared` (the retain statistics alone) and once with `moments: kept`, C = (n_r C_r +
n_k C_k) / (n_r + n_k), the kept set being every concept of the table but the target (the
concatenation of each concept's pairs as curate selects its forget set: its moments are those of
all concepts' pairs, read once, less the target's, read by the search for its planned layers);
each edit judged on the test images (FA@1, FA@5, identity retain @1, ImageNet-style @1 against
the unedited model).

Needs `dvc repro retain_stats` (models/base, models/retain, data/).  Writes
bench/results/kept_moments.{json,md}.

    python bench/kept_moments.py                  # every identity (about 6 min on 2 CPU cores)
    python bench/kept_moments.py --concepts 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from unlearn.data.concept_pairs import forget_pairs  # noqa: E402
from unlearn.data.curate import table_concepts  # noqa: E402
from unlearn.eval.suite import Evaluator, SharedBase, concept_tasks  # noqa: E402
from unlearn.methods.kept import compute_table_moments  # noqa: E402
from unlearn.methods.registry import chunks  # noqa: E402
from unlearn.methods.retain_stats import load_retain_stats  # noqa: E402
from unlearn.methods.slug import apply_edit, find_edit, slug_config  # noqa: E402
from unlearn.models.adapter import load  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402

MODEL, STATS, RETAIN, SHARDS, EVAL = "models/base", "models/retain", "data/retain", "data/laion", "data/eval"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=24, help="identities (the table's first N)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    p = load_yaml("params.yaml")
    cfg = slug_config(p["slug"])
    if cfg.search.direction != "retain_preconditioned":
        sys.exit("slug.search.direction is gradient: the moments change nothing; set it to retain_preconditioned")
    split = (p["eval"]["split"]["val_fraction"], p["eval"]["split"]["seed"])
    batch, grad_batch, cur = p["eval"]["batch_size"], p["gradients"]["batch_size"], p["curate"]
    table = table_concepts(p["concepts"])
    solo = table if cur["solo"] else ()
    identities = [c for c in table if c.kind == "identity"][: args.concepts]
    adapter = load(MODEL)
    stats, _ = load_retain_stats(STATS, adapter, MODEL, f"{RETAIN}/manifest.json")
    pairs = forget_pairs(adapter, SHARDS, table, int(cur["forget_max"]), int(cur["seed"]), solo, bool(cur["joined"]))  # one scan
    t0 = time.perf_counter()
    table_moments = compute_table_moments(adapter, list(stats.moments), pairs, grad_batch)
    table_s = time.perf_counter() - t0
    print(f"moments of every concept's pairs: {table_moments.n_every} pairs, {table_s:.1f} s (once per model)", flush=True)
    shared_val, shared_test = SharedBase(), SharedBase()
    rows = []
    for c in identities:
        forget = pairs[c.name]
        # the search stage's kept moments: every concept's pairs but the target's, read for the planned layers inside the search
        # (the pass over the target's own pairs is in SLUG's time, in its directions)
        kept = table_moments.kept_source(adapter, stats, c.name, forget, grad_batch)
        variants = {"shared": (dataclasses.replace(cfg.search, moments="shared"), None), "kept": (dataclasses.replace(cfg.search, moments="kept"), kept)}
        test = Evaluator(adapter, concept_tasks(EVAL, c, "test", *split), batch, shared=shared_test)
        base = test.evaluate(reference=True)
        row = {"concept": c.name, "base": base, "kept_pairs": table_moments.n_every - int(forget[0].shape[0])}
        for name, (search_cfg, moments) in variants.items():
            val = Evaluator(adapter, concept_tasks(EVAL, c, "val", *split), batch, shared=shared_val)
            edit, times = find_edit(adapter, lambda f=forget: chunks(f, grad_batch), stats, val, c.kind, cfg.rank, search_cfg, moments=moments)
            param = dict(adapter.model.named_parameters())[edit.layer]
            original = param.detach().clone()
            apply_edit(adapter, edit.layer, edit.delta)
            try:
                after = Evaluator(adapter, concept_tasks(EVAL, c, "test", *split), batch).evaluate()
            finally:
                with torch.no_grad():
                    param.copy_(original)  # the same bits (x + d - d need not be x)
            row[name] = {"layer": edit.layer, "rho": edit.rho, "converged": edit.converged, "unlearn_s": round(times["unlearn"], 3),
                         "directions_s": round(times["directions"], 3), "test": after}
        rows.append(row)
        s, k = row["shared"], row["kept"]
        print(f"{c.name:20s} shared {adapter.short_name(s['layer'])} {s['rho']:.3g} retain {100 * (s['test']['retain_top1'] - base['retain_top1']):+.2f} "
              f"utility {100 * (s['test']['utility_top1'] - base['utility_top1']):+.2f} FA5 {100 * s['test']['forget_top5']:.1f} | kept "
              f"{adapter.short_name(k['layer'])} {k['rho']:.3g} retain {100 * (k['test']['retain_top1'] - base['retain_top1']):+.2f} "
              f"utility {100 * (k['test']['utility_top1'] - base['utility_top1']):+.2f} FA5 {100 * k['test']['forget_top5']:.1f}", flush=True)
    summary = {}
    for name in ("shared", "kept"):
        drops = [(100 * (r["base"]["retain_top1"] - r[name]["test"]["retain_top1"]), 100 * (r["base"]["utility_top1"] - r[name]["test"]["utility_top1"]))
                 for r in rows]
        meets = [r for r in rows if r[name]["test"]["forget_top1"] == 0 and r[name]["test"]["forget_top5"] <= cfg.search.forget_top5 + 1e-9
                 and r["base"]["retain_top1"] - r[name]["test"]["retain_top1"] <= cfg.search.max_identity_drop + 1e-9
                 and r["base"]["utility_top1"] - r[name]["test"]["utility_top1"] <= cfg.search.max_object_drop + 1e-9]
        summary[name] = {"mean_identity_retain_drop": round(sum(d[0] for d in drops) / len(rows), 3),
                         "max_identity_retain_drop": round(max(d[0] for d in drops), 3),
                         "mean_imagenet_style_drop": round(sum(d[1] for d in drops) / len(rows), 3),
                         "max_imagenet_style_drop": round(max(d[1] for d in drops), 3),
                         "converged": sum(r[name]["converged"] for r in rows), "meet_targets_on_test": len(meets),
                         "mean_unlearn_s": round(sum(r[name]["unlearn_s"] for r in rows) / len(rows), 3)}
    summary["kept"]["mean_directions_s"] = round(sum(r["kept"]["directions_s"] for r in rows) / len(rows), 3)  # with the target's own moments
    summary["shared"]["mean_directions_s"] = round(sum(r["shared"]["directions_s"] for r in rows) / len(rows), 3)
    summary["kept"]["table_moments_s"] = round(table_s, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kept_moments.json").write_text(json.dumps({"summary": summary, "concepts": rows, "threads": torch.get_num_threads()}, indent=2) + "\n")
    lines = [f"SLUG one identity at a time, test images: shared retain moments against the kept mode's (every other concept's pairs pooled in); "
             f"{len(rows)} identities", "",
             f"The kept moments cost one pass over every concept's pairs ({table_s:.1f} s, once per model) and, per concept, one forward pass over the "
             f"target's own pairs for the planned layers, inside SLUG's directions (the SLUG column holds it: directions "
             f"{summary['kept']['mean_directions_s']:.2f} s against {summary['shared']['mean_directions_s']:.2f} s).", "",
             "| moments | converged | meet the targets on test | identity retain drop, mean / max | ImageNet-style drop, mean / max | SLUG s per concept |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s['converged']} | {s['meet_targets_on_test']} | {s['mean_identity_retain_drop']:.2f} / {s['max_identity_retain_drop']:.2f} | "
              f"{s['mean_imagenet_style_drop']:.2f} / {s['max_imagenet_style_drop']:.2f} | {s['mean_unlearn_s']:.2f} |" for n, s in summary.items()]
    (out / "kept_moments.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
