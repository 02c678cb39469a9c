"""Stage `sd_judges`: the classifiers that say what a pipeline drew (docs/sd.md "Stable Diffusion"),
one per axis: object and style ("photo" first), over the axes of the held-out canvas.  Trained
on real world images rendered on their own seed stream, never on generated ones; their accuracy
on the held-out canvas (data/eval/canvas) goes to metrics/sd_judges.json.  Saved as safetensors
with a JSON config in models/sd_judges.  With `sd.judges.pretrained: path/to/folder` the judges are
classifiers trained elsewhere (UnlearnCanvas's `style_classifier.pth` and `object_classifier.pth`,
timm `sd.judges.timm.arch`), converted to the same format, their heads ordered to the canvas's
axes (on real data UnlearnCanvas's own folder), and tested on the same held-out canvas."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs
from unlearn.params import as_config, stage_params
from unlearn.runs import write_metrics
from unlearn.sd.data import JUDGE_STREAM, PHOTO, WORLD, Images, canvas_axes, canvas_images, render_images
from unlearn.sd.judges import (
    Classifier,
    JudgeConfig,
    TimmConfig,
    accuracy,
    classifier_classes,
    config_record,
    import_classifier,
    save_judges,
    train_judge,
)

CANVAS, OUT, METRICS = "data/eval/canvas", "models/sd_judges", "metrics/sd_judges.json"
log = logging.getLogger("sd_judges")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("sd_judges")
    device = torch_device(p("model.device"))
    size, j = int(p("sd.image_size")), dict(p("sd.judges"))
    pretrained, per_cell, foreign = str(j.pop("pretrained")), int(j.pop("images_per_cell")), j.pop("timm")
    if pretrained != "synthetic":
        return imported(Path(pretrained), as_config(TimmConfig, foreign, "sd.judges.timm"), size, start)
    if p("data.source") != "synthetic":
        raise UnlearnError("sd_judges trains the world's judges on the synthetic world only; on real data give "
                           "sd.judges.pretrained: path/to/UnlearnCanvas's classifiers")
    cfg = as_config(JudgeConfig, j, "sd.judges")
    train = render_images(int(p("data.synthetic.seed")), JUDGE_STREAM, per_cell, size, progress="render")
    test = canvas_images(CANVAS, size, WORLD)
    x = train.as_float()
    judges, times, final = {}, {}, {}
    for axis, y in (("object", train.objects), ("style", train.styles)):
        t0 = time.perf_counter()
        judge, losses = train_judge(x, y, list(WORLD.names(axis)), cfg, device, progress=f"judge {axis}")
        times[axis] = round(time.perf_counter() - t0, 1)
        judges[axis], final[axis] = judge.cpu(), {"final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
    finish(judges, test, size, {"train": config_record(cfg) | {"images_per_cell": per_cell, "images": len(train)}},
           {"train_images": len(train), "train_s": times}, start, final)


def imported(folder: Path, foreign: TimmConfig, size: int, start: float) -> None:
    """The judges trained elsewhere: each axis's classifier converted (its head reordered to the
    canvas's axis) and tested on the held-out canvas like the judges trained here."""
    if not folder.is_dir():
        raise UnlearnError(f"sd.judges.pretrained {folder} is not a folder; give the folder that holds style_classifier.pth and object_classifier.pth")
    axes = canvas_axes(CANVAS)
    test = canvas_images(CANVAS, size, axes)
    judges = {axis: import_classifier(folder / f"{axis}_classifier.pth", classifier_classes(folder, axis), list(axes.names(axis)),
                                      foreign.arch, foreign.input_size, PHOTO) for axis in ("object", "style")}
    finish(judges, test, size, {"pretrained": str(folder), "timm": asdict(foreign)}, {"pretrained": str(folder)}, start)


def finish(judges: dict[str, Classifier], test: Images, size: int, record: dict, extra: dict, start: float, final: dict | None = None) -> None:
    """Test every judge on the held-out canvas; save them (models/sd_judges) and the metrics
    (`final`: per axis, training figures to report beside the accuracy)."""
    xt, results = test.as_float(), {}
    for axis, yt in (("object", test.objects), ("style", test.styles)):
        results[axis] = accuracy(judges[axis], xt, yt) | (final or {}).get(axis, {})
        log.info("%s judge: %.3f on %d held-out real images", axis, results[axis]["accuracy"], len(test))
    with atomic_outputs(OUT, METRICS) as (out, metrics):
        save_judges(out, judges, size, record | {"held_out": {a: r["accuracy"] for a, r in results.items()}})
        write_metrics(metrics, {"held_out_real": results, "held_out_images": len(test), **extra, "time_s": round(time.perf_counter() - start, 1),
                                "peak_memory_mb": peak_memory_mb(), "threads": torch.get_num_threads()}, "sd_judges")


if __name__ == "__main__":
    run_stage("sd_judges", main)
