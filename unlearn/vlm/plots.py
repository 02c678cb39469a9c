"""The VLM track's picture: examples of questions and answers before and after the edit."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from unlearn.plots import _pyplot


def answers_figure(rows: Sequence[dict], path: str | Path, title: str) -> None:
    """One tile per example: the image, the question's kind and truth, the answer before and
    after the edit (rows: path, question, truth, before, after)."""
    plt = _pyplot()
    cols = 4
    n_rows = max(1, (len(rows) + cols - 1) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 3.1 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        ax.imshow(Image.open(r["path"]).convert("RGB"))
        ax.set_title(f"{r['question']}\ntruth: {r['truth']}\nbefore: {r['before']}\nafter: {r['after']}", fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
