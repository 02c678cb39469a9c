"""Stage `search`: the relative step rho on the Pareto-front layers, judged on the target's
validation images with a utility guard; every evaluation logged; the chosen edit saved as a
one-layer patch (docs/methods.md, "SLUG")."""

from __future__ import annotations

import logging
import time

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import resolve_concept
from unlearn.eval.suite import Evaluator, concept_tasks
from unlearn.io import atomic_outputs, read_json
from unlearn.methods.kept import load_table_moments
from unlearn.methods.retain_stats import load_retain_stats
from unlearn.methods.slug import SIGN_CONVENTION, SearchConfig, load_gradients, save_patch, search
from unlearn.models.adapter import fingerprint, load
from unlearn.models.train import load_pairs
from unlearn.params import as_config, stage_params
from unlearn.runs import write_run
from unlearn.search_log import write_search_log

MODEL, GRADS, LAYERS, EVAL, STATS, RETAIN = "models/base", "models/grads", "metrics/layers.json", "data/eval", "models/retain", "data/retain"
FORGET, TABLE = "data/forget", "models/concept_moments"
PATCH, LOG_CSV, LOG_PNG = "models/unlearned", "plots/search.csv", "plots/search.png"
COLUMNS = ("layer", "tower", "eval", "rho", "forget_top1", "forget_top5", "retain_top1", "retain_top5", "utility_top1", "utility_top5", "forget_ok", "guard_ok",
           "scored")
log = logging.getLogger("search")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("search")
    cfg = as_config(SearchConfig, p("slug.search"), "slug.search")
    concept = resolve_concept(str(p("concept")), p("concepts"))
    adapter = load(MODEL, device=torch_device(p("model.device")))
    g_f, sidecar = load_gradients(GRADS, adapter, MODEL)
    moments = None
    if cfg.direction != "gradient":
        stats = load_retain_stats(STATS, adapter, MODEL, f"{RETAIN}/manifest.json")[0]
        moments = stats.moments
        if cfg.moments == "kept":  # the retain moments pooled with every other concept's, read for the searched layers only
            own = load_pairs(adapter, FORGET)
            moments = load_table_moments(TABLE, MODEL).kept_source(adapter, stats, concept.name, own, int(p("gradients.batch_size")), FORGET)
    ranking = read_json(LAYERS)
    tasks = concept_tasks(EVAL, concept, "val", float(p("eval.split.val_fraction")), int(p("eval.split.seed")))
    evaluator = Evaluator(adapter, tasks, int(p("eval.batch_size")))
    edit = search(adapter, evaluator, g_f, ranking["front"], ranking["order"], cfg, concept.kind, moments)
    choice = edit.choice
    if not edit.converged:
        log.warning("no step within rho <= %g on the %d searched layers (by Pareto rank) passes the forget criterion and the utility guard; "
                    "keeping the step that forgets most%s (%s, rho %.4g, FA@1 %.3f) and reporting converged: false", cfg.rho_max, len(edit.layers),
                    " within the guard" if choice["fallback"] == "guard" else "", edit.layer, edit.rho, choice["forget_top1"])
    meta = {
        "concept": concept.name, "kind": concept.kind, "rho": edit.rho, "converged": edit.converged, "family": adapter.family,
        "direction": cfg.direction, "damping": cfg.damping if cfg.direction != "gradient" else None,
        "moments": cfg.moments if cfg.direction != "gradient" else None,
        "rule": "rho_margin x the smallest passing rho per layer (the smallest if that fails the guard); among layers passing, margin steps first, then the highest mean of retain@1 and other-kind@1 (val)",
        "validation": {k: choice[k] for k in COLUMNS if k.endswith(("top1", "top5"))}, "base_validation": edit.base,
        "base_model_sha256": fingerprint(MODEL), "gradients": sidecar, "sign_convention": SIGN_CONVENTION,
        "searched_layers": edit.layers, "evaluations": len(edit.rows), "validation_sizes": evaluator.sizes,
        "evaluations_scored": {"forget": edit.times["evals_forget"], "guard": edit.times["evals_guard"]}, "scoring": cfg.evaluate,
    } | ({} if edit.converged else {"fallback": choice["fallback"]})  # the rule that picked an unconverged step (guard falls back to forget when no step is within it)
    with atomic_outputs(PATCH, LOG_CSV, LOG_PNG) as (patch_dir, csv_path, png_path):
        save_patch(patch_dir, edit.layer, edit.delta, meta)
        write_search_log(edit, csv_path, png_path, concept.name, adapter.short_name, COLUMNS)
    write_run("search", time_s=round(time.perf_counter() - start, 2), peak_memory_mb=peak_memory_mb())
    log.info("chose %s, rho %.4g (converged %s): val FA@1 %.3f FA@5 %.3f, retain@1 %.3f, other-kind@1 %.3f", edit.layer, edit.rho,
             edit.converged, choice["forget_top1"], choice["forget_top5"], choice["retain_top1"], choice["utility_top1"])


if __name__ == "__main__":
    run_stage("search", main)
