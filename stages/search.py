"""Stage `search`: the relative step rho on the Pareto-front layers, judged on the target's
validation images with a utility guard; every evaluation logged; the chosen edit saved as a
one-layer patch (METHODS.md 1.4)."""

from __future__ import annotations

import csv
import logging
import time

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import resolve_concept
from unlearn.data.pairs import pair_batches
from unlearn.eval.suite import Evaluator, concept_tasks
from unlearn.io import atomic_outputs, read_json, sha256_file
from unlearn.methods.slug import (
    SIGN_CONVENTION,
    SearchConfig,
    edit_delta,
    load_gradients,
    plan_layers,
    save_patch,
    search_layers,
    step_directions,
)
from unlearn.models import openclip as oc
from unlearn.params import as_config, stage_params
from unlearn.plots import search_plot, short_layer

MODEL, GRADS, LAYERS, EVAL, RETAIN = "models/base", "models/grads", "metrics/layers.json", "data/eval", "data/retain"
PATCH, LOG_CSV, LOG_PNG = "models/unlearned", "plots/search.csv", "plots/search.png"
COLUMNS = ("layer", "tower", "eval", "rho", "forget_top1", "forget_top5", "retain_top1", "retain_top5", "utility_top1", "utility_top5", "forget_ok", "guard_ok")
log = logging.getLogger("search")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("search")
    cfg = as_config(SearchConfig, p("slug.search"), "slug.search")
    concept = resolve_concept(str(p("concept")), p("concepts"))
    adapter = oc.load(MODEL, device=torch_device(p("model.device")))
    g_f, _, sidecar = load_gradients(GRADS, adapter, MODEL)
    ranking = read_json(LAYERS)
    layers = plan_layers(ranking["front"], ranking["order"], cfg.max_layers)
    tasks = concept_tasks(EVAL, concept, "val", float(p("eval.split.val_fraction")), int(p("eval.split.seed")))
    evaluator = Evaluator(adapter, tasks, int(p("eval.batch_size")))
    base = evaluator.evaluate()
    log.info("base model on validation (%s): %s", evaluator.sizes, base)
    directions = step_directions(adapter, g_f, layers, cfg, lambda: pair_batches(RETAIN, adapter.preprocess, adapter.tokenizer, int(p("eval.batch_size"))))
    rows, choice = search_layers(adapter, evaluator, directions, layers, cfg, base, concept.kind)
    if not choice["converged"]:
        log.warning("no step within rho <= %g on the %d searched layers (by Pareto rank) passes the forget criterion and the utility guard; "
                    "keeping the best step seen (%s, rho %.4g, FA@1 %.3f) and reporting converged: false",
                    cfg.rho_max, len(layers), choice["layer"], choice["rho"], choice["forget_top1"])
    params = dict(adapter.model.named_parameters())
    delta = edit_delta(params[choice["layer"]].detach(), directions[choice["layer"]], choice["rho"])
    meta = {
        "concept": concept.name, "kind": concept.kind, "rho": choice["rho"], "converged": choice["converged"],
        "direction": cfg.direction, "damping": cfg.damping if cfg.direction != "gradient" else None,
        "rule": "rho_margin x the smallest passing rho per layer (the smallest if that fails the guard); among layers passing, margin steps first, then the highest mean of retain@1 and other-kind@1 (val)",
        "validation": {k: choice[k] for k in COLUMNS if k.endswith(("top1", "top5"))}, "base_validation": base,
        "base_model_sha256": sha256_file(f"{MODEL}/{oc.WEIGHTS_FILE}"), "gradients": sidecar, "sign_convention": SIGN_CONVENTION,
        "searched_layers": layers, "evaluations": len(rows), "validation_sizes": evaluator.sizes,
        "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(),
    }
    with atomic_outputs(PATCH, LOG_CSV, LOG_PNG) as (patch_dir, csv_path, png_path):
        save_patch(patch_dir, choice["layer"], delta, meta)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: r[k] for k in COLUMNS} for r in rows)
        search_plot(rows, png_path, choice, f"{concept.name}: chose {short_layer(choice['layer'])} at rho={choice['rho']:.3g}"
                    + ("" if choice["converged"] else " (NOT converged)"))
    log.info("chose %s, rho %.4g (converged %s): val FA@1 %.3f FA@5 %.3f, retain@1 %.3f, other-kind@1 %.3f", choice["layer"], choice["rho"],
             choice["converged"], choice["forget_top1"], choice["forget_top5"], choice["retain_top1"], choice["utility_top1"])


if __name__ == "__main__":
    run_stage("search", main)
