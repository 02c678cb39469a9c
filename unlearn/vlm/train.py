"""Training the tiny LLaVA: the projector and the language model on question/answer pairs, the
vision tower frozen (LLaVA's recipe in one stage).  The loss is the answer's tokens only."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from unlearn.vlm.data import QA
from unlearn.vlm.prompt import prompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    seed: int = 0


def batch_inputs(processor, examples: Sequence[QA], template: str) -> dict[str, torch.Tensor]:
    """Processor inputs for full conversations, with labels on the answer and its end token only
    (left padding: every row ends with its answer)."""
    tok = processor.tokenizer
    texts = [prompt(template, e.question) + " " + e.answer + tok.eos_token for e in examples]
    inputs = processor(images=[e.image for e in examples], text=texts, return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    for row, e in enumerate(examples):
        ans = tok(" " + e.answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        tail = inputs["input_ids"][row, -len(ans):].tolist()
        if tail != ans:  # the answer must tokenize the same alone and after the prompt
            raise AssertionError(f"answer {e.answer!r} tokenizes differently after the prompt: {tail} vs {ans}")
        labels[row, -len(ans):] = inputs["input_ids"][row, -len(ans):]
    inputs["labels"] = labels
    return inputs


def train(model, processor, examples: Sequence[QA], template: str, cfg: TrainConfig, progress: bool = True) -> list[float]:
    """AdamW with warmup and cosine decay over `cfg.epochs` shuffled passes; returns the loss of
    every step."""
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    model.model.vision_tower.eval()  # frozen, no dropout
    bar = tqdm(total=total, desc="vlm_base", disable=not progress, mininterval=2.0)
    for _ in range(cfg.epochs):
        order = rng.permutation(len(examples))
        for i in range(0, len(order), cfg.batch_size):
            inputs = batch_inputs(processor, [examples[int(j)] for j in order[i:i + cfg.batch_size]], template)
            inputs = {k: v.to(next(model.parameters()).device) for k, v in inputs.items()}
            loss = model(**inputs).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    return losses
