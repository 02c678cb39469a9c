"""Stages `unlearncanvas_base` and `unlearncanvas@<method>` (and their `_small` twins on
sd_base_small): the UnlearnCanvas benchmark (`unlearn.sd.canvas`).

    python -m stages.unlearncanvas --stage unlearncanvas --method esd

A method, for every target of `unlearncanvas.targets`: the base pipeline loaded afresh, unlearned
in place (`unlearn.sd.methods`; timed: that and nothing else), the answer set drawn with the one
sampler and judged, the row (UA, IRA, CRA, FID proxy, stored bytes; time and memory in the run
record).  A method that diverges is recorded as failed in its row.  `--method base` draws the
answer set of the unedited pipeline once: every target's base row.  Out:
metrics/<stage>/<method>.json, the changed tensors of every target
(models/<stage>/<method>/<target>.safetensors: what the method ships), and answer-set drawings of
the first style and the first object target (plots/<stage>/<method>.png)."""

from __future__ import annotations

import argparse
import logging
import time

import safetensors.torch
import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs
from unlearn.methods.slug import ROWS_SUFFIX
from unlearn.params import as_config, stage_params
from unlearn.plots import image_grid
from unlearn.runs import write_metrics
from unlearn.sd.canvas import AnswerSet, answer_set, check_cells, check_targets, named_mask, score, split_cells
from unlearn.sd.data import TRAIN_STREAM, WORLD, Templates, canvas_images, render_images, to_pil
from unlearn.sd.evaluate import SampleConfig, generate, judge_images
from unlearn.sd.fid import frechet_distance
from unlearn.sd.judges import load_judges
from unlearn.sd.methods import Context, Diverged, check_methods, config_of, run_method
from unlearn.sd.methods import methods as registered
from unlearn.sd.model import drawing_dtype, load_pipeline

JUDGES, CANVAS = "models/sd_judges", "data/eval/canvas"
VALIDATION = 1_000_000
log = logging.getLogger("unlearncanvas")


