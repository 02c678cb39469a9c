"""Stage `vlm_base`: the vision-language model SLUG edits.  On the default world, a tiny
`transformers.LlavaForConditionalGeneration` trained here (docs/vlm.md "Vision-language model"): the
CLIP base model's vision tower (models/hf/base), frozen; LLaVA's projector; a small Llama; a
byte-level BPE tokenizer trained on the world's text; question/answer pairs rendered from the
world.  Saved with `save_pretrained` (safetensors) in models/vlm_base, loadable offline with
`LlavaForConditionalGeneration.from_pretrained`.  With `vlm.pretrained: path/to/llava`, the
folder is checked against the CLIP (its vision tower must be that CLIP's) and recorded by path.
Either way metrics/vlm_base.json holds the answers' accuracy on the test images."""

from __future__ import annotations

import csv
import logging
import time

import torch

from unlearn.cli import peak_memory_mb, run_stage, torch_device
from unlearn.data.curate import table_concepts
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs, write_json
from unlearn.models.adapter import fingerprint, load
from unlearn.params import as_config, stage_params
from unlearn.runs import write_metrics
from unlearn.vlm.data import corpus, make_qa
from unlearn.vlm.evaluate import Questions, base_accuracy
from unlearn.vlm.model import (
    LanguageConfig,
    build_llava,
    build_processor,
    check_vision_tower,
    config_record,
    load_vlm,
    save_vlm,
    tie_vision_tower,
    train_tokenizer,
)
from unlearn.vlm.prompt import check_template
from unlearn.vlm.train import TrainConfig, train

CLIP, EVAL, OUT, METRICS, LOSS = "models/hf/base", "data/eval", "models/vlm_base", "metrics/vlm_base.json", "plots/vlm_loss.csv"
log = logging.getLogger("vlm_base")
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "layers", "heads", "feature_layer", "select_strategy")


def main() -> None:
    start = time.perf_counter()
    p = stage_params("vlm_base")
    template, questions = check_template(str(p("vlm.template"))), as_config(Questions, p("vlm.questions"), "vlm.questions")
    concepts = table_concepts(p("concepts"))
    identities, objects = [c for c in concepts if c.kind == "identity"], [c for c in concepts if c.kind == "object"]
    device = torch_device(p("model.device"))
    clip = load(CLIP, device=device)
    if clip.family != "hf_clip":
        raise UnlearnError(f"{CLIP} holds a {clip.family} model; the VLM track needs the transformers export (re-run `dvc repro export`)")
    pretrained, losses, record, train_s = str(p("vlm.pretrained")), [], {}, None
    if pretrained == "synthetic":
        if p("data.source") != "synthetic":
            raise UnlearnError("vlm.pretrained: synthetic trains a tiny LLaVA on the synthetic world only; with data.source "
                               f"{p('data.source')!r} give a LLaVA folder (vlm.pretrained: path/to/llava-1.5-7b-hf)")
        t = dict(p("vlm.train"))
        lang = as_config(LanguageConfig, {k: t[k] for k in MODEL_KEYS} | {"max_positions": 256}, "vlm.train")
        train_cfg = as_config(TrainConfig, {k: t[k] for k in ("epochs", "batch_size", "lr", "warmup_steps", "seed")}, "vlm.train")
        n, seed = int(t["examples"]), int(t["seed"])
        if n < train_cfg.batch_size:
            raise UnlearnError(f"vlm.train.examples is {n}; it must be at least vlm.train.batch_size ({train_cfg.batch_size})")
        tokenizer = train_tokenizer(corpus(seed, 2000), lang.vocab_size)
        model = build_llava(clip.model.vision_model, clip.model.config.vision_config, tokenizer, lang, seed).to(device)
        processor = build_processor(clip.processor, tokenizer, model)
        size = int(p("data.synthetic.image_size"))
        examples = [make_qa(seed, i, size) for i in range(n)]
        t0 = time.perf_counter()
        losses = train(model, processor, examples, template, train_cfg)
        train_s = round(time.perf_counter() - t0, 1)
        record = {"pretrained": "synthetic", "language": config_record(lang), "train": t}  # no times in a cached output
    else:
        model, processor = load_vlm(pretrained, device, half=bool(p("vlm.half")) and device.startswith("cuda"))
        record = {"pretrained": pretrained}
    check_vision_tower(model, clip.model, pretrained if pretrained != "synthetic" else "the trained LLaVA", CLIP)
    tie_vision_tower(model, clip.model)  # the same weights (checked): answers come from the CLIP's tower
    split = p("eval.split")
    acc = base_accuracy(model, processor, EVAL, "test", float(split["val_fraction"]), int(split["seed"]), template, questions, identities,
                        objects, int(p("vlm.max_new_tokens")), int(p("vlm.batch_size")))
    log.info("test: identity named right %.3f (%d portraits), object right %.3f (%d images)", acc["identity"]["accuracy"],
             acc["identity"]["images"], acc["object"]["accuracy"], acc["object"]["images"])
    with atomic_outputs(OUT, METRICS, LOSS) as (out, metrics, loss_csv):
        record |= {"clip": CLIP, "clip_sha256": fingerprint(CLIP)}
        if pretrained == "synthetic":
            save_vlm(model, processor, out, record)
        else:  # a 7B model is not copied: the record points at it
            write_json(out / "unlearn_vlm.json", record)
        with open(loss_csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss"])
            w.writerows([k, round(v, 5)] for k, v in enumerate(losses))
        write_metrics(metrics, {"test": acc, "pretrained": pretrained, "parameters": sum(q.numel() for q in model.parameters()),
                             "trained_parameters": sum(q.numel() for n, q in model.named_parameters() if "vision_tower" not in n),
                             "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4) if losses else None,
                             "train_s": train_s, "time_s": round(time.perf_counter() - start, 2), "peak_memory_mb": peak_memory_mb(),
                             "threads": torch.get_num_threads()}, "vlm_base")


if __name__ == "__main__":
    run_stage("vlm_base", main)
