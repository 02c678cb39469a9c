"""Stages `sd_base` and `sd_base_small`: the Stable Diffusion pipeline SLUG edits (docs/sd.md
"Stable Diffusion").  On the default world, a tiny `StableDiffusionPipeline` trained here: an
`AutoencoderKL` on the world's objects in its styles, then a `UNet2DConditionModel` on their
latents with the text states of the CLIP base model's text tower (models/hf/base, frozen), caption
dropout and an EMA; DDIM sampling.  Saved with `save_pretrained` (safetensors) in
models/<stage>, loadable offline with `StableDiffusionPipeline.from_pretrained`.  With
`sd.pretrained: path/to/a diffusers folder` nothing is trained: that pipeline is checked, judged
and saved as models/<stage> (`adopt`).  metrics/<stage>.json:
what the judges recognise in its drawings on the test seeds (every object and style prompt), the
judges' accuracy on real held-out images beside, the autoencoder's ceiling (the judges on its
reconstructions of held-out canvas images and of held-out images of the training distribution), times and memory;
plots/<stage>.png: one drawing per prompt; plots/<stage>_curve.csv: accuracy against training
minutes.  `sd_base_small` is the same with `sd.base_small` (the small twin)."""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs
from unlearn.params import as_config, stage_params
from unlearn.plots import image_grid
from unlearn.runs import write_metrics
from unlearn.sd.data import HELD_STREAM, TRAIN_STREAM, WORLD, Templates, canvas_images, render_images, to_pil
from unlearn.sd.evaluate import SampleConfig, judge_images, judged_accuracy
from unlearn.sd.judges import load_judges
from unlearn.sd.model import UnetConfig, VaeConfig, build_pipeline, drawing_dtype, load_text_encoder, text_states
from unlearn.sd.train import encode_latents, train_unet, train_vae

CLIP, JUDGES, CANVAS = "models/hf/base", "models/sd_judges", "data/eval/canvas"
VALIDATION = 1_000_000  # validation seeds are the test seeds + this: never the same generator
log = logging.getLogger("sd_base")


