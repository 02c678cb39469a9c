"""Membership inference, the "dist" attack of the SLUG reference (docs/methods.md, "Membership inference").

Feature: the cosine between a pair's image and caption embeddings.  Members are the forget-set
pairs (trained on); non-members are the target's held-out evaluation images, each paired with a
caption drawn (seeded) from the forget set, so captions come from the same distribution and only
the images are unseen.  Per seed, members are subsampled to the non-member count (balanced
classes), and a logistic regression is scored with stratified 10-fold cross-validation.  An
accuracy near 0.5 means the model no longer tells its forget pairs from unseen ones.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score

from unlearn.errors import UnlearnError


@torch.no_grad()
def pair_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> np.ndarray:
    return (image_emb * text_emb).sum(dim=-1).cpu().double().numpy()


def mia_accuracy(members: np.ndarray, nonmembers: np.ndarray, folds: int = 10, seeds: int = 5) -> dict[str, float]:
    n = min(len(members), len(nonmembers))
    if n < folds:
        raise UnlearnError(f"membership inference needs at least {folds} members and non-members (have {len(members)}, {len(nonmembers)}); lower eval.mia.folds")
    scores = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        m = members[rng.choice(len(members), size=n, replace=False)]
        u = nonmembers[rng.choice(len(nonmembers), size=n, replace=False)]
        x = np.concatenate([m, u])[:, None]
        y = np.concatenate([np.ones(n), np.zeros(n)])
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        scores.extend(cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy"))
    return {"mean": round(float(np.mean(scores)), 6), "std": round(float(np.std(scores)), 6), "members": int(len(members)), "nonmembers": int(len(nonmembers))}


def heldout_captions(forget_captions: list[str], n: int, seed: int) -> list[str]:
    """A seeded draw of forget-set captions for the n held-out (non-member) images."""
    rng = np.random.default_rng(seed)
    return [forget_captions[int(i)] for i in rng.integers(len(forget_captions), size=n)]


@torch.no_grad()
def clip_mia(adapter, forget_batches, heldout: torch.Tensor, captions: list[str], folds: int, seeds: int) -> dict[str, float]:
    """The attack on a CLIP model as it is now: members are the forget pairs (batches of
    preprocessed images and tokens), non-members the held-out images with `captions`."""
    members = np.concatenate([pair_cosines(adapter.encode_images(x), adapter.encode_tokens(t))
                              for x, t in forget_batches])
    nonmembers = pair_cosines(adapter.encode_images(heldout), adapter.encode_texts(captions))
    return mia_accuracy(members, nonmembers, folds, seeds)


class ConceptAttack:
    """The attack for one target, its inputs built once: members are the forget pairs
    (`forget_batches`, re-iterable), non-members the target's held-out evaluation images (test and
    validation) with captions drawn from the forget manifest, seeded by the split seed."""

    def __init__(self, adapter, eval_dir, concept, split: tuple[float, int], forget_batches, forget_manifest, folds: int, seeds: int):
        from unlearn.eval.suite import concept_tasks
        from unlearn.eval.zeroshot import load_images
        from unlearn.io import read_json

        paths = [p for part in ("test", "val") for p in concept_tasks(eval_dir, concept, part, *split).forget.paths]
        captions = [s["caption"] for s in read_json(forget_manifest)["samples"]]
        self.heldout = load_images(adapter, paths)
        self.captions = heldout_captions(captions, len(paths), split[1])
        self.forget_batches, self.folds, self.seeds = forget_batches, folds, seeds

    def __call__(self, adapter) -> dict[str, float]:
        return clip_mia(adapter, self.forget_batches, self.heldout, self.captions, self.folds, self.seeds)
