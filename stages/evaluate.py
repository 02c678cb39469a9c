"""Stage `evaluate`: the unlearned model (base + the one-layer patch) and the base model on the
target's test images, the other classes of its kind, and the other kind's set; membership
inference; time, memory, storage.  Writes metrics/unlearn.json (one constant path)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import resolve_concept
from unlearn.data.pairs import pair_batches
from unlearn.eval.mia import ConceptAttack
from unlearn.eval.suite import ACCURACY_KEYS, Evaluator, concept_tasks
from unlearn.io import atomic_outputs
from unlearn.methods.slug import PATCH_WEIGHTS, apply_patch
from unlearn.models.adapter import load
from unlearn.params import stage_params
from unlearn.runs import cost, read_run, write_metrics

MODEL, PATCH, EVAL, FORGET, METRICS = "models/base", "models/unlearned", "data/eval", "data/forget", "metrics/unlearn.json"
log = logging.getLogger("evaluate")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("evaluate")
    concept = resolve_concept(str(p("concept")), p("concepts"))
    device = torch_device(p("model.device"))
    split = (float(p("eval.split.val_fraction")), int(p("eval.split.seed")))
    batch_size, folds, seeds = int(p("eval.batch_size")), int(p("eval.mia.folds")), int(p("eval.mia.seeds"))
    adapter = load(MODEL, device=device)
    tasks = concept_tasks(EVAL, concept, "test", *split)
    evaluator = Evaluator(adapter, tasks, batch_size)
    # members: the forget pairs; non-members: the target's held-out images with forget-set captions
    forget_pairs = list(pair_batches(FORGET, adapter.preprocess, adapter.tokenize, batch_size))
    attack = ConceptAttack(adapter, EVAL, concept, split, forget_pairs, f"{FORGET}/manifest.json", folds, seeds)

    base = evaluator.evaluate() | {"mia": attack(adapter)}
    meta = apply_patch(adapter, PATCH, MODEL)
    after = evaluator.evaluate() | {"mia": attack(adapter)}

    records = {stage: read_run(stage) or {} for stage in ("curate", "gradients", "rank_layers", "search")}
    times = {stage: r.get("time_s") for stage, r in records.items()}
    peaks = [r["peak_memory_mb"] for r in records.values() if r.get("peak_memory_mb") is not None]
    times["evaluate"] = round(time.perf_counter() - start, 2)
    known = lambda *stages: None if any(times[s] is None for s in stages) else round(sum(times[s] for s in stages), 2)  # noqa: E731
    times["unlearn"] = known("gradients", "rank_layers", "search")
    times["total"] = known("curate", "gradients", "rank_layers", "search", "evaluate")
    times["retain_stats_once"] = cost("retain_stats", "time_s")  # shared by every concept, not in unlearn or total
    if meta.get("moments") == "kept":
        times["concept_moments_once"] = cost("concept_moments", "time_s")  # the same (slug.search.moments: kept)
    metrics = {
        "concept": concept.name, "kind": concept.kind, "method": "slug",
        **{k: after[k] for k in ACCURACY_KEYS}, "mia": after["mia"],
        "layer": meta["layer"], "rho": meta["rho"], "converged": bool(meta["converged"]), "direction": meta["direction"],
        "moments": meta.get("moments"),
        "time_s": times, "peak_memory_mb": max(peaks + [peak_memory_mb()]),
        "stored_bytes": Path(PATCH, PATCH_WEIGHTS).stat().st_size,
        "images": {"forget": len(tasks.forget.paths), "retain": len(tasks.retain.paths), "utility": len(tasks.utility.paths)},
        "base": base,
    } | ({} if meta["converged"] else {"fallback": meta["fallback"]})  # which rule picked the unconverged step (slug.search.fallback)
    with atomic_outputs(METRICS) as (out,):
        write_metrics(out, metrics, "evaluate")
    if not metrics["converged"]:
        log.warning("the step search did not converge: these figures are for the best step seen, not a passing one")
    log.info("%s: FA@1 %.3f -> %.3f, FA@5 %.3f -> %.3f, retain@1 %.3f -> %.3f, other-kind@1 %.3f -> %.3f (test)", concept.name,
             base["forget_top1"], after["forget_top1"], base["forget_top5"], after["forget_top5"], base["retain_top1"], after["retain_top1"],
             base["utility_top1"], after["utility_top1"])


if __name__ == "__main__":
    run_stage("evaluate", main)