def judges_at(size: int):
    """The judges of `sd_judges`, refused unless they see `sd.image_size` images."""
    judges = load_judges(JUDGES)
    if judges.image_size != size:
        raise UnlearnError(f"the judges in {JUDGES} see {judges.image_size} px images but sd.image_size is {size}; re-run `dvc repro sd_judges`")
    return judges


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="sd_base")
    args = ap.parse_args()
    start = time.perf_counter()
    p = stage_params(args.stage)
    out_dir, metrics_path, sheet, curve_csv = f"models/{args.stage}", f"metrics/{args.stage}.json", f"plots/{args.stage}.png", f"plots/{args.stage}_curve.csv"
    if p("sd.pretrained") != "synthetic":
        return adopt(Path(str(p("sd.pretrained"))), p, out_dir, metrics_path, sheet, curve_csv, args.stage, start)
    if p("data.source") != "synthetic":
        raise UnlearnError("sd.pretrained: synthetic trains on the synthetic world only; with real data give sd.pretrained: path/to/a diffusers folder")
    device = torch_device(p("model.device"))
    dtype = drawing_dtype(str(p("sd.precision")), device)  # a bad value stops here, before any training
    size, seed = int(p("sd.image_size")), int(p("data.synthetic.seed"))
    templates = as_config(Templates, dict(p("sd.templates")), "sd.templates")
    sample = as_config(SampleConfig, dict(p("sd.sample")), "sd.sample")
    section = "sd." + args.stage.removeprefix("sd_")
    b = dict(p(section))
    per_cell = int(b.pop("images_per_cell"))
    vae_cfg = as_config(VaeConfig, b.pop("vae"), f"{section}.vae")
    unet_cfg = as_config(UnetConfig, b.pop("unet"), f"{section}.unet")
    if b:
        raise UnlearnError(f"{section} has unknown keys {', '.join(sorted(b))}; known: images_per_cell, vae, unet")
    judges = judges_at(size)
    if judges.axes != WORLD:
        raise UnlearnError(f"the judges in {JUDGES} answer over another canvas than the world's; re-run `dvc repro sd_judges` on the synthetic world")
    text_encoder, tokenizer = load_text_encoder(CLIP, device)

    data = render_images(seed, TRAIN_STREAM, per_cell, size, progress="render")
    x = data.as_float().to(device)
    t0 = time.perf_counter()
    vae, vae_losses = train_vae(x, vae_cfg, seed, progress="autoencoder")
    vae_s = time.perf_counter() - t0
    ceiling = {}  # the autoencoder's ceiling: PSNR and the judges on its reconstructions of held-out images
    for name, held in (("canvas", canvas_images(CANVAS, size, WORLD)), ("rendered", render_images(seed, HELD_STREAM, 2, size))):
        with torch.no_grad():
            xr = held.as_float()
            rec = torch.cat([vae.decode(vae.encode(xr[s : s + 256].to(device)).latent_dist.mode()).sample.cpu() for s in range(0, len(held), 256)])
        judged = judge_images(judges, rec, held.objects, held.styles)
        ceiling[name] = {"psnr_db": round(float(10 * torch.log10(4.0 / ((rec.clamp(-1, 1) - xr) ** 2).mean())), 2), "images": len(held),
                         "judged_reconstructions": {a: judged[a]["accuracy"] for a in ("object", "style")}, "per_style": judged["style"]["per_class"]}
        log.info("autoencoder on held-out %s images: PSNR %.1f dB; judges on its reconstructions: object %.3f, style %.3f", name,
                 ceiling[name]["psnr_db"], judged["object"]["accuracy"], judged["style"]["accuracy"])

    latents, scale = encode_latents(vae, x)
    vae.register_to_config(scaling_factor=scale)
    prompts = [WORLD.prompt(templates, c) for c in WORLD.cells()] + [""]
    states = text_states(text_encoder, tokenizer, prompts)
    prompt_index = WORLD.cell_of(data)
    curve, minutes = [], []  # validation accuracy at each checkpoint (a plot); the training minutes to it (its cost)

    def checkpoint(ema, step: int, seconds: float) -> None:
        acc, _ = judged_accuracy(build_pipeline(vae, ema, text_encoder, tokenizer, dtype), judges, templates, sample, 1, sample.seed + VALIDATION, size)
        curve.append({"step": step, "object": acc["object"]["accuracy"], "style": acc["style"]["accuracy"]})
        minutes.append(round(seconds / 60, 2))
        log.info("step %d (%.1f min): validation object %.3f, style %.3f", step, seconds / 60, curve[-1]["object"], curve[-1]["style"])

    t0 = time.perf_counter()
    unet, unet_losses = train_unet(latents, prompt_index, states, len(prompts) - 1, unet_cfg, seed, checkpoint, progress="unet")
    unet_s = time.perf_counter() - t0
    unet_train_s = minutes[-1] * 60 if minutes else unet_s
    pipe = build_pipeline(vae, unet, text_encoder, tokenizer, dtype)
    t0 = time.perf_counter()
    test, images = judged_accuracy(pipe, judges, templates, sample, sample.images_per_prompt, sample.seed, size)
    sample_s = time.perf_counter() - t0
    log.info("test seeds: the judges recognise object %.3f, style %.3f of %d drawings (real held-out: %.3f, %.3f)", test["object"]["accuracy"],
             test["style"]["accuracy"], test["images"], judges.config["held_out"]["object"], judges.config["held_out"]["style"])
    first = len(WORLD.cells())  # the first seed of every prompt, object by object
    with atomic_outputs(out_dir, metrics_path, sheet, curve_csv) as (out, metrics, sheet_tmp, curve_tmp):
        pipe.save_pretrained(out, safe_serialization=True)
        image_grid(to_pil(images[:first]), sheet_tmp, size=48, cols=len(WORLD.styles))
        with open(curve_tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "object", "style"])
            w.writeheader()
            w.writerows(curve)
        write_metrics(metrics, {
            "test": test, "judges_held_out_real": judges.config["held_out"],
            "autoencoder": ceiling | {"final_loss": round(sum(vae_losses[-50:]) / len(vae_losses[-50:]), 5)},
            "unet": {"parameters": sum(q.numel() for q in unet.parameters()), "final_loss": round(sum(unet_losses[-200:]) / len(unet_losses[-200:]), 5),
                     "latent_shape": list(latents.shape[1:]), "scaling_factor": round(scale, 6)},
            "sampler": {"scheduler": "DDIM", **sample.__dict__}, "train_images": len(data),
            "vae_s": round(vae_s, 1), "unet_train_s": round(unet_train_s, 1), "unet_with_checkpoints_s": round(unet_s, 1),
            "sample_s": round(sample_s, 1), "time_s": round(time.perf_counter() - start, 1), "peak_memory_mb": peak_memory_mb(),
            "checkpoints_train_min": minutes, "threads": torch.get_num_threads()}, args.stage, drawing_dtype=dtype)


