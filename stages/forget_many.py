"""Stage `forget_many`: several concepts removed together by adding their single-layer edits
(unlearn/many.py).  Each concept's edit is found by SLUG on the base model (its forget set, the
shared retain statistics, its validation images) and saved as a patch under models/many/<concept>;
then for every k in `forget_many.counts` the first k edits are summed, checked on validation
(rescaled jointly if the sum breaks the forget criterion or the guard) and reported on test.
The other `forget_many.modes`: sequential (each edit found on the model holding the previous
ones), joint (one SLUG search for the first k together) and cumulative (as sequential, each search
judged on every target so far and guarded against the unedited model; unlearn/many.py; in the
metrics and the CSV, not drawn) and kept (as sum, each edit found with the retain moments pooled
with those of the table's concepts that are not removed; unlearn/many.py).  Writes
metrics/forget_many.json, plots/forget_many.{csv,png}, plots/forget_many_joint.png and
plots/forget_many_kept.png."""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections.abc import Callable

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.concept_pairs import forget_pairs
from unlearn.data.curate import Concept, resolve_concepts, table_concepts
from unlearn.errors import UnlearnError
from unlearn.eval.suite import Evaluator, ManyEvaluator, concept_tasks
from unlearn.io import atomic_outputs
from unlearn.many import BaseGuard, ConceptEdit, JointEvaluator, check_modes, forget_ok_all, guard_ok_all, judge
from unlearn.methods.kept import KeptMoments, pool_moments
from unlearn.methods.registry import chunks
from unlearn.methods.retain_stats import load_retain_stats
from unlearn.methods.slug import apply_edit, find_edit, save_patch, slug_config
from unlearn.models.adapter import fingerprint, load
from unlearn.params import stage_params
from unlearn.plots import forget_many_plot
from unlearn.runs import write_metrics

