"""SLUG's cost on the default world, against its floor and the baselines (one process, one run).

Per concept: the time split of SLUG with the shared retain statistics and (with
`slug.search.moments: kept`, the default) the table's concept moments, both computed once here
and timed apart, as is the unedited model's reference pass over the validation images that
every concept's search shares (`SharedBase`: a cost per model; the search stage, one concept
per process, pays it inside its search) (forget gradient, ranking, directions with the target's
own moments, base scoring of the concept's own sets, step scoring on the target's images and on
the guard sets), its floor
(one forward+backward over the forget set, timed alone in the same process before SLUG runs)
and the ratio; the one-time retain statistics; how the cost grows with the number of concepts
(1, 5, 24) and with the retain-set size (500, 2,000, 8,000 pairs drawn from every shard: timing
only, the pairs' captions do not change the cost); GA+FT's and SalUn's times on the comparison's
concepts from the same run, each concept's SLUG run and baseline runs back to back (the
`interleaved` means: a slower spell of a shared machine falls on every method alike); and, for
the comparison's concepts, whether scoring only the
decisions (`slug.search.evaluate: decisions`) chooses the same (layer, rho) as scoring every step
on every set (`all`), and what the evaluator's one-pass cache of every vision block saves against
keeping one block at a time (the same search run both ways, interleaved: same edit, and the
times in the same machine state).

Needs `dvc repro retain_set` (models/base, data/, data/retain).  About 8 minutes on 2 CPU cores.  Writes the table and a plot
under --out (default bench/results/).

    python bench/slug_cost.py                       # every identity, sizes 500 2000 8000
    python bench/slug_cost.py --concepts 5 --sizes 500
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
from unlearn.methods.registry import chunks, run_method  # noqa: E402
from unlearn.methods.retain_stats import compute_retain_stats  # noqa: E402
from unlearn.methods.slug import find_edit, forget_gradient, slug_config  # noqa: E402
from unlearn.models.adapter import load  # noqa: E402
from unlearn.models.train import load_pairs  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, default=24, help="identities timed (the table's first N; the scaling rows use 1, 5 and N)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 8000], help="retain-set sizes timed")
    ap.add_argument("--baselines", nargs="*", default=["ga_ft", "salun"])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    params = load_yaml("params.yaml")
    cfg = slug_config(params["slug"])
    split = (params["eval"]["split"]["val_fraction"], params["eval"]["split"]["seed"])
    batch, grad_batch, cur = params["eval"]["batch_size"], params["gradients"]["batch_size"], params["curate"]
    every = table_concepts(params["concepts"])
    table = [c for c in every if c.kind == "identity"][: args.concepts]
    compare = [c for c in table_concepts(params["concepts"]) if c.name in params["compare"]["concepts"]]
    adapter = load("models/base")
    base_state = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    retain = load_pairs(adapter, "data/retain")
    stats, retain_s = timed(lambda: compute_retain_stats(adapter, lambda: chunks(retain, grad_batch)))
    print(f"retain statistics (once): {retain_s:.2f} s over {stats.n_retain} pairs, {len(stats.moments)} moment tensors")

    rows = []
    # every concept of the table (the kept moments read them all), as curate selects each forget set, in one scan
    forget_sets = forget_pairs(adapter, "data/laion", every, cur["forget_max"], cur["seed"], every if cur["solo"] else (), bool(cur["joined"]))
    table_moments, table_s = None, 0.0
    if cfg.search.moments == "kept":
        table_moments, table_s = timed(lambda: compute_table_moments(adapter, list(stats.moments), forget_sets, grad_batch))
        print(f"concept moments (once): {table_s:.2f} s over {table_moments.n_every} pairs of {len(forget_sets)} concepts")

    def moments(c):
        """The concept's moments source for find_edit (None: the retain statistics' own)."""
        if table_moments is None:
            return None
        return table_moments.kept_source(adapter, stats, c.name, forget_sets[c.name], grad_batch)
    forget_gradient(adapter, chunks(forget_sets[table[0].name], grad_batch))  # warm-up: the first backward pass pays for allocation
    # the unedited model's reference pass over the validation images, shared by every concept's search: a cost per model, read
    # and timed once here like the statistics above (the search stage, one concept per process, pays it in its search)
    base_pass = SharedBase()
    _, reference_s = timed(lambda: Evaluator(adapter, concept_tasks("data/eval", table[0], "val", *split), batch, shared=base_pass).evaluate(reference=True))
    print(f"reference pass (once): {reference_s:.2f} s")
    for c in table:
        forget = forget_sets[c.name]
        _, floor = timed(lambda f=forget: forget_gradient(adapter, chunks(f, grad_batch)))
        evaluator = Evaluator(adapter, concept_tasks("data/eval", c, "val", *split), batch, shared=base_pass)
        (edit, t), _ = timed(lambda f=forget, e=evaluator, c=c: find_edit(adapter, lambda: chunks(f, grad_batch), stats, e, c.kind, cfg.rank, cfg.search,
                                                                                                  moments=moments(c)))
        kept = t["eval_guard"] / max(edit.times["evals_guard"], 1)  # one guard scoring: what a kept step costs
        row = {"concept": c.name, "pairs": int(forget[0].shape[0]), "floor_s": floor, **{f"{k}_s": v for k, v in t.items()},
               "evals_forget": edit.times["evals_forget"], "evals_guard": edit.times["evals_guard"], "kept_step_s": kept,
               "ratio_to_floor": t["unlearn"] / floor, "target_s": 3 * floor + kept, "layer": edit.layer, "rho": edit.rho, "converged": edit.converged}
        rows.append(row)
        print(f"{c.name:20s} {row['pairs']:4d} pairs  floor {floor:5.2f} s  slug {t['unlearn']:5.2f} s (grad {t['forget_gradient']:.2f}, "
              f"base {t['base_eval']:.2f}, forget scoring {t['eval_forget']:.2f} x{row['evals_forget']}, guard {t['eval_guard']:.2f} x{row['evals_guard']})"
              f"  ratio {row['ratio_to_floor']:.1f}  <= 3 floor + kept {row['target_s']:.2f}: {t['unlearn'] <= row['target_s']}")

    checks = []
    all_cfg = dataclasses.replace(cfg.search, evaluate="all")
    for c in compare:
        forget = forget_sets[c.name]
        ev = Evaluator(adapter, concept_tasks("data/eval", c, "val", *split), batch)
        (a, ta) = find_edit(adapter, lambda f=forget: chunks(f, grad_batch), stats, ev, c.kind, cfg.rank, cfg.search, moments=moments(c))
        # the same search with the evaluator's cache before its one-pass fill (one vision block kept at a time), interleaved
        # here so that both run in the same machine state: the cache's gain, and the same edit
        one_block = Evaluator(adapter, concept_tasks("data/eval", c, "val", *split), batch, hidden_cache_bytes=0)
        (a1, ta1) = find_edit(adapter, lambda f=forget: chunks(f, grad_batch), stats, one_block, c.kind, cfg.rank, cfg.search, moments=moments(c))
        (b, tb) = find_edit(adapter, lambda f=forget: chunks(f, grad_batch), stats, ev, c.kind, cfg.rank, all_cfg, moments=moments(c))
        same = (a.layer, a.rho, a.converged) == (b.layer, b.rho, b.converged) and torch.equal(a.delta, b.delta)
        same_cache = (a.layer, a.rho) == (a1.layer, a1.rho) and torch.equal(a.delta, a1.delta)
        checks.append({"concept": c.name, "decisions": [a.layer, a.rho], "all": [b.layer, b.rho], "same": same,
                       "search_s_decisions": ta["search"], "search_s_all": tb["search"], "guard_evals": [a.times["evals_guard"], b.times["evals_guard"]],
                       "search_s_one_block_cache": ta1["search"], "unlearn_s": ta["unlearn"], "unlearn_s_one_block_cache": ta1["unlearn"],
                       "same_with_one_block_cache": same_cache})
        print(f"choice check {c.name}: decisions {a.layer} rho {a.rho:.4g} ({ta['search']:.2f} s, {a.times['evals_guard']} guard scorings) | "
              f"all {b.layer} rho {b.rho:.4g} ({tb['search']:.2f} s, {b.times['evals_guard']}) | same: {same} | "
              f"one-block cache: {ta1['search']:.2f} s search, same edit: {same_cache}")

    # SLUG and the baselines concept by concept, back to back, so that a slower spell of a shared
    # machine falls on every method alike (the rows above ran minutes earlier)
    baselines = []
    for c in compare:
        for m in ["slug", *args.baselines]:
            with torch.no_grad():
                for n, p in adapter.model.named_parameters():
                    p.copy_(base_state[n])
            ev = Evaluator(adapter, concept_tasks("data/eval", c, "val", *split), batch, shared=base_pass)
            if m == "slug":
                edit, t = find_edit(adapter, lambda f=forget_sets[c.name]: chunks(f, grad_batch), stats, ev, c.kind, cfg.rank, cfg.search,
                                    moments=moments(c))
                status, seconds = ("ok" if edit.converged else "not_converged"), t["unlearn"]
            else:
                out = run_method(m, adapter, forget_sets[c.name], retain, ev, c.kind, params[m], grad_batch)
                status, seconds = out.status, out.time_s["unlearn"]
            baselines.append({"method": m, "concept": c.name, "status": status, "unlearn_s": seconds})
            print(f"{m} {c.name}: {status}, {seconds:.2f} s (training up to the reported epoch)")
    with torch.no_grad():
        for n, p in adapter.model.named_parameters():
            p.copy_(base_state[n])

    all_pairs = load_pairs(adapter, "data/laion")
    sizes = []
    g = torch.Generator().manual_seed(0)
    for n in args.sizes:
        idx = torch.randint(0, all_pairs[0].shape[0], (n,), generator=g) if n > all_pairs[0].shape[0] else torch.randperm(all_pairs[0].shape[0], generator=g)[:n]
        pairs = (all_pairs[0][idx], all_pairs[1][idx])
        _, s = timed(lambda x=pairs: compute_retain_stats(adapter, lambda: chunks(x, grad_batch)))
        sizes.append({"retain_pairs": n, "retain_stats_s": s})
        print(f"retain statistics over {n} pairs: {s:.2f} s")

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    per = [r["unlearn_s"] for r in rows]
    growth = []
    once = retain_s + table_s + reference_s
    for n in sorted({1, min(5, len(rows)), len(rows)}):
        growth.append({"concepts": n, "shared_s": once + sum(per[:n]), "per_concept_stats_s": sum(per[:n]) + n * once, "amortised_per_concept_s": (once + sum(per[:n])) / n})
    summary = {
        "retain_stats_s": retain_s, "n_retain": stats.n_retain, "moments": cfg.search.moments, "concept_moments_s": table_s, "reference_pass_s": reference_s,
        "concept_moments_pairs": table_moments.n_every if table_moments else None, "slug_per_concept_s": mean(per), "floor_s": mean([r["floor_s"] for r in rows]),
        "ratio_to_floor": mean([r["ratio_to_floor"] for r in rows]), "within_3_floor_plus_kept": sum(r["unlearn_s"] <= r["target_s"] for r in rows),
        "baselines_per_concept_s": {m: mean([b["unlearn_s"] for b in baselines if b["method"] == m]) for m in args.baselines},
        "interleaved_per_concept_s": {m: mean([b["unlearn_s"] for b in baselines if b["method"] == m]) for m in ["slug", *args.baselines]},
        "slug_per_concept_s_compare": mean([r["unlearn_s"] for r in rows if r["concept"] in params["compare"]["concepts"]]) if any(
            r["concept"] in params["compare"]["concepts"] for r in rows) else None,
        "choice_same": all(c["same"] for c in checks),
        "cache_ab": {"unlearn_s_one_pass": mean([c["unlearn_s"] for c in checks]) if checks else None,
                     "unlearn_s_one_block": mean([c["unlearn_s_one_block_cache"] for c in checks]) if checks else None,
                     "same_edits": all(c["same_with_one_block_cache"] for c in checks)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slug_cost.json").write_text(json.dumps({"summary": summary, "concepts": rows, "growth": growth, "sizes": sizes, "baselines": baselines,
                                                    "choice_checks": checks, "threads": torch.get_num_threads()}, indent=2) + "\n")
    lines = [f"SLUG's moments: {cfg.search.moments}; once per model: retain statistics {retain_s:.1f} s" + (f", concept moments {table_s:.1f} s" if table_moments else "")
             + f", the reference pass over the validation images {reference_s:.2f} s", "",
             "| concepts | once per model + SLUG per concept, s | once-per-model work per concept (before), s | amortised per concept, s |", "|---|---|---|---|"]
    lines += [f"| {g_['concepts']} | {g_['shared_s']:.1f} | {g_['per_concept_stats_s']:.1f} | {g_['amortised_per_concept_s']:.2f} |" for g_ in growth]
    lines += ["", "| retain pairs | retain statistics, s |", "|---|---|"] + [f"| {s['retain_pairs']:,} | {s['retain_stats_s']:.1f} |" for s in sizes]
    (out / "slug_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(summary, indent=2))
    plot(rows, growth, sizes, out / "slug_cost.png")


def plot(rows, growth, sizes, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    parts = [("forget_gradient_s", "forget gradient"), ("directions_s", "directions (own moments, solve)"), ("base_eval_s", "base scoring"),
             ("eval_forget_s", "steps: target's images"), ("eval_guard_s", "steps: guard sets")]
    bottom = [0.0] * len(rows)
    for k, label in [*parts, ("", "the rest (ranking, bookkeeping)")]:
        v = [r[k] if k else r["unlearn_s"] - sum(r[q] for q, _ in parts) for r in rows]
        axes[0].bar(range(len(rows)), v, bottom=bottom, label=label)
        bottom = [b + x for b, x in zip(bottom, v)]
    axes[0].plot(range(len(rows)), [r["floor_s"] for r in rows], "k_", ms=12, label="floor (fwd+bwd over the forget set)")
    axes[0].plot(range(len(rows)), [r["target_s"] for r in rows], "rv", ms=4, label="bound: 3 x floor + one guard scoring")
    axes[0].set_xticks(range(len(rows)), [r["concept"].split()[-1] for r in rows], rotation=90, fontsize=6)
    axes[0].set_ylabel("seconds per concept")
    axes[0].set_ylim(0, 1.5 * max(max(r["target_s"], r["unlearn_s"]) for r in rows))  # room for the legend above the bars
    axes[0].legend(fontsize=6, ncol=2, loc="upper center")
    axes[1].plot([g["concepts"] for g in growth], [g["shared_s"] for g in growth], "o-", label="once per model (retain statistics, concept moments, reference pass)")
    axes[1].plot([g["concepts"] for g in growth], [g["per_concept_stats_s"] for g in growth], "s--", label="the once-per-model work for every concept")
    axes[1].set_xlabel("concepts")
    axes[1].set_ylabel("total seconds")
    axes[1].legend(fontsize=7)
    axes[2].plot([s["retain_pairs"] for s in sizes], [s["retain_stats_s"] for s in sizes], "o-")
    axes[2].set_xlabel("retain pairs")
    axes[2].set_ylabel("retain statistics, seconds (once)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