def grid_rows(answers: AnswerSet, x: torch.Tensor, targets, per_prompt: int) -> list[torch.Tensor]:
    """Per grid target: the first drawing of every prompt naming it, then as many of the others."""
    rows = []
    first = len(answers) // per_prompt  # one drawing of every cell
    for t in targets:
        named = named_mask(answers, t)[:first].nonzero().flatten()
        others = (~named_mask(answers, t)[:first]).nonzero().flatten()
        rows += [x[named], x[others[torch.linspace(0, len(others) - 1, len(named)).long()]]]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="unlearncanvas", choices=["unlearncanvas", "unlearncanvas_small"])
    ap.add_argument("--method", required=True)
    args = ap.parse_args()
    start = time.perf_counter()
    run_name = f"{args.stage}_base" if args.method == "base" else f"{args.stage}@{args.method}"
    p = stage_params(run_name)
    keys = ["targets", "methods", "images_per_prompt", "seed", "seed_images", "train_images_per_cell"]
    section = {k: p(f"unlearncanvas.{k}") for k in keys + ([] if args.method == "base" else [args.method])}
    twin = dict(p(args.stage)) if args.stage != "unlearncanvas" else {}
    allowed = sorted((set(keys) - {"methods"}) | set(registered()))
    unknown = sorted(set(twin) - set(allowed))
    if unknown:
        raise UnlearnError(f"{args.stage} has unknown keys {', '.join(unknown)}; it may override these keys of unlearncanvas: {', '.join(allowed)}")
    # the small twin overrides top-level keys, and a method's keys one by one
    section |= {k: ({**section[k], **v} if isinstance(v, dict) else v) for k, v in twin.items() if k in section}
    methods = check_methods(list(section["methods"]), "unlearncanvas.methods")
    if args.method != "base" and args.method not in methods:
        raise UnlearnError(f"method {args.method!r} is not in unlearncanvas.methods ({', '.join(methods)}); add it there")
    config = None if args.method == "base" else config_of(args.method, section[args.method], "unlearncanvas")  # a bad number stops here
    judges = load_judges(JUDGES)
    axes, size = judges.axes, judges.image_size
    targets = check_targets(section["targets"], f"{args.stage}.targets", axes)
    per_prompt, seed, seed_images = int(section["images_per_prompt"]), int(section["seed"]), bool(section["seed_images"])
    templates = as_config(Templates, dict(p("sd.templates")), "sd.templates")
    sample = as_config(SampleConfig, dict(p("sd.sample")), "sd.sample")
    device = torch_device(p("model.device"))
    precision = str(p("sd.precision"))
    dtype = drawing_dtype(precision, device)  # a bad value stops here, before any drawing
    base_dir = "models/" + args.stage.replace("unlearncanvas", "sd_base")
    metrics_out, grid_out = f"metrics/{args.stage}/{args.method}.json", f"plots/{args.stage}/{args.method}.png"
    answers = answer_set(templates, per_prompt, seed_images, axes)
    held = canvas_images(CANVAS, size, axes)
    check_cells(held, CANVAS, axes)
    per_cell = int(section["train_images_per_cell"])
    if axes == WORLD:  # the methods train on the world's renderings (their own seed stream), never on the canvas
        real = None
    else:  # a real canvas: the methods train on the first images of each cell, the FID's real set is the rest
        real, held = split_cells(held, per_cell, CANVAS, axes)
    grid_targets = [next(t for t in targets if t.axis == a) for a in ("style", "object") if any(t.axis == a for t in targets)]

    def draw(pipe) -> torch.Tensor:
        return generate(pipe, answers.prompts, sample, seed, size)

    def judge(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {axis: r["pred"] for axis, r in judge_images(judges, x, answers.objects, answers.styles).items()}

    def fid_without(t, x: torch.Tensor) -> float:
        return round(frechet_distance(judges, held.as_float()[~named_mask(held, t)], x[~named_mask(answers, t)]), 3)

    rows, grid, shipped = [], [], {}  # shipped: each target's changed tensors, serialised once (their size is the storage)
    t_draw, drawn = 0.0, 0
    if args.method == "base":
        t0 = time.perf_counter()
        x = draw(load_pipeline(base_dir, device, precision))
        t_draw, drawn = time.perf_counter() - t0, len(answers)
        pred = judge(x)
        rows = [{"target": t.name, "axis": t.axis, "status": "ok", **score(answers, pred, t), "fid": fid_without(t, x)} for t in targets]
        grid = grid_rows(answers, x, grid_targets, per_prompt)
    else:
        cfg_params = section[args.method]
        if real is None:
            real = render_images(int(p("data.synthetic.seed")), TRAIN_STREAM, per_cell, size)
        slug_inputs = None
        if args.method == "slug":
            from unlearn.sd.methods.slug import slug_inputs as build_slug_inputs

            slug_inputs = build_slug_inputs(p, device)
        for t in targets:
            pipe = load_pipeline(base_dir, device, precision)
            keep = named_mask(real, t)
            ctx = Context(pipe, t, templates, real.subset(keep), real.subset(~keep), sample, size, seed + VALIDATION, judges, slug_inputs)
            torch.manual_seed(0)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                result = run_method(args.method, ctx, cfg_params, "unlearncanvas")
            except Diverged as e:
                log.warning("%s on %s diverged: %s", args.method, t.name, e)
                rows.append({"target": t.name, "axis": t.axis, "status": "failed", "error": str(e), "UA": None, "IRA": None, "CRA": None,
                             "fid": None, "stored_bytes": None, "time_s": round(time.perf_counter() - t0, 2)})
                continue
            unlearn_s = time.perf_counter() - t0
            memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_memory_mb()
            t1 = time.perf_counter()
            x = draw(pipe)
            t_draw, drawn = t_draw + time.perf_counter() - t1, drawn + len(answers)
            pred = judge(x)
            shipped[t.name] = safetensors.torch.save({k: v.contiguous() for k, v in result.changed.items()})
            by_rows = [v for k, v in result.changed.items() if k.endswith(ROWS_SUFFIX)]  # an edit shipped by rows: how many (the storage bench recounts them)
            row = {"target": t.name, "axis": t.axis, "status": "ok", **score(answers, pred, t), "fid": fid_without(t, x),
                   "stored_bytes": len(shipped[t.name]),
                   "changed_tensors": sum(not k.endswith(ROWS_SUFFIX) for k in result.changed),
                   **({"changed_rows": sum(len(v) for v in by_rows)} if by_rows else {}), **{k: v for k, v in result.details.items() if k != "phases_s"},
                   "time_s": round(unlearn_s, 2), "peak_memory_mb": round(memory, 1)}
            if "phases_s" in result.details:
                row["phases_s"] = result.details["phases_s"]
            rows.append(row)
            log.info("%s on %s: UA %.1f, IRA %.1f, CRA %.1f, FID %.2f, %.1f s", args.method, t.name, row["UA"], row["IRA"], row["CRA"], row["fid"],
                     unlearn_s)
            if t in grid_targets:
                grid += grid_rows(answers, x, [t], per_prompt)
    metrics = {"method": args.method, "config": config,
               "rows": rows, "answer_set": {"images": len(answers), "images_per_prompt": per_prompt, "seed": seed, "seed_images": seed_images},
               "sampler": {"scheduler": "DDIM", "steps": sample.steps, "guidance": sample.guidance},
               "sampling_s": round(t_draw, 2), "sampling_images_per_s": round(drawn / t_draw, 2) if t_draw else None,
               "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(), "threads": torch.get_num_threads()}
    outs = [metrics_out, grid_out] + ([] if args.method == "base" else [f"models/{args.stage}/{args.method}"])
    with atomic_outputs(*outs) as tmp:
        write_metrics(tmp[0], metrics, run_name, drawing_dtype=dtype)
        if grid:
            n = max(r.shape[0] for r in grid)
            image_grid(to_pil(torch.cat(grid)), tmp[1], size=48, cols=n)
        else:  # every grid target failed: the declared plot is one blank tile, and the log says why
            log.warning("%s: no drawings for %s (every grid target failed); %s is a blank tile", args.method,
                        ", ".join(t.name for t in grid_targets), grid_out)
            image_grid(to_pil(torch.zeros(1, 3, size, size)), tmp[1], size=48, cols=1)
        if args.method != "base":
            for name, blob in shipped.items():
                (tmp[2] / f"{name.replace(' ', '_')}.safetensors").write_bytes(blob)


if __name__ == "__main__":
    run_stage("unlearncanvas", main)
