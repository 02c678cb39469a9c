"""What the unedited pipeline draws when a target's word is one it never learned: the UnlearnCanvas
answer set's prompts that name each target, drawn once with the target's own word and once with each
made-up word in its place, judged by the target axis's judge.

An edit that only takes the meaning out of a word (SLUG's text-encoder step, or any "erase" that
leaves the word unreadable) can at best make the pipeline draw what it draws for a word it never
saw.  So the UA of a made-up word is a ceiling for such an erasure on this pipeline, and the judged
classes say where the drawings go instead (docs/unlearncanvas.md "Why Watercolor stays").

Same sampler (sd.sample), test seeds (unlearncanvas.seed), drawings per prompt
(unlearncanvas.images_per_prompt) and judges as the benchmark; prints per target UA with its own
word and with each made-up word (the drawings judged as each class, counted), and writes
--out/unknown_word[_TAG].{json,md}.

    python bench/unknown_word.py                                   # unlearncanvas.targets on models/sd_base (about 1 min on 2 CPU cores)
    python bench/unknown_word.py --targets Watercolor Pixel_Art --words Xyzzy Blorf --tag wc
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.workspace import locked_label  # noqa: E402
from unlearn.errors import UnlearnError  # noqa: E402
from unlearn.params import as_config, load_yaml, lookup  # noqa: E402
from unlearn.sd.canvas import answer_set, check_targets, named_mask  # noqa: E402
from unlearn.sd.data import Templates  # noqa: E402
from unlearn.sd.evaluate import SampleConfig, generate  # noqa: E402
from unlearn.sd.judges import load_judges  # noqa: E402
from unlearn.sd.model import load_pipeline  # noqa: E402

WORDS = ["Xyzzy", "Blorf", "Quenby", "Zorvat"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="models/sd_base", help="a saved pipeline (default: the benchmark's sd_base)")
    ap.add_argument("--targets", nargs="+", default=None, help="styles or objects of the canvas (default: unlearncanvas.targets)")
    ap.add_argument("--words", nargs="+", default=WORDS, help="made-up words put in each target's place (none may be a class of the canvas)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipeline = Path(args.pipeline) if (Path(args.pipeline) / "model_index.json").is_file() else ROOT / args.pipeline
    if not (pipeline / "model_index.json").is_file():
        sys.exit(f"--pipeline {args.pipeline} is not a saved diffusers pipeline (no model_index.json): run `dvc repro sd_base` or give one")
    params = load_yaml(ROOT / "params.yaml")
    judges = load_judges(ROOT / "models/sd_judges")
    axes = judges.axes
    taken = sorted({w for w in args.words if w.lower() in {n.lower() for n in (*axes.objects, *axes.styles)}})
    if taken:
        sys.exit(f"--words {', '.join(taken)} name classes of the canvas; give words the pipeline never learned")
    targets = check_targets(args.targets or lookup(params, "unlearncanvas.targets"), "--targets", axes)
    templates = as_config(Templates, dict(lookup(params, "sd.templates")), "sd.templates")
    sample = as_config(SampleConfig, dict(lookup(params, "sd.sample")), "sd.sample")
    per_prompt, seed = int(lookup(params, "unlearncanvas.images_per_prompt")), int(lookup(params, "unlearncanvas.seed"))
    seed_images = bool(lookup(params, "unlearncanvas.seed_images"))
    pipe = load_pipeline(pipeline, "cpu", str(lookup(params, "sd.precision")))
    pipe.set_progress_bar_config(disable=True)
    answers = answer_set(templates, per_prompt, seed_images, axes)
    start, results = time.perf_counter(), []
    judged_by_prompts: dict[tuple[str, ...], collections.Counter] = {}  # a made-up word's prompts are the same for every target of an axis: drawn once

    def judged_as(axis: str, prompts: list[str]) -> collections.Counter:
        key = (axis, *prompts)
        if key not in judged_by_prompts:
            pred = judges[axis].predict(generate(pipe, prompts, sample, seed, judges.image_size))
            judged_by_prompts[key] = collections.Counter(axes.names(axis)[int(i)] for i in pred)
        return judged_by_prompts[key]

    for t in targets:
        named = named_mask(answers, t)
        cells = list(zip(answers.objects[named].tolist(), answers.styles[named].tolist()))
        row = {"target": t.name, "axis": t.axis, "drawings": len(cells), "words": {}}
        for word in [t.name, *args.words]:
            prompts = [templates.prompt(word, axes.styles[s]) if t.axis == "object" else templates.prompt(axes.objects[o], word) for o, s in cells]
            judged = judged_as(t.axis, prompts)
            row["words"][word] = {"UA": round(100 * (1 - judged[t.name] / len(cells)), 2), "judged": dict(judged.most_common())}
        made_up = [row["words"][w]["UA"] for w in args.words]
        row["made_up_UA"] = round(sum(made_up) / len(made_up), 2)
        results.append(row)
        own = row["words"][t.name]
        print(f"{t.name} ({t.axis}): UA {own['UA']:.1f} with its word, {row['made_up_UA']:.1f} with a made-up word "
              f"({', '.join(w + ' ' + format(row['words'][w]['UA'], '.1f') for w in args.words)})", flush=True)
    wall = time.perf_counter() - start
    source = args.pipeline if args.pipeline != "models/sd_base" else locked_label("sd_base", "models/sd_base")
    head = (f"{source}: the answer set's prompts naming each target (test seeds {seed}, {per_prompt} per prompt, {sample.steps} DDIM steps, "
            f"guidance {sample.guidance}), the target's word swapped for a made-up one; UA in % (100 - judged as the target); {wall:.0f} s")
    lines = [head, "", "| target | axis | drawings | UA, own word | UA, made-up word (mean) | " + " | ".join(args.words) + " | a made-up word judged as |",
             "|---|---|---|---|---|" + "---|" * len(args.words) + "---|"]
    for r in results:
        pooled = collections.Counter()
        for w in args.words:
            pooled.update(r["words"][w]["judged"])
        shown = ", ".join(f"{k} {100 * v / (len(args.words) * r['drawings']):.0f}" for k, v in pooled.most_common(3))
        lines.append(f"| {r['target']} | {r['axis']} | {r['drawings']} | {r['words'][r['target']]['UA']:.1f} | **{r['made_up_UA']:.1f}** | "
                     + " | ".join(f"{r['words'][w]['UA']:.1f}" for w in args.words) + f" | {shown} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "unknown_word" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps({"pipeline": source, "seed": seed, "images_per_prompt": per_prompt, "steps": sample.steps,
                                                  "guidance": sample.guidance, "words": args.words, "wall_s": round(wall, 1), "targets": results},
                                                 indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    try:
        main()
    except UnlearnError as e:
        raise SystemExit(f"error: {e}") from None
