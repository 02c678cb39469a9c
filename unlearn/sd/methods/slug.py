"""SLUG on the text encoder, the edit of stage `sd_unlearn` (`unlearn.sd.unlearn`) for one
UnlearnCanvas target: the forget gradient of the CLIP whose text tower is the pipeline's text
encoder on the target's forget pairs (curated from the shards), the shared retain statistics
(their input moments mixed with the pipeline's own prompts of the other concepts), a ranking of
the text tensors the pipeline reads, and the step search judged on validation drawings.  One
tensor of the text encoder changes; the UNet and the autoencoder never do."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from unlearn.errors import UnlearnError
from unlearn.methods import check_fallback
from unlearn.params import as_config
from unlearn.sd.methods import Context, Result, register


@dataclass(frozen=True)
class SlugInputs:
    """SLUG's CLIP side, given by the stage: a loader of the CLIP (a fresh copy per target), the
    shared retain statistics, the concept table lookup, the forget curation, and the slug.search
    and slug.rank sections the benchmark's own keys complete."""

    load_clip: Callable[[], object]
    retain: object
    concept_of: Callable[[str], object]
    curate: Callable[[object, Path], dict]
    batch_size: int
    search: dict
    rank: dict


CLIP, SHARDS, STATS, RETAIN = "models/hf/base", "data/laion", "models/vlm_retain", "data/retain"


def slug_inputs(p, device: str) -> SlugInputs:
    """SLUG's CLIP side from the stage's params `p`: the CLIP whose text tower the pipeline reads
    (models/hf/base), its shared retain statistics (stage `vlm_retain_stats`), the concept table
    and the curation of the forget pairs from the shards, as stage `sd_unlearn` does."""
    from unlearn.data.curate import curate_forget, resolve_concept
    from unlearn.methods.retain_stats import load_retain_stats
    from unlearn.models.adapter import load

    retain, _ = load_retain_stats(STATS, load(CLIP, device=device), CLIP, f"{RETAIN}/manifest.json")
    table = p("concepts")
    forget_max, seed, joined = int(p("curate.forget_max")), int(p("curate.seed")), bool(p("curate.joined"))
    return SlugInputs(load_clip=lambda: load(CLIP, device=device), retain=retain, concept_of=lambda name: resolve_concept(name, table),
                      curate=lambda c, d: curate_forget(SHARDS, c, forget_max, seed, d, joined=joined),
                      batch_size=int(p("gradients.batch_size")), search=dict(p("slug.search")), rank=dict(p("slug.rank")))


@dataclass(frozen=True)
class SlugConfig:
    forget_rate: float = 0.05
    max_drop: float = 0.05
    images_per_prompt: int = 1
    forget_images_per_prompt: int = 4
    max_layers: int = 3
    evals_per_layer: int = 10
    damping: float = 0.1
    prompt_moments: float = 0.5
    steps: int = 10              # DDIM steps of the search's validation drawings (the answer set's: sd.sample.steps); 10 halves the search's time at the same figures
    rho_tolerance: float = 0.05  # the bisection stops once the bracket is within this fraction of the passing rho
    stop: str = "first"   # first: stop at the first layer (by Pareto rank) that passes, as the reference edits one front layer | all
    fallback: str = "guard"  # when no layer passes: guard: the step that forgets most within the guard | forget: the one that forgets most
    token_embedding: str = "none"  # first: the token embedding searched before the ranked layers | ranked: a candidate like the others | none

    RANGES: ClassVar[dict[str, str]] = {"forget_rate": "[0, 1]", "max_drop": "[0, 1]", "images_per_prompt": "> 0", "forget_images_per_prompt": "> 0",
                                        "max_layers": "> 0", "evals_per_layer": "> 0", "damping": "> 0", "prompt_moments": "[0, 1]",
                                        "steps": "> 0", "rho_tolerance": "[0, 1)"}

    def __post_init__(self) -> None:
        if self.stop not in ("all", "first"):
            raise UnlearnError(f"unlearncanvas.slug.stop is {self.stop!r}; use first (stop at the first layer that passes) or all "
                               "(search max_layers layers and keep the best)")
        check_fallback(self.fallback, "unlearncanvas.slug.fallback")
        from unlearn.sd.unlearn import extra_candidates

        extra_candidates(self.token_embedding, "unlearncanvas.slug.token_embedding")


@register("slug", SlugConfig, "SLUG: one text-encoder tensor edited along its (retain-preconditioned) forget gradient, step searched")
def run(ctx: Context, cfg: SlugConfig) -> Result:
    from unlearn.data.pairs import pair_batches
    from unlearn.methods.slug import ROWS_SUFFIX, RankConfig, apply_edit, find_edit, sparse_rows
    from unlearn.sd.unlearn import (
        SdEvaluator,
        outcome,
        pipeline_name,
        reads,
        retain_prompts,
        search_config,
        search_moments,
        tie_text_encoder,
        used_layers,
    )

    inputs: SlugInputs = ctx.slug
    clip = inputs.load_clip()
    tie_text_encoder(ctx.pipe, clip.model, "the base pipeline", "the CLIP")
    concept = inputs.concept_of(ctx.target.name)
    retain, extra, first = search_moments(clip, inputs.retain, RETAIN, retain_prompts(ctx.target, ctx.templates), cfg.prompt_moments,
                                          cfg.token_embedding, "unlearncanvas.slug.token_embedding")
    search = search_config(inputs.search, dataclasses.asdict(cfg), "unlearncanvas.slug", stop=cfg.stop)
    rank = as_config(RankConfig, {**inputs.rank, "towers": ["text"]}, "slug.rank")
    val = SdEvaluator(ctx.pipe, ctx.judges, ctx.target, ctx.templates, dataclasses.replace(ctx.sample, steps=cfg.steps), cfg.images_per_prompt, ctx.validation_seed, ctx.size,
                      forget_per_prompt=cfg.forget_images_per_prompt)
    n_used = used_layers(ctx.pipe)
    with tempfile.TemporaryDirectory(prefix="canvas_forget_") as tmp:
        forget = inputs.curate(concept, Path(tmp))
        edit, times = find_edit(clip, lambda: pair_batches(tmp, clip.preprocess, clip.tokenize, inputs.batch_size), retain, val, concept.kind,
                                rank, search, keep=lambda n: reads(n, n_used), extra=extra, first=first)
    apply_edit(clip, edit.layer, edit.delta)  # the pipeline's text encoder is the CLIP's text tower
    name = pipeline_name(edit.layer)
    value = dict(ctx.pipe.text_encoder.named_parameters())[name].detach().cpu().clone()
    rows = sparse_rows(edit.delta.cpu())  # an embedding edit ships the rows it moves (`Result`)
    changed = {f"text_encoder.{name}": value} if rows is None else {f"text_encoder.{name}": value[rows], f"text_encoder.{name}{ROWS_SUFFIX}": rows}
    return Result(changed,
                  {**outcome(edit), "evaluations": len(edit.rows), "validation_drawings": val.drawn,
                   "forget_pairs": forget["count"],
                   "phases_s": {k: round(v, 2) for k, v in times.items() if not k.startswith("evals_")}})
