"""Stage `vlm_unlearn`: SLUG on the vision tower of the LLaVA from `vlm_base`, for `vlm.concept`
(an identity).  The forget gradient comes from the CLIP whose vision tower the LLaVA uses
(models/hf/base, the `hf_clip` adapter) on the concept's forget pairs; the retain statistics are
that CLIP's (stage `vlm_retain_stats`); only the vision tensors the LLaVA reads are candidates;
the step search is judged by the LLaVA's own greedy answers on validation images
(`unlearn.vlm.evaluate`).  Out: the one-layer patch (models/vlm_unlearned, applied to a LLaVA
with `unlearn.vlm.model.apply_vlm_patch`), metrics/vlm_unlearn.json on the test images with the
base beside, the search log and plot, and examples of answers before and after."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import curate_forget, resolve_concept, table_concepts
from unlearn.data.pairs import pair_batches
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs
from unlearn.methods.retain_stats import load_retain_stats
from unlearn.methods.slug import SIGN_CONVENTION, RankConfig, SearchConfig, apply_edit, find_edit, save_patch
from unlearn.models.adapter import fingerprint, load
from unlearn.params import as_config, stage_params
from unlearn.runs import write_metrics
from unlearn.search_log import write_search_log
from unlearn.vlm.evaluate import Questions, VlmEvaluator
from unlearn.vlm.model import check_vision_tower, open_vlm, reads, tie_vision_tower
from unlearn.vlm.plots import answers_figure
from unlearn.vlm.prompt import check_template

CLIP, VLM, EVAL, SHARDS, STATS, RETAIN = "models/hf/base", "models/vlm_base", "data/eval", "data/laion", "models/vlm_retain", "data/retain"
PATCH, METRICS, LOG_CSV, LOG_PNG, EXAMPLES = ("models/vlm_unlearned", "metrics/vlm_unlearn.json", "plots/vlm_search.csv",
                                              "plots/vlm_search.png", "plots/vlm_answers.png")
EXAMPLES_PER_SET = 4
log = logging.getLogger("vlm_unlearn")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("vlm_unlearn")
    table = p("concepts")
    concept = resolve_concept(str(p("vlm.concept")), table)
    if concept.kind != "identity":
        raise UnlearnError(f"vlm.concept {concept.name!r} is an {concept.kind}; the VLM track forgets an identity "
                           f"(one of: {', '.join(n for n, e in table.items() if (e or {}).get('kind') == 'identity')})")
    template, questions = check_template(str(p("vlm.template"))), as_config(Questions, p("vlm.questions"), "vlm.questions")
    vs = dict(p("vlm.search"))
    known = {"forget_rate", "max_identity_drop", "max_object_drop", "damping"}
    if set(vs) != known:
        raise UnlearnError(f"vlm.search has keys {sorted(vs)}; it needs exactly {sorted(known)} (copy them from the committed params.yaml)")
    cfg = as_config(SearchConfig, {**p("slug.search"), "forget_top1": vs["forget_rate"], "forget_top5": vs["forget_rate"],
                                   "max_identity_drop": vs["max_identity_drop"], "max_object_drop": vs["max_object_drop"],
                                   "damping": vs["damping"], "moments": "shared"},  # the transformers CLIP's retain moments (vlm_retain_stats)
                    "slug.search + vlm.search")
    concepts = table_concepts(table)
    identities, objects = [c for c in concepts if c.kind == "identity"], [c for c in concepts if c.kind == "object"]
    device = torch_device(p("model.device"))
    clip = load(CLIP, device=device)
    model, processor = open_vlm(VLM, device, half=bool(p("vlm.half")) and device.startswith("cuda"))
    check_vision_tower(model, clip.model, VLM, CLIP)
    tie_vision_tower(model, clip.model)  # the search edits the CLIP's tensors; the LLaVA answers with them
    retain, _ = load_retain_stats(STATS, clip, CLIP, f"{RETAIN}/manifest.json")
    split = p("eval.split")
    frac, seed = float(split["val_fraction"]), int(split["seed"])
    gen = {"template": template, "questions": questions, "max_new_tokens": int(p("vlm.max_new_tokens")), "batch_size": int(p("vlm.batch_size"))}
    val = VlmEvaluator(model, processor, EVAL, concept, identities, objects, "val", frac, seed, **gen)
    test = VlmEvaluator(model, processor, EVAL, concept, identities, objects, "test", frac, seed, **gen)
    base_test = test.evaluate()
    base_answers, base_instead, base_per_id = dict(test.answers), test.instead(), test.per_class("retain")
    rank_cfg = as_config(RankConfig, {**p("slug.rank"), "towers": ["image"]}, "slug.rank")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlm_forget_") as tmp:
        forget_dir = Path(tmp)
        forget = curate_forget(SHARDS, concept, int(p("curate.forget_max")), int(p("curate.seed")), forget_dir, joined=bool(p("curate.joined")))
        batch_size = int(p("gradients.batch_size"))
        edit, times = find_edit(clip, lambda: pair_batches(forget_dir, clip.preprocess, clip.tokenize, batch_size), retain, val, "identity",
                                rank_cfg, cfg, keep=lambda n: reads(model, n))
    apply_edit(clip, edit.layer, edit.delta)  # the LLaVA's vision tower is the CLIP's
    unlearn_s = time.perf_counter() - t0
    after = test.evaluate()
    instead = test.instead()
    per_id = test.per_class("retain")
    drops = sorted(((base_per_id[k] - per_id[k], k) for k in per_id), reverse=True)[:3]
    if not edit.converged:
        log.warning("no step up to rho %g on the %d searched layers passes the forget criterion and the guard; keeping the best step seen "
                    "(%s, rho %.4g) and reporting converged: false", cfg.rho_max, len(edit.layers), edit.layer, edit.rho)
    figures = {"forget_identification": "forget_top1", "retain_identification": "retain_top1", "object_accuracy": "utility_top1"}
    metrics = {
        "concept": concept.name, "layer": edit.layer, "rho": edit.rho, "converged": edit.converged,
        "test": {k: after[v] for k, v in figures.items()}, "base_test": {k: base_test[v] for k, v in figures.items()},
        "retain_largest_drops": {k: {"base": base_per_id[k], "after": per_id[k]} for _, k in drops},
        "says_instead": instead, "base_says": base_instead, "test_sizes": test.sizes, "validation_sizes": val.sizes,
        "validation": {k: edit.choice[v] for k, v in figures.items()}, "base_validation": {k: edit.base[v] for k, v in figures.items()},
        "forget_pairs": forget["count"], "searched_layers": edit.layers, "evaluations": len(edit.rows),
        "unlearn_s": round(unlearn_s, 2), "phases_s": {k: round(v, 2) for k, v in times.items()},
        "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(),
    }
    rows = []
    for name in ("forget", "retain", "utility"):
        task = test.tasks[name]
        for i in sorted({round(k * (len(task.paths) - 1) / max(1, EXAMPLES_PER_SET - 1)) for k in range(EXAMPLES_PER_SET)}):
            rows.append({"path": str(task.paths[i]), "question": questions.identity if name != "utility" else questions.object,
                         "truth": task.classnames[task.labels[i]], "before": base_answers[name][i], "after": test.answers[name][i]})
    metrics["examples"] = [{k: v for k, v in r.items() if k != "path"} | {"image": Path(r["path"]).name} for r in rows]
    meta = {"concept": concept.name, "kind": concept.kind, "rho": edit.rho, "converged": edit.converged, "family": clip.family,
            "direction": cfg.direction, "damping": cfg.damping, "base_model_sha256": fingerprint(CLIP), "sign_convention": SIGN_CONVENTION, "track": "vlm",
            "vision_feature_layer": model.config.vision_feature_layer, "forget_manifest_sha256": forget["tar_sha256"],
            "validation": metrics["validation"], "base_validation": metrics["base_validation"]}
    with atomic_outputs(PATCH, METRICS, LOG_CSV, LOG_PNG, EXAMPLES) as (patch_dir, metrics_file, csv_path, png_path, examples_png):
        save_patch(patch_dir, edit.layer, edit.delta, meta)
        metrics["stored_bytes"] = sum(f.stat().st_size for f in patch_dir.iterdir())
        write_metrics(metrics_file, metrics, "vlm_unlearn")
        write_search_log(edit, csv_path, png_path, f"VLM, {concept.name}", clip.short_name)
        answers_figure(rows, examples_png, f"{concept.name} forgotten by the LLaVA (one vision-tower layer: {clip.short_name(edit.layer)})")
    log.info("%s: %s rho %.3g; test: target named %.3f -> %.3f, others %.3f -> %.3f, objects %.3f -> %.3f; %.1f s", concept.name, edit.layer,
             edit.rho, base_test["forget_top1"], after["forget_top1"], base_test["retain_top1"], after["retain_top1"],
             base_test["utility_top1"], after["utility_top1"], unlearn_s)


if __name__ == "__main__":
    run_stage("vlm_unlearn", main)
