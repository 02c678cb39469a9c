"""The search log every SLUG stage writes beside its patch: one CSV row per evaluation (for
`dvc plots`) and the plot of the searched layers (`unlearn.plots.search_plot`)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from unlearn.plots import search_plot

# the columns of a search judged by one figure per set (drawings, answers); the CLIP track adds top-5
TOP1_COLUMNS = ("layer", "tower", "eval", "rho", "forget_top1", "retain_top1", "utility_top1", "forget_ok", "guard_ok", "scored")
# a search that may give its forget set up part way (the Stable Diffusion track's): the share already seen showing the target
GIVE_UP_COLUMNS = (*TOP1_COLUMNS, "forget_at_least")


def write_search_log(edit, csv_path: str | Path, png_path: str | Path, label: str, short: Callable[[str], str],
                     columns: Sequence[str] = TOP1_COLUMNS) -> None:
    """`edit` (a `unlearn.methods.slug.Edit`): its rows as CSV (a column a row lacks, because the
    search never scored that set, is empty) and the plot titled `label: chose <layer> at rho=...`."""
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in columns} for r in edit.rows)
    search_plot(edit.rows, png_path, edit.choice, f"{label}: chose {short(edit.layer)} at rho={edit.rho:.3g}"
                + ("" if edit.converged else " (NOT converged)"), short)
