"""Stage `export`: the base model and the unlearned model (base + the SLUG patch) as transformers
CLIPModel folders (`save_pretrained`, safetensors) in models/hf/{base,unlearned}: what the Stable
Diffusion and vision-language tracks build on.  Each export is measured against its source on
every evaluation image and on the class prompts and forget captions (metrics/export.json); a
difference above 1e-5 stops the stage with a one-line error."""

from __future__ import annotations

import logging
import time

from unlearn.cli import run_stage
from unlearn.data.curate import read_manifest
from unlearn.data.evalsets import read_celeba, read_imagenet
from unlearn.errors import UnlearnError
from unlearn.eval.zeroshot import IDENTITY_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from unlearn.io import atomic_outputs
from unlearn.methods.slug import apply_patch
from unlearn.models.adapter import load
from unlearn.models.export import TOLERANCE, compare_adapters, to_hf_clip
from unlearn.params import stage_params
from unlearn.runs import write_metrics

MODEL, PATCH, EVAL, FORGET = "models/base", "models/unlearned", "data/eval", "data/forget"
OUT, METRICS = "models/hf", "metrics/export.json"
log = logging.getLogger("export")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("export")
    celeba, imagenet = read_celeba(f"{EVAL}/celeba"), read_imagenet(f"{EVAL}/imagenet")
    paths = list(celeba.paths) + list(imagenet.paths)
    texts = ([t.format(c) for c in celeba.classnames for t in IDENTITY_TEMPLATES]
             + [t.format(c) for c in imagenet.classnames for t in SIMPLE_IMAGENET_TEMPLATES]
             + [s["caption"] for s in read_manifest(FORGET)["samples"]])
    batch_size = int(p("eval.batch_size"))
    metrics: dict = {"tolerance": TOLERANCE}
    with atomic_outputs(OUT, METRICS) as (out, metrics_file):
        for name in ("base", "unlearned"):
            source = load(MODEL)
            if name == "unlearned":
                metrics["patch_layer"] = apply_patch(source, PATCH, MODEL)["layer"]
            exported = to_hf_clip(source)
            exported.save(out / name)
            reloaded = load(out / name)  # measured as a user would load it
            figures = compare_adapters(source, reloaded, paths, texts, batch_size)
            metrics[name] = {"family": source.family, **figures}
            worst = max(figures["image_embedding_max_abs_diff"], figures["text_embedding_max_abs_diff"])
            if worst > TOLERANCE:
                raise UnlearnError(f"the exported {name} model's embeddings differ from the {source.family} model's by {worst:.2e} (> {TOLERANCE}); "
                                   "this config does not export faithfully (docs/families.md)")
            log.info("%s: %s -> hf_clip, max |diff| image %.2e, text %.2e over %d images and %d texts (%d token mismatches)", name,
                     source.family, figures["image_embedding_max_abs_diff"], figures["text_embedding_max_abs_diff"], len(paths), len(texts),
                     figures["token_mismatches"])
        metrics["time_s"] = round(time.perf_counter() - start, 2)
        write_metrics(metrics_file, metrics, "export")


if __name__ == "__main__":
    run_stage("export", main)