MODEL, SHARDS, EVAL, RETAIN, STATS = "models/base", "data/laion", "data/eval", "data/retain", "models/retain"
PATCHES, METRICS, CSV = "models/many", "metrics/forget_many.json", "plots/forget_many.csv"
PNG, JOINT_PNG, KEPT_PNG = "plots/forget_many.png", "plots/forget_many_joint.png", "plots/forget_many_kept.png"
log = logging.getLogger("forget_many")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("forget_many")
    concepts = resolve_concepts(p("forget_many.concepts"), p("concepts"), "forget_many.concepts")
    counts = [int(k) for k in p("forget_many.counts")]
    if not counts or counts != sorted(set(counts)) or counts[0] < 1 or counts[-1] > len(concepts):
        raise UnlearnError(f"forget_many.counts is {counts}; list increasing numbers from 1 to {len(concepts)} (the length of forget_many.concepts)")
    cfg = slug_config(p("slug"))
    # every mode sets its own moments: the paper's modes the shared retain moments, kept the table's less the first k (below)
    cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, moments="shared"))
    modes = check_modes(p("forget_many.modes"), concepts, cfg.search.direction)
    split = (float(p("eval.split.val_fraction")), int(p("eval.split.seed")))
    batch, grad_batch = int(p("eval.batch_size")), int(p("gradients.batch_size"))
    table = table_concepts(p("concepts"))
    solo = table if p("curate.solo") else ()
    adapter = load(MODEL, device=torch_device(p("model.device")))
    stats, _ = load_retain_stats(STATS, adapter, MODEL, f"{RETAIN}/manifest.json")

    # every concept's pairs as curate selects its forget set, in one scan of the shards: the
    # concepts removed, and with the kept mode every concept of the table
    forget_sets = forget_pairs(adapter, SHARDS, table if "kept" in modes else concepts, int(p("curate.forget_max")), int(p("curate.seed")), solo,
                               bool(p("curate.joined")))
    evaluators = {c.name: Evaluator(adapter, concept_tasks(EVAL, c, "val", *split), batch) for c in concepts}
    val = ManyEvaluator(adapter, EVAL, concepts, "val", *split, batch)
    test = ManyEvaluator(adapter, EVAL, concepts, "test", *split, batch)
    params = dict(adapter.model.named_parameters())
    original = {n: t.detach().clone() for n, t in params.items()}

    def restore() -> None:
        with torch.no_grad():
            for n, t in params.items():
                t.copy_(original[n])

    def slug_for(c: Concept, evaluator=None):
        """SLUG's edit for concept `c` on the model as it is now, its search judged by `evaluator` (default: c's own)."""
        forget = forget_sets[c.name]
        return find_edit(adapter, lambda: chunks(forget, grad_batch), stats, evaluators[c.name] if evaluator is None else evaluator, c.kind, cfg.rank, cfg.search)

    with atomic_outputs(PATCHES, METRICS, CSV, PNG, JOINT_PNG, KEPT_PNG) as (patches, metrics, csv_path, png, joint_png, kept_png):
        names_of = {k: [x.name for x in concepts[:k]] for k in counts}
        base_val = {k: val.evaluate(names_of[k]) for k in counts}    # the unedited model, the first k as targets
        base_test = {k: test.evaluate(names_of[k]) for k in counts}

        def removed(k: int, **extra) -> dict:
            """The model as it is now, with the first k concepts as targets: validation and test."""
            v, t = val.evaluate(names_of[k]), test.evaluate(names_of[k])
            return {"k": k, "concepts": names_of[k], "scale": 1.0, **extra,
                    "converged": forget_ok_all(v, cfg.search) and guard_ok_all(v, base_val[k], cfg.search),
                    "validation": v, "test": t, "base_test": base_test[k]}

        # the paper's way: every edit found on the base model, the first k added up
        results, per_concept = [], []
        if "sum" in modes:
            edits = []
            for c in concepts:
                edit, times = slug_for(c)
                (patches / c.slug).mkdir()
                save_patch(patches / c.slug, edit.layer, edit.delta, {"concept": c.name, "kind": c.kind, "rho": edit.rho, "converged": edit.converged,
                                                                      "family": adapter.family, "base_model_sha256": fingerprint(MODEL)})
                edits.append(ConceptEdit(c.name, edit.layer, edit.delta))
                per_concept.append({"concept": c.name, "layer": edit.layer, "rho": edit.rho, "converged": edit.converged,
                                    "time_s": round(times["unlearn"], 3)})
                log.info("%s: %s rho %.4g (converged %s, %.1f s)", c.name, adapter.short_name(edit.layer), edit.rho, edit.converged, times["unlearn"])
            base = {e.layer: original[e.layer] for e in edits}
            for k in counts:
                r = judge(adapter, base, edits[:k], val, test, cfg.search, base_val[k], base_test[k])
                results.append(r)
                _log("sum", k, r)
        def one_after_another(mode: str, evaluator_of: Callable[[int, Concept], object]) -> tuple[list[dict], list[dict]]:
            """Each concept's edit found on the model that holds the previous ones, its search judged by
            `evaluator_of(i, concept)`, and applied; the model after the first k for every k of `counts`
            (and each concept's edit); the base weights restored."""
            after, found = [], []
            for i, c in enumerate(concepts, 1):
                edit, times = slug_for(c, evaluator_of(i, c))
                apply_edit(adapter, edit.layer, edit.delta)
                found.append({"concept": c.name, "layer": edit.layer, "rho": edit.rho, "converged": edit.converged, "time_s": round(times["unlearn"], 3)})
                log.info("%s %s: %s rho %.4g (converged %s)", mode, c.name, adapter.short_name(edit.layer), edit.rho, edit.converged)
                if i in counts:
                    after.append(removed(i))
                    _log(mode, i, after[-1])
            restore()
            return after, found

        # sequentially: each concept's edit found on the model that already holds the previous ones, judged by its own evaluator
        sequential, seq_concepts = one_after_another("sequential", lambda i, c: evaluators[c.name]) if "sequential" in modes else ([], [])
        # jointly: one search for the first k together (their forget sets' union, every target's validation images)
        joint = []
        if "joint" in modes:
            for k in counts:
                union = tuple(torch.cat([forget_sets[c.name][j] for c in concepts[:k]]) for j in (0, 1))
                evaluator = JointEvaluator(adapter, EVAL, concepts[:k], "val", *split, batch)
                edit, times = find_edit(adapter, lambda u=union: chunks(u, grad_batch), stats, evaluator, concepts[0].kind, cfg.rank, cfg.search)
                apply_edit(adapter, edit.layer, edit.delta)
                joint.append(removed(k, layer=edit.layer, rho=edit.rho, search_converged=edit.converged, forget_pairs=int(union[0].shape[0]),
                                     time_s=round(times["unlearn"], 3)))
                restore()
                _log("joint", k, joint[-1])
        # cumulatively: as sequential, but each search judged on every target so far (the worst) and guarded against the unedited model
        cumulative, cum_concepts = [], []
        if "cumulative" in modes:
            judges = [JointEvaluator(adapter, EVAL, concepts[:i], "val", *split, batch) for i in range(1, len(concepts) + 1)]
            unedited = [j.evaluate() for j in judges]   # the guard's reference for every search: the model before any edit
            cumulative, cum_concepts = one_after_another("cumulative", lambda i, c: BaseGuard(judges[i - 1], unedited[i - 1]))
        # kept: as sum, each of the first k edits found with the retain moments pooled with those of the table's concepts not removed
        kept = []
        if "kept" in modes:
            table_moments = KeptMoments(adapter, list(stats.moments), {c.name: forget_sets[c.name] for c in table}, grad_batch)
            for k in counts:
                moments, n_kept = table_moments.without(names_of[k])
                pooled = dataclasses.replace(stats, moments=pool_moments(stats.moments, stats.n_retain, moments, n_kept))
                edits, found = [], []
                for c in concepts[:k]:
                    forget = forget_sets[c.name]
                    edit, times = find_edit(adapter, lambda f=forget: chunks(f, grad_batch), pooled, evaluators[c.name], c.kind, cfg.rank, cfg.search)
                    edits.append(ConceptEdit(c.name, edit.layer, edit.delta))
                    found.append({"concept": c.name, "layer": edit.layer, "rho": edit.rho, "converged": edit.converged, "time_s": round(times["unlearn"], 3)})
                r = judge(adapter, {e.layer: original[e.layer] for e in edits}, edits, val, test, cfg.search, base_val[k], base_test[k])
                kept.append(r | {"kept_concepts": len(table) - k, "kept_pairs": n_kept, "kept_weight": round(n_kept / (n_kept + stats.n_retain), 4),
                                 "edits": found})
                _log("kept", k, kept[-1])
        rows = [{"mode": mode, "removed": r["k"], "max_forget_top1": max(v["top1"] for v in r["test"]["targets"].values()),
                 "max_forget_top5": max(v["top5"] for v in r["test"]["targets"].values()),
                 "identity_retain_top1": r["test"]["retain"]["identity"]["top1"], "identity_retain_base": r["base_test"]["retain"]["identity"]["top1"],
                 "object_top1": r["test"]["retain"]["object"]["top1"], "object_base": r["base_test"]["retain"]["object"]["top1"],
                 "scale": r["scale"], "converged": r["converged"]}
                for mode, rs in (("sum", results), ("sequential", sequential), ("joint", joint), ("cumulative", cumulative), ("kept", kept)) for r in rs]
        write_metrics(metrics, {"concepts": per_concept, "counts": counts, "results": results, "sequential_concepts": seq_concepts,
                             "sequential": sequential, "joint": joint, "cumulative_concepts": cum_concepts, "cumulative": cumulative, "kept": kept, "rows": rows,
                             "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb()}, "forget_many")
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        # two figures, each mode of a figure with its own line style: the sum against the sequential edits, and the joint search against the sum
        of = lambda *ms: [r for m in ms for r in rows if r["mode"] == m]  # noqa: E731
        pairs = of("sum", "sequential"), of("joint", "sum"), of("kept", "sum")
        forget_many_plot(pairs[0] or rows, png, f"the first k of {len(concepts)} concepts removed: SLUG edits added up / found one after another (test images)")
        forget_many_plot(pairs[1] or rows, joint_png, f"the first k of {len(concepts)} concepts removed: one joint SLUG search / edits added up (test images)")
        forget_many_plot(pairs[2] or rows, kept_png, f"the first k of {len(concepts)} concepts removed: edits preconditioned on the concepts kept / "
                         "edits added up (test images)")


def _log(mode: str, k: int, r: dict) -> None:
    t = r["test"]
    log.info("%s, %d removed (scale %.2f%s): max FA@1 %.3f, max FA@5 %.3f; retain identity@1 %.3f -> %.3f, ImageNet-style@1 %.3f -> %.3f (test)",
             mode, k, r["scale"], "" if r["converged"] else ", NOT passing on validation", max(v["top1"] for v in t["targets"].values()),
             max(v["top5"] for v in t["targets"].values()), r["base_test"]["retain"]["identity"]["top1"], t["retain"]["identity"]["top1"],
             r["base_test"]["retain"]["object"]["top1"], t["retain"]["object"]["top1"])


if __name__ == "__main__":
    run_stage("forget_many", main)
