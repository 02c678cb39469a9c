"""Stage `download`: the training shards (img2dataset layout) and the evaluation sets.

data.source = synthetic: generate the seeded synthetic world.
data.source = laion:     img2dataset over LAION parquet metadata; link real CelebA / ImageNet.
"""

from __future__ import annotations

import logging

from unlearn.cli import run_stage
from unlearn.data.shards import count_successes, iter_samples, shard_contact_sheet
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs, write_json
from unlearn.params import as_config, stage_params

SHARDS, EVAL, RECORD, SHEET = "data/laion", "data/eval", "data/download.json", "plots/world.png"
SOURCES = ("synthetic", "laion")
log = logging.getLogger("download")


def main() -> None:
    p = stage_params("download")
    source = p("data.source")
    if source not in SOURCES:
        raise UnlearnError(f"unknown data.source {source!r}; use one of: {', '.join(SOURCES)}")
    with atomic_outputs(SHARDS, EVAL, RECORD, SHEET) as (shards, evald, record, sheet):
        if source == "synthetic":
            from unlearn.data import synthetic as S

            cfg = as_config(S.SyntheticConfig, p("data.synthetic"), "data.synthetic")
            S.write_shards(cfg, shards)
            S.contact_sheet(cfg, sheet)
            celeba = S.write_celeba(cfg, evald / "celeba")
            imagenet = S.write_imagenet(cfg, evald / "imagenet")
            canvas = S.write_canvas(cfg, evald / "canvas")
            info = {"world": S.describe_world(), "celeba_images": len(celeba), "imagenet_images": len(imagenet), "canvas_images": len(canvas)}
        else:
            from unlearn.data import laion as L

            laion = {k: v for k, v in p("data.laion").items() if k not in ("celeba_dir", "imagenet_dir", "canvas_dir")}
            cfg = as_config(L.LaionConfig, laion, "data.laion")
            L.download_laion(cfg, shards)
            info = L.link_eval_sets(p("data.laion.celeba_dir"), p("data.laion.imagenet_dir"), evald, p("data.laion.canvas_dir"))
            shard_contact_sheet(shards, sheet)
        n = count_successes(shards)
        readable = sum(1 for _ in iter_samples(shards))  # reads every shard back: a bad tar fails here
        if readable != n:
            raise UnlearnError(f"the shards hold {readable} readable samples but their stats count {n}; re-run the download stage")
        info |= {"source": source, "samples": n, "shards": len(list(shards.glob("*.tar")))}
        write_json(record, info | {"params": p.declared()})
    log.info("wrote %d samples to %s and evaluation sets to %s", n, SHARDS, EVAL)


if __name__ == "__main__":
    run_stage("download", main)
