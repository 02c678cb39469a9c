"""What the VLM answers, scored: the search's evaluator and the reported figures.

For an identity target on one part (val or test) of the evaluation sets (`eval.split`):
- forget: the target's portraits, asked its name; the figure is the share whose answer names the
  target (a name or an alias, curate's word-boundary match);
- retain: the other identities' portraits, asked their names; the share answered with exactly the
  right identity (named, and no other identity named);
- utility: the object images, asked the object; the share whose answer names the right object.

`VlmEvaluator.evaluate` returns them under the keys SLUG's search reads (`forget_top1`,
`retain_top1`, `utility_top1`; a VLM has no top-5, so the `_top5` keys repeat the top-1 figures),
so `unlearn.methods.slug.find_edit` searches on what the VLM answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unlearn.data.curate import Concept
from unlearn.eval.suite import SETS, concept_tasks
from unlearn.vlm.data import named, says_unknown
from unlearn.vlm.model import generate_answers, prepare_inputs


@dataclass(frozen=True)
class Questions:
    identity: str = "What's the name of the person in this image?"
    object: str = "What object is in this image?"


def correct(answer: str, truth: str, concepts: Sequence[Concept]) -> bool:
    """The answer names `truth` and no other concept of the same kind."""
    return named(answer, concepts) == [truth]


class VlmEvaluator:
    """The search's evaluator over a LLaVA (see the module doc).  The processor's inputs are
    prepared once per set; every call generates afresh, so the caches SLUG's CLIP evaluator keeps
    are not needed (`prepare` and `reset` do nothing)."""

    def __init__(self, model, processor, eval_dir: str | Path, concept: Concept, identities: Sequence[Concept], objects: Sequence[Concept],
                 part: str, val_fraction: float, seed: int, template: str, questions: Questions, max_new_tokens: int = 8,
                 batch_size: int = 64):
        self.model, self.processor = model, processor
        self.concept, self.identities, self.objects = concept, list(identities), list(objects)
        tasks = concept_tasks(eval_dir, concept, part, val_fraction, seed)
        self.tasks = {n: getattr(tasks, n) for n in SETS}
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.inputs = {n: prepare_inputs(model, processor, t.paths, questions.identity if n != "utility" else questions.object, template)
                       for n, t in self.tasks.items()}
        self.answers: dict[str, list[str]] = {}

    @property
    def sizes(self) -> dict[str, int]:
        return {n: len(t.paths) for n, t in self.tasks.items()}

    def reset(self) -> None:
        pass

    def prepare(self, edited: str | None = None) -> None:
        pass

    def truths(self, name: str) -> list[str]:
        t = self.tasks[name]
        return [t.classnames[label] for label in t.labels]

    def evaluate(self, edited: str | None = None, sets: tuple[str, ...] = SETS, reference: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in sets:
            answers = generate_answers(self.model, self.processor, self.inputs[name], self.max_new_tokens, self.batch_size)
            self.answers[name] = answers
            if name == "forget":
                score = sum(self.concept.mentioned_in(a) for a in answers) / len(answers)
            else:
                pool = self.identities if name == "retain" else self.objects
                score = sum(correct(a, t, pool) for a, t in zip(answers, self.truths(name), strict=True)) / len(answers)
            out[f"{name}_top1"] = out[f"{name}_top5"] = score
        return out

    def per_class(self, name: str) -> dict[str, float]:
        """The last scored answers of a set (retain or utility): the share right per class."""
        pool = self.identities if name == "retain" else self.objects
        hits: dict[str, list[bool]] = {}
        for a, t in zip(self.answers[name], self.truths(name), strict=True):
            hits.setdefault(t, []).append(correct(a, t, pool))
        return {t: sum(h) / len(h) for t, h in hits.items()}

    def instead(self) -> dict:
        """What the last scored forget answers say: the target, "I don't know", another identity
        (and which), or something else; shares of the forget images."""
        answers = self.answers["forget"]
        others = Counter()
        kinds = Counter()
        for a in answers:
            names = named(a, self.identities)
            if self.concept.name in names:
                kinds["target"] += 1
            elif says_unknown(a):
                kinds["dont_know"] += 1
            elif names:
                kinds["other_identity"] += 1
                others.update(names)
            else:
                kinds["other"] += 1
        n = len(answers)
        return {"target": kinds["target"] / n, "dont_know": kinds["dont_know"] / n, "other_identity": kinds["other_identity"] / n,
                "other": kinds["other"] / n, "other_names": dict(others.most_common())}


def base_accuracy(model, processor, eval_dir: str | Path, part: str, val_fraction: float, seed: int, template: str, questions: Questions,
                  identities: Sequence[Concept], objects: Sequence[Concept], max_new_tokens: int = 8, batch_size: int = 64) -> dict:
    """Every identity's portraits asked their names, every object image asked its object (one
    part of the evaluation sets): the share answered right, per axis and per class."""
    from unlearn.data.evalsets import read_celeba, read_imagenet
    from unlearn.eval.suite import split_part
    from unlearn.vlm.model import answer

    out: dict = {}
    eval_dir = Path(eval_dir)
    for axis, data, question, pool in (("identity", read_celeba(eval_dir / "celeba"), questions.identity, identities),
                                       ("object", read_imagenet(eval_dir / "imagenet"), questions.object, objects)):
        idx = split_part(data, part, val_fraction, seed)
        answers = answer(model, processor, [data.paths[i] for i in idx], question, template, max_new_tokens, batch_size)
        truths = [data.classnames[data.labels[i]] for i in idx]
        right = [correct(a, t, pool) for a, t in zip(answers, truths, strict=True)]
        per_class = {c: sum(r for r, t in zip(right, truths, strict=True) if t == c) / max(1, truths.count(c)) for c in data.classnames}
        out[axis] = {"accuracy": sum(right) / len(right), "images": len(right), "worst_class": min(per_class, key=per_class.get),
                     "worst_class_accuracy": min(per_class.values()), "dont_know": sum(says_unknown(a) for a in answers) / len(answers)}
    return out
