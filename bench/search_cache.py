"""What the search's caches buy: seconds per step-size evaluation on the validation part, with
the cache (text edit: class prompts only; vision edit: blocks b.. only) and without (the whole
model re-run, as the reference does), for one layer of each kind.

    python bench/search_cache.py            # needs models/base and data/eval (dvc repro base_model)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn.data.curate import resolve_concept  # noqa: E402
from unlearn.eval.suite import Evaluator, concept_tasks  # noqa: E402
from unlearn.models.adapter import load  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402


def seconds(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    params = load_yaml(ROOT / "params.yaml")
    concept = resolve_concept(params["concept"], params["concepts"])
    adapter = load(ROOT / "models" / "base")
    tasks = concept_tasks(ROOT / "data" / "eval", concept, "val", params["eval"]["split"]["val_fraction"], params["eval"]["split"]["seed"])
    ev = Evaluator(adapter, tasks, params["eval"]["batch_size"])
    n_blocks = len(adapter.model.visual.transformer.resblocks)
    layers = ["transformer.resblocks.0.attn.out_proj.weight", f"visual.transformer.resblocks.{n_blocks - 1}.mlp.c_proj.weight", "visual.proj"]
    print(f"threads: {torch.get_num_threads()}, validation images: {ev.sizes}")
    print(f"{'layer':<55} {'full s':>8} {'cached s':>9} {'speed-up':>9}")
    for layer in layers:
        ev.prepare(layer)
        full, cached = seconds(ev.evaluate, 5), seconds(lambda layer=layer: ev.evaluate(layer), 5)
        print(f"{layer:<55} {full:>8.3f} {cached:>9.3f} {full / cached:>8.1f}x")


if __name__ == "__main__":
    main()
