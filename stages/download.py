"""Stage `download`: the training shards (img2dataset layout) and the evaluation sets.

data.source = synthetic: generate the seeded synthetic world.
data.source = laion:     img2dataset over LAION parquet metadata; link real CelebA / ImageNet.
"""

from __future__ import annotations

import logging
from collections import Counter

from unlearn.cli import run_stage
from unlearn.data.shards import count_successes, iter_samples
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs, write_json
from unlearn.params import stage_params

SHARDS, EVAL, RECORD = "data/laion", "data/eval", "data/download.json"
SOURCES = ("synthetic", "laion")
log = logging.getLogger("download")


def main() -> None:
    p = stage_params("download")
    source = p("data.source")
    if source not in SOURCES:
        raise UnlearnError(f"unknown data.source {source!r}; use one of: {', '.join(SOURCES)}")
    with atomic_outputs(SHARDS, EVAL, RECORD) as (shards, evald, record):
        if source == "synthetic":
            from unlearn.data import synthetic as S

            cfg = S.SyntheticConfig(**p("data.synthetic"))
            S.write_shards(cfg, shards)
            celeba = S.write_celeba(cfg, evald / "celeba")
            imagenet = S.write_imagenet(cfg, evald / "imagenet")
            info = {"world": S.describe_world(), "celeba_images": len(celeba), "imagenet_images": len(imagenet)}
        else:
            from unlearn.data import laion as L

            cfg = L.LaionConfig(**{k: v for k, v in p("data.laion").items() if k not in ("celeba_dir", "imagenet_dir")})
            L.download_laion(cfg, shards)
            info = L.link_eval_sets(p("data.laion.celeba_dir"), p("data.laion.imagenet_dir"), evald)
        n = count_successes(shards)
        words = Counter(len(s.caption.split()) for s in iter_samples(shards))
        info |= {"source": source, "samples": n, "shards": len(list(shards.glob("*.tar"))), "caption_words_max": max(words, default=0)}
        write_json(record, info | {"params": p.declared()})
    log.info("wrote %d samples to %s and evaluation sets to %s", n, SHARDS, EVAL)


if __name__ == "__main__":
    run_stage("download", main)
