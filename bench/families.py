"""SLUG on one base model held by two families: open_clip (q, k, v fused in one `in_proj_weight`
candidate) and hf_clip (its transformers export: `q_proj`, `k_proj`, `v_proj` separate).  Same
weights, same data, same params.yaml settings and evaluator as stage `compare_run@slug`; prints,
per concept and family, the chosen tensor and ρ, test FA@1/FA@5, retain @1 and other-kind @1
(base -> after), whether the search converged, and the unlearning time.

With `--layers`, each listed tensor is searched alone (no ranking), to see what one tensor can
do: `--layers q_proj k_proj v_proj out_proj --block 0` searches the first text block's attention
tensors of hf_clip (and `in_proj`/`out_proj` of open_clip), each as the whole edit.

Needs `dvc repro retain_set` (models/base, open_clip; the synthetic world, data/; the shared retain set, data/retain).

    python bench/families.py --concepts "Elon Musk" "Taylor Swift" Mickey
    python bench/families.py --concepts "Elon Musk" --layers q_proj k_proj v_proj in_proj out_proj --block 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from unlearn.data.curate import curate_forget, resolve_concept  # noqa: E402
from unlearn.eval.suite import Evaluator, concept_tasks  # noqa: E402
from unlearn.methods import slug  # noqa: E402
from unlearn.methods.registry import run_method  # noqa: E402
from unlearn.models.adapter import load  # noqa: E402
from unlearn.models.export import to_hf_clip  # noqa: E402
from unlearn.models.train import load_pairs  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", nargs="+", default=["Elon Musk", "Taylor Swift", "Mickey"])
    ap.add_argument("--families", nargs="+", default=["open_clip", "hf_clip"])
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--layers", nargs="*", default=None, help="search each of these text-block tensors alone (q_proj, in_proj, out_proj, ...)")
    ap.add_argument("--block", type=int, default=0, help="the text block of --layers")
    args = ap.parse_args()
    params = load_yaml("params.yaml")
    split = (params["eval"]["split"]["val_fraction"], params["eval"]["split"]["seed"])
    batch, grad_batch, cur = params["eval"]["batch_size"], params["gradients"]["batch_size"], params["curate"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.concepts:
            concept = resolve_concept(name, params["concepts"])
            sets = Path(tmp, concept.slug)
            (sets / "forget").mkdir(parents=True)
            curate_forget("data/laion", concept, cur["forget_max"], cur["seed"], sets / "forget")
            for family in args.families:
                torch.manual_seed(params["compare"]["seed"])
                adapter = load("models/base")
                if family == "hf_clip":
                    adapter = to_hf_clip(adapter)
                forget, retain = load_pairs(adapter, sets / "forget"), load_pairs(adapter, "data/retain")  # the shared retain set
                test = Evaluator(adapter, concept_tasks("data/eval", concept, "test", *split), batch)
                base = test.evaluate()
                val = Evaluator(adapter, concept_tasks("data/eval", concept, "val", *split), batch)
                if args.layers is not None:
                    rows += _single_tensors(adapter, family, name, concept, forget, retain, val, test, base, params, grad_batch, args)
                    continue
                t = time.perf_counter()
                # the shared retain moments: the concept moments (moments: kept) are the open_clip base model's, not an export's
                shared = {**params["slug"], "search": {**params["slug"]["search"], "moments": "shared"}}
                out = run_method("slug", adapter, forget, retain, val, concept.kind, shared, grad_batch)
                wall = time.perf_counter() - t
                after = test.evaluate()
                row = {"concept": name, "family": family, "layer": out.details["layer"], "short": adapter.short_name(out.details["layer"]),
                       "rho": out.details["rho"], "converged": out.details["converged"], "unlearn_s": out.time_s["unlearn"], "wall_s": round(wall, 1),
                       "base": base, "after": after}
                rows.append(row)
                print(f"{name:13s} {family:9s} {row['short']:22s} rho {row['rho']:.3g} converged {row['converged']}: "
                      f"FA@1 {base['forget_top1']:.3f}->{after['forget_top1']:.3f} FA@5 {base['forget_top5']:.3f}->{after['forget_top5']:.3f} "
                      f"retain@1 {base['retain_top1']:.3f}->{after['retain_top1']:.3f} other@1 {base['utility_top1']:.3f}->{after['utility_top1']:.3f} "
                      f"({out.time_s['unlearn']:.1f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


def _single_tensors(adapter, family, name, concept, forget, retain, val, test, base, params, grad_batch, args) -> list[dict]:
    """Each listed attention/MLP tensor of one text block searched alone, as the whole edit."""
    from unlearn.methods.registry import chunks
    from unlearn.methods.retain_stats import compute_retain_stats

    prefix = {"open_clip": f"transformer.resblocks.{args.block}.attn.", "hf_clip": f"text_model.encoder.layers.{args.block}.self_attn."}[family]
    names = {"in_proj": prefix + "in_proj_weight", "out_proj": prefix + "out_proj.weight",
             **{p: prefix + f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj")}}
    unknown = sorted(set(args.layers) - set(names))
    if unknown:
        raise SystemExit(f"error: unknown --layers {unknown}; use q_proj, k_proj, v_proj, in_proj, out_proj")
    layers = [names[k] for k in args.layers if names[k] in adapter.candidate_layers()]  # q/k/v exist in hf_clip, in_proj in open_clip
    cfg = slug.slug_config(params["slug"])
    g_f, _, _ = slug.forget_gradient(adapter, chunks(forget, grad_batch))
    stats = compute_retain_stats(adapter, lambda: chunks(retain, grad_batch))
    out = []
    for layer in layers:
        state = dict(adapter.model.named_parameters())[layer].detach().clone()
        edit = slug.search(adapter, val, g_f, {"all": {}}, {"all": [layer]}, cfg.search, concept.kind, stats.moments)
        slug.apply_edit(adapter, layer, edit.delta)
        after = test.evaluate()
        with torch.no_grad():
            dict(adapter.model.named_parameters())[layer].copy_(state)
        row = {"concept": name, "family": family, "layer": layer, "short": adapter.short_name(layer), "rho": edit.rho, "converged": edit.converged,
               "evaluations": len(edit.rows), "validation": {k: edit.choice[k] for k in ("forget_top1", "forget_top5", "retain_top1", "utility_top1")},
               "base": base, "after": after}
        out.append(row)
        v = row["validation"]
        print(f"{name:13s} {family:9s} {row['short']:22s} alone: rho {edit.rho:.3g} passed val {edit.converged} "
              f"(val FA@1 {v['forget_top1']:.3f} FA@5 {v['forget_top5']:.3f} retain {v['retain_top1']:.3f} other {v['utility_top1']:.3f}); "
              f"test FA@1 {after['forget_top1']:.3f} FA@5 {after['forget_top5']:.3f} retain@1 {after['retain_top1']:.3f} other@1 {after['utility_top1']:.3f}",
              flush=True)
    return out


if __name__ == "__main__":
    main()
