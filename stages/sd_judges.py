"""Stage `sd_judges`: the classifiers that say what a pipeline drew (README "Stable Diffusion"),
one per axis: object (the world's objects) and style ("photo" and the world's styles).  Trained
on real world images rendered on their own seed stream, never on generated ones; their accuracy
on the held-out canvas (data/eval/canvas) goes to metrics/sd_judges.json.  Saved as safetensors
with a JSON config in models/sd_judges.  With `sd.judges.pretrained: path/to/folder` the judges are
classifiers trained elsewhere (UnlearnCanvas's `style_classifier.pth` and `object_classifier.pth`,
timm `sd.judges.timm.arch`), converted to the same format and tested on the same held-out canvas."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs
from unlearn.params import as_config, stage_params
from unlearn.runs import write_metrics
from unlearn.sd.data import JUDGE_STREAM, OBJECT_AXIS, PHOTO, STYLE_AXIS, canvas_images, render_images
from unlearn.sd.judges import JudgeConfig, accuracy, classifier_classes, config_record, import_classifier, save_judges, train_judge

CANVAS, OUT, METRICS = "data/eval/canvas", "models/sd_judges", "metrics/sd_judges.json"
log = logging.getLogger("sd_judges")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("sd_judges")
    device = torch_device(p("model.device"))
    size, j = int(p("sd.image_size")), dict(p("sd.judges"))
    pretrained, per_cell, foreign = str(j.pop("pretrained")), int(j.pop("images_per_cell")), dict(j.pop("timm"))
    if pretrained != "synthetic":
        return imported(Path(pretrained), foreign, size, start)
    if p("data.source") != "synthetic":
        raise UnlearnError("sd_judges trains the world's judges on the synthetic world only; on real data give "
                           "sd.judges.pretrained: path/to/UnlearnCanvas's classifiers")
    cfg = as_config(JudgeConfig, j, "sd.judges")
    train = render_images(int(p("data.synthetic.seed")), JUDGE_STREAM, per_cell, size, progress="render")
    test = canvas_images(CANVAS, size)
    x, xt = train.as_float(), test.as_float()
    judges, results, times = {}, {}, {}
    for axis, classes, y, yt in (("object", OBJECT_AXIS, train.objects, test.objects), ("style", STYLE_AXIS, train.styles, test.styles)):
        t0 = time.perf_counter()
        judge, losses = train_judge(x, y, list(classes), cfg, device, progress=f"judge {axis}")
        times[axis] = round(time.perf_counter() - t0, 1)
        judge = judge.cpu()
        results[axis] = accuracy(judge, xt, yt) | {"final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
        judges[axis] = judge
        log.info("%s judge: %.3f on %d held-out real images (%.0f s)", axis, results[axis]["accuracy"], len(test), times[axis])
    with atomic_outputs(OUT, METRICS) as (out, metrics):
        save_judges(out, judges, size, {"train": config_record(cfg) | {"images_per_cell": per_cell, "images": len(train)},
                                        "held_out": {a: r["accuracy"] for a, r in results.items()}})
        write_metrics(metrics, {"held_out_real": results, "train_images": len(train), "held_out_images": len(test), "train_s": times,
                             "time_s": round(time.perf_counter() - start, 1), "peak_memory_mb": peak_memory_mb(),
                             "threads": torch.get_num_threads()}, "sd_judges")


def imported(folder: Path, foreign: dict, size: int, start: float) -> None:
    """The judges trained elsewhere: each axis's classifier converted (its head reordered to the
    axis) and tested on the held-out canvas like the judges trained here."""
    unknown = sorted(set(foreign) - {"arch", "input_size"})
    if unknown:
        raise UnlearnError(f"sd.judges.timm has unknown keys {', '.join(unknown)}; known: arch, input_size")
    if not folder.is_dir():
        raise UnlearnError(f"sd.judges.pretrained {folder} is not a folder; give the folder that holds style_classifier.pth and object_classifier.pth")
    test = canvas_images(CANVAS, size)
    xt = test.as_float()
    judges, results = {}, {}
    for axis, names, yt in (("object", OBJECT_AXIS, test.objects), ("style", STYLE_AXIS, test.styles)):
        judges[axis] = import_classifier(folder / f"{axis}_classifier.pth", classifier_classes(folder, axis), list(names),
                                         str(foreign["arch"]), int(foreign["input_size"]), PHOTO)
        results[axis] = accuracy(judges[axis], xt, yt)
        log.info("%s judge (%s): %.3f on %d held-out real images", axis, folder, results[axis]["accuracy"], len(test))
    with atomic_outputs(OUT, METRICS) as (out, metrics):
        save_judges(out, judges, size, {"pretrained": str(folder), "timm": foreign, "held_out": {a: r["accuracy"] for a, r in results.items()}})
        write_metrics(metrics, {"held_out_real": results, "pretrained": str(folder), "held_out_images": len(test),
                                "time_s": round(time.perf_counter() - start, 1), "peak_memory_mb": peak_memory_mb(),
                                "threads": torch.get_num_threads()}, "sd_judges")


if __name__ == "__main__":
    run_stage("sd_judges", main)