def adopt(folder: Path, p, out_dir: str, metrics_path: str, sheet: str, curve_csv: str, stage: str, start: float) -> None:
    """`sd.pretrained: path/to/a diffusers folder`: a pipeline trained elsewhere (UnlearnCanvas's SD
    v1.5, say) becomes models/<stage> as it is: loaded offline, its text encoder checked against
    the CLIP whose text tower it must be (models/hf/base: names, shapes and values), drawn for every
    prompt of the judges' axes on the test seeds and judged, then saved with `save_pretrained`.
    Nothing is trained; the curve CSV holds its header only."""
    from unlearn.sd.model import check_text_encoder, load_pipeline, sample_scheduler_like

    device = torch_device(p("model.device"))
    templates = as_config(Templates, dict(p("sd.templates")), "sd.templates")
    sample = as_config(SampleConfig, dict(p("sd.sample")), "sd.sample")
    judges = judges_at(int(p("sd.image_size")))
    pipe = load_pipeline(folder, device, str(p("sd.precision")))
    tower, _ = load_text_encoder(CLIP, device)
    check_text_encoder(pipe.text_encoder, tower, str(folder), CLIP)
    pipe.scheduler = sample_scheduler_like(pipe.scheduler)  # the track's one sampler (DDIM) over the pipeline's own noise schedule
    t0 = time.perf_counter()
    test, images = judged_accuracy(pipe, judges, templates, sample, sample.images_per_prompt, sample.seed, judges.image_size)
    sample_s = time.perf_counter() - t0
    log.info("%s: the judges recognise object %.3f, style %.3f of %d drawings (real held-out: %.3f, %.3f)", folder, test["object"]["accuracy"],
             test["style"]["accuracy"], test["images"], judges.config["held_out"]["object"], judges.config["held_out"]["style"])
    axes = judges.axes
    with atomic_outputs(out_dir, metrics_path, sheet, curve_csv) as (out, metrics, sheet_tmp, curve_tmp):
        pipe.save_pretrained(out, safe_serialization=True)
        image_grid(to_pil(images[: len(axes.cells())]), sheet_tmp, size=48, cols=len(axes.styles))
        with open(curve_tmp, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=["step", "object", "style"]).writeheader()
        write_metrics(metrics, {
            "test": test, "judges_held_out_real": judges.config["held_out"], "pretrained": str(folder),
            "unet": {"parameters": sum(q.numel() for q in pipe.unet.parameters())}, "sampler": {"scheduler": type(pipe.scheduler).__name__, **sample.__dict__},
            "sample_s": round(sample_s, 1), "time_s": round(time.perf_counter() - start, 1), "peak_memory_mb": peak_memory_mb(),
            "threads": torch.get_num_threads()}, stage, drawing_dtype=pipe.drawing_dtype)


if __name__ == "__main__":
    run_stage("sd_base", main)
