"""Stages `sd_unlearn` and `sd_unlearn_small`: SLUG on the text encoder of the pipeline from
`sd_base` (`sd_base_small`), for `sd.concept` (an object or a style the pipeline draws).  The
forget gradient comes from the CLIP whose text tower is the pipeline's text encoder
(models/hf/base, the `hf_clip` adapter) on the concept's forget pairs (curated from the shards as
`curate` does); the retain statistics are that CLIP's (models/vlm_retain, stage
`vlm_retain_stats`), their input moments mixed with those of the pipeline's own prompts of the
other concepts (`sd.search.prompt_moments`); only text tensors the pipeline reads are candidates; the step search is
judged by the judges on what the pipeline draws for validation seeds (`unlearn.sd.unlearn`).
The UNet and the autoencoder are never touched (checked).  Out: the one-layer patch
(models/sd_unlearned[_small], applied with `unlearn.sd.unlearn.apply_sd_patch`), metrics/<stage>.json on the
test seeds with the base beside (UA, IRA, CRA; UA on prompts naming the target by an alias or a
misspelling), the search log and plot, and drawings before and after."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import curate_forget, resolve_concept
from unlearn.data.pairs import pair_batches
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs
from unlearn.methods.retain_stats import load_retain_stats
from unlearn.methods.slug import SIGN_CONVENTION, RankConfig, apply_edit, find_edit, save_patch
from unlearn.models.adapter import fingerprint, load
from unlearn.params import as_config, stage_params
from unlearn.plots import image_grid
from unlearn.runs import write_metrics
from unlearn.sd.data import Templates, canvas_images, to_pil
from unlearn.sd.evaluate import SampleConfig
from unlearn.sd.fid import frechet_distance
from unlearn.sd.judges import load_judges
from unlearn.sd.methods.slug import SlugConfig
from unlearn.sd.model import load_pipeline
from unlearn.sd.unlearn import (
    SdEvaluator,
    outcome,
    reads,
    retain_prompts,
    search_config,
    search_moments,
    target_of,
    tie_text_encoder,
    used_layers,
)
from unlearn.search_log import GIVE_UP_COLUMNS, write_search_log

CLIP, JUDGES, SHARDS, STATS, RETAIN, CANVAS = "models/hf/base", "models/sd_judges", "data/laion", "models/vlm_retain", "data/retain", "data/eval/canvas"
VALIDATION = 1_000_000
log = logging.getLogger("sd_unlearn")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="sd_unlearn")
    args = ap.parse_args()
    start = time.perf_counter()
    p = stage_params(args.stage)
    base_dir = "models/" + args.stage.replace("unlearn", "base")
    patch_out, metrics_out, log_csv, log_png, grid_png = (f"models/{args.stage.replace('sd_unlearn', 'sd_unlearned')}", f"metrics/{args.stage}.json", f"plots/{args.stage}_search.csv",
                                                           f"plots/{args.stage}_search.png", f"plots/{args.stage}.png")
    table = p("concepts")
    concept = resolve_concept(str(p("sd.concept")), table)
    judges = load_judges(JUDGES)
    target = target_of(concept.name, concept.kind, judges.axes)
    templates = as_config(Templates, dict(p("sd.templates")), "sd.templates")
    sample = as_config(SampleConfig, dict(p("sd.sample")), "sd.sample")
    ss = dict(p("sd.search"))
    known = {f.name for f in dataclasses.fields(SlugConfig)} - {"stop"}  # the UnlearnCanvas SLUG's keys: sd_unlearn searches every planned layer
    if set(ss) != known:
        raise UnlearnError(f"sd.search has keys {sorted(ss)}; it needs exactly {sorted(known)} (copy them from the committed params.yaml)")
    cfg = search_config(dict(p("slug.search")), ss, "sd.search")
    other_names = [str(n) for n in (p("sd.other_names") or {}).get(concept.name, [])]
    device = torch_device(p("model.device"))
    clip = load(CLIP, device=device)
    if clip.family != "hf_clip":
        raise UnlearnError(f"{CLIP} holds a {clip.family} model; the diffusion track needs the transformers export (re-run `dvc repro export`)")
    pipe = load_pipeline(base_dir, device, str(p("sd.precision")))
    tie_text_encoder(pipe, clip.model, base_dir, CLIP)
    frozen = {f"{part}.{n}": t.detach().clone() for part in ("unet", "vae") for n, t in getattr(pipe, part).state_dict().items()}
    size = judges.image_size
    retain, _ = load_retain_stats(STATS, clip, CLIP, f"{RETAIN}/manifest.json")
    protected = retain_prompts(target, templates)
    retain, extra, first = search_moments(clip, retain, RETAIN, protected, float(ss["prompt_moments"]), ss["token_embedding"], "sd.search.token_embedding")
    val_sample = dataclasses.replace(sample, steps=int(ss["steps"]))  # the search's drawings may take fewer steps than the test's
    val = SdEvaluator(pipe, judges, target, templates, val_sample, int(ss["images_per_prompt"]), sample.seed + VALIDATION, size,
                      forget_per_prompt=int(ss["forget_images_per_prompt"]))
    test = SdEvaluator(pipe, judges, target, templates, sample, sample.images_per_prompt, sample.seed, size)
    aliases = {n: SdEvaluator(pipe, judges, target, templates, sample, sample.images_per_prompt, sample.seed, size, name_as=n) for n in other_names}
    t0 = time.perf_counter()
    base_test = test.evaluate()
    base_images = {k: v.clone() for k, v in test.images.items()}
    base_alias = {n: ev.evaluate(sets=("forget",))["forget_top1"] for n, ev in aliases.items()}
    base_eval_s = time.perf_counter() - t0
    rank_cfg = as_config(RankConfig, {**p("slug.rank"), "towers": ["text"]}, "slug.rank")
    n_used = used_layers(pipe)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sd_forget_") as tmp:
        forget_dir = Path(tmp)
        forget = curate_forget(SHARDS, concept, int(p("curate.forget_max")), int(p("curate.seed")), forget_dir, joined=bool(p("curate.joined")))
        batch_size = int(p("gradients.batch_size"))
        edit, times = find_edit(clip, lambda: pair_batches(forget_dir, clip.preprocess, clip.tokenize, batch_size), retain, val, concept.kind,
                                rank_cfg, cfg, keep=lambda n: reads(n, n_used), extra=extra, first=first)
    apply_edit(clip, edit.layer, edit.delta)  # the pipeline's text encoder is the CLIP's text tower
    unlearn_s = time.perf_counter() - t0
    after = test.evaluate()
    after_alias = {n: ev.evaluate(sets=("forget",))["forget_top1"] for n, ev in aliases.items()}
    moved = [n for part in ("unet", "vae") for n, t in getattr(pipe, part).state_dict().items() if not torch.equal(t, frozen[f"{part}.{n}"])]
    if moved:
        raise UnlearnError(f"the edit moved {len(moved)} UNet/autoencoder tensors (first: {moved[0]}); only the text encoder may change")
    if not edit.converged:
        log.warning("no step up to rho %g on the %d searched layers passes the forget criterion and the guard; keeping the step that forgets most%s "
                    "(%s, rho %.4g) and reporting converged: false", cfg.rho_max, len(edit.layers),
                    " within the guard" if edit.choice["fallback"] == "guard" else "", edit.layer, edit.rho)

    held = canvas_images(CANVAS, size, target.axes)
    axis_of = {"object": held.objects, "style": held.styles}
    names = target.axes.names(target.axis)
    t_index = target.index
    real = held.as_float()[axis_of[target.axis] != t_index]  # real held-out images without the target
    fid = {"base": round(frechet_distance(judges, real, base_images["rest"]), 3), "after": round(frechet_distance(judges, real, test.images["rest"]), 3),
           "real_images": int(real.shape[0]), "drawn_images": int(test.images["rest"].shape[0])}
    feats = judges[target.axis].features_of(held.as_float())
    centres = torch.stack([feats[axis_of[target.axis] == k].mean(0) for k in range(len(names))])
    sim = torch.nn.functional.cosine_similarity(centres, centres[t_index : t_index + 1])
    sim[t_index] = -2
    neighbours = [names[int(k)] for k in sim.argsort(descending=True)[:2]]
    rest_labels = test.labels("rest", target.axis)
    pred_base, pred_after = (judges[target.axis].predict(x) for x in (base_images["rest"], test.images["rest"]))

    def recognised(pred: torch.Tensor, name: str) -> float:
        k = names.index(name)
        return round(float((pred[rest_labels == k] == k).float().mean()), 4)

    def figures(r: dict) -> dict:
        return {"UA": round(1 - r["forget_top1"], 4), "IRA": round(r["retain_top1"], 4), "CRA": round(r["utility_top1"], 4)}

    metrics = {
        "concept": concept.name, "kind": concept.kind, **outcome(edit),  # with the rule that kept an unconverged step (sd.search.fallback)
        "test": figures(after), "base_test": figures(base_test),
        "other_names": {n: {"UA": round(1 - after_alias[n], 4), "base_UA": round(1 - base_alias[n], 4)} for n in other_names},
        "test_sizes": test.sizes, "validation_sizes": val.sizes,
        "validation": figures(edit.choice), "base_validation": figures(edit.base),
        "forget_pairs": forget["count"], "searched_layers": edit.layers, "evaluations": len(edit.rows),
        "validation_drawings": val.drawn,
        "frechet_judges": fid | {"note": "Frechet distance in the judges' feature space, drawings without the target against real held-out images; "
                                          "not comparable with published FIDs"},
        "neighbours": {n: {"base": recognised(pred_base, n), "after": recognised(pred_after, n)} for n in neighbours},
        "unet_vae_unchanged": not moved, "prompt_moments": float(ss["prompt_moments"]), "retain_prompts": len(protected), "unlearn_s": round(unlearn_s, 2), "phases_s": {k: round(v, 2) for k, v in times.items()},
        "base_scoring_s": round(base_eval_s, 2), "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(),
        "sampler": {"scheduler": "DDIM", **sample.__dict__}, "validation_steps": val_sample.steps, "threads": torch.get_num_threads(),
    }
    meta = {"concept": concept.name, "kind": concept.kind, "rho": edit.rho, "converged": edit.converged, "family": clip.family,
            "direction": cfg.direction, "damping": cfg.damping, "base_model_sha256": fingerprint(CLIP), "pipeline": base_dir,
            "sign_convention": SIGN_CONVENTION, "track": "sd", "forget_manifest_sha256": forget["tar_sha256"]}
    with atomic_outputs(patch_out, metrics_out, log_csv, log_png, grid_png) as (patch_dir, metrics_file, csv_path, png_path, grid_tmp):
        save_patch(patch_dir, edit.layer, edit.delta, meta)
        metrics["stored_bytes"] = sum(f.stat().st_size for f in patch_dir.iterdir())
        write_metrics(metrics_file, metrics, args.stage, drawing_dtype=pipe.drawing_dtype)
        write_search_log(edit, csv_path, png_path, f"SD, {concept.name}", clip.short_name, GIVE_UP_COLUMNS)
        n = len(test.sets["forget"][0]) // sample.images_per_prompt  # one drawing per prompt naming the target
        rows = [base_images["forget"][:n], test.images["forget"][:n]]
        for name in neighbours:
            idx = (rest_labels == names.index(name)).nonzero().flatten()[:n]
            rows += [base_images["rest"][idx], test.images["rest"][idx]]
        tiles = to_pil(torch.cat(rows))
        image_grid(tiles, grid_tmp, size=48, cols=n)
    log.info("%s: %s rho %.3g; test: UA %.3f -> %.3f, IRA %.3f -> %.3f, CRA %.3f -> %.3f; %.1f s", concept.name, edit.layer, edit.rho,
             metrics["base_test"]["UA"], metrics["test"]["UA"], metrics["base_test"]["IRA"], metrics["test"]["IRA"], metrics["base_test"]["CRA"],
             metrics["test"]["CRA"], unlearn_s)


if __name__ == "__main__":
    run_stage("sd_unlearn", main)
