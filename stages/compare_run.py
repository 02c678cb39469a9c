"""Stage `compare_run@<method>`: one method on every concept of `compare.concepts`, each from
the base model, decided on the target's validation images and reported on its test images with
the evaluator and membership attack of stage `evaluate`.  Every concept shares the retain set
(and SLUG the retain statistics of stage `retain_stats`, whose one-time cost the comparison reports
apart).  Writes metrics/compare/<method>.json.

    python -m stages.compare_run salun
"""

from __future__ import annotations

import logging
import sys

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import resolve_concept
from unlearn.errors import UnlearnError
from unlearn.eval.mia import ConceptAttack
from unlearn.eval.suite import ACCURACY_KEYS, Evaluator, SharedBase, concept_tasks
from unlearn.io import atomic_outputs, read_json
from unlearn.methods.kept import load_table_moments
from unlearn.methods.registry import changed_bytes, check_method, chunks, methods, run_method
from unlearn.methods.retain_stats import load_retain_stats
from unlearn.models.adapter import load
from unlearn.models.train import load_pairs
from unlearn.params import stage_params
from unlearn.runs import write_metrics

MODEL, EVAL, DATA, RETAIN, STATS, TABLE = "models/base", "data/eval", "data/compare", "data/retain", "models/retain", "models/concept_moments"
log = logging.getLogger("compare_run")


def run_concept(method: str, concept, p, device: str, retain_stats, shared: SharedBase, table=None) -> dict:
    adapter = load(MODEL, device=device)
    base_state = {n: t.detach().cpu().clone() for n, t in adapter.model.named_parameters()}
    split = (float(p("eval.split.val_fraction")), int(p("eval.split.seed")))
    batch_size, grad_batch = int(p("eval.batch_size")), int(p("gradients.batch_size"))
    folds, seeds = int(p("eval.mia.folds")), int(p("eval.mia.seeds"))
    sets = read_json(f"{DATA}/concepts.json")["concepts"]
    if concept.name not in sets:
        raise UnlearnError(f"{DATA} holds no sets for {concept.name!r}; run `dvc repro compare_data`")
    where = f"{DATA}/{sets[concept.name]['dir']}"
    forget, retain = load_pairs(adapter, f"{where}/forget"), load_pairs(adapter, RETAIN)
    val_tasks = concept_tasks(EVAL, concept, "val", *split)
    test = Evaluator(adapter, concept_tasks(EVAL, concept, "test", *split), batch_size)
    attack = ConceptAttack(adapter, EVAL, concept, split, list(chunks(forget, batch_size)), f"{where}/forget/manifest.json", folds, seeds)

    def report() -> dict:
        return test.evaluate() | {"mia": attack(adapter)["mean"]}

    base = report()
    # slug.search.moments: kept: the concept's kept moments (the retain statistics pooled with the table's, less its own pairs)
    kept = table.kept_source(adapter, retain_stats, concept.name, forget, grad_batch, f"{where}/forget") if table is not None else None
    outcome = run_method(method, adapter, forget, retain, Evaluator(adapter, val_tasks, batch_size, shared=shared), concept.kind, p(method), grad_batch,
                         retain_stats, kept)
    row = {"concept": concept.name, "method": method, "status": outcome.status, "epoch": outcome.epoch, "time_s": outcome.time_s,
           **outcome.details, "epochs": outcome.epochs, "base": base}
    if outcome.status == "failed":
        log.warning("%s on %s failed: %s", method, concept.name, outcome.details.get("error"))
        return row | {k: None for k in (*ACCURACY_KEYS, "mia")} | {"stored_bytes": None}
    after = report()
    log.info("%s on %s (%s, %.1f s): FA@1 %.3f -> %.3f, FA@5 %.3f -> %.3f, retain@1 %.3f -> %.3f, other-kind@1 %.3f -> %.3f (test)",
             method, concept.name, outcome.status, outcome.time_s["unlearn"], base["forget_top1"], after["forget_top1"], base["forget_top5"],
             after["forget_top5"], base["retain_top1"], after["retain_top1"], base["utility_top1"], after["utility_top1"])
    return row | after | {"stored_bytes": changed_bytes(base_state, adapter)}


def main() -> None:
    if len(sys.argv) != 2:
        raise UnlearnError("usage: python -m stages.compare_run <method>")
    method = check_method(sys.argv[1])
    p = stage_params(f"compare_run@{method}")
    methods()[method].config(p(method), method)   # a bad number of the method's section stops here, before any work
    torch.manual_seed(int(p("compare.seed")))
    device = torch_device(p("model.device"))
    concepts = [resolve_concept(str(n), p("concepts")) for n in p("compare.concepts")]
    stats = table = None
    if method == "slug":
        stats = load_retain_stats(STATS, load(MODEL, device=device), MODEL, f"{RETAIN}/manifest.json")[0]
        if methods()[method].config(p(method), method).search.moments == "kept":
            table = load_table_moments(TABLE, MODEL)
    shared = SharedBase()  # the unedited model's reference pass over the validation images, read by the first concept's search
    rows = [run_concept(method, c, p, device, stats, shared, table) for c in concepts]
    with atomic_outputs(f"metrics/compare/{method}.json") as (out,):
        write_metrics(out, {"method": method, "params": p(method), "rows": rows, "peak_memory_mb": peak_memory_mb()}, f"compare_run@{method}")


if __name__ == "__main__":
    run_stage("compare_run", main)
