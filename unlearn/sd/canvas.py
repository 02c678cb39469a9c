"""The UnlearnCanvas protocol (arXiv 2402.11846), written down: one answer set for every method,
one aggregation.

- Answer set: every (object, style) prompt of the canvas, the un-stylised photos (UnlearnCanvas's
  Seed_Images) included when `seed_images` is on, each drawn with K fixed seeds by one sampler
  (DDIM steps, guidance and seeds are params shared by every method; `unlearn.sd.evaluate`).
- Judges: the object and style classifiers (stage `sd_judges`), trained on real images only.
- Per target: UA = 1 - the target axis's judge accuracy on the drawings whose prompt names the
  target; IRA = the same judge's accuracy on the other drawings (the other concepts of that axis;
  with `seed_images`, the photo prompts count as a concept of the style axis); CRA = the other
  axis's judge accuracy on those same drawings (prompts not naming the target).
- FID proxy: the Fréchet distance in the judges' feature space (`unlearn.sd.fid`) between the
  drawings of prompts not naming the target and real held-out canvas images without the target;
  not comparable with published FIDs.
- Means: over the style targets and over the object targets, per method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn.data.canvas import SEED_IMAGES, display_name
from unlearn.errors import UnlearnError
from unlearn.sd.data import PHOTO, Axes, Images, Templates
from unlearn.sd.unlearn import Target

# UnlearnCanvas's leaderboard (SD v1.5, 50 styles x 20 objects, 100 DDIM steps, guidance 9, 5
# seeds; Zhang et al. 2024, arXiv 2402.11846) and SLUG's own row (Cai et al., ICML 2025): another
# model at another scale, printed for reference only.
PUBLISHED = {
    "esd": {"style": (98.58, 80.97, 93.96), "object": (92.15, 55.78, 44.23), "fid": 65.55, "time_s": 6163, "memory_gb": 17.8, "storage_gb": 4.3},
    "fmn": {"style": (88.48, 56.77, 46.60), "object": (45.64, 90.63, 73.46), "fid": 131.37, "time_s": 350, "memory_gb": 17.9, "storage_gb": 4.2},
    "uce": {"style": (98.40, 60.22, 47.71), "object": (94.31, 39.35, 34.67), "fid": 182.01, "time_s": 434, "memory_gb": 5.1, "storage_gb": 1.7},
    "ca": {"style": (60.82, 96.01, 92.70), "object": (46.67, 90.11, 81.97), "fid": 54.21, "time_s": 734, "memory_gb": 10.1, "storage_gb": 4.2},
    "salun": {"style": (86.26, 90.39, 95.08), "object": (86.91, 96.35, 99.59), "fid": 61.05, "time_s": 667, "memory_gb": 30.8, "storage_gb": 4.0},
    "slug": {"style": (86.29, None, None), "object": (None, None, None), "fid": None, "time_s": 39, "memory_gb": None, "storage_gb": 0.04},
}


@dataclass(frozen=True)
class AnswerSet:
    prompts: list[str]
    objects: torch.Tensor
    styles: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


def answer_set(templates: Templates, per_prompt: int, seed_images: bool, axes: Axes) -> AnswerSet:
    """Every (object, style) cell of `axes` `per_prompt` times, object-major, seed-major (the first
    len(cells) prompts are one drawing of every cell)."""
    if per_prompt < 1:
        raise UnlearnError(f"unlearncanvas.images_per_prompt is {per_prompt}; use 1 or more")
    cells = [c for c in axes.cells() if seed_images or axes.styles[c[1]] != PHOTO] * per_prompt
    return AnswerSet([axes.prompt(templates, c) for c in cells], torch.tensor([o for o, _ in cells]), torch.tensor([s for _, s in cells]))


def check_targets(names: list | str, key: str, axes: Axes) -> list[Target]:
    """The benchmark's targets: each a style or an object of the canvas (`axes`), none twice;
    `all` is every style, then every object.  A name may be written as its folder
    ("Van_Gogh" for "Van Gogh")."""
    if names == "all":
        names = [*axes.styles[1:], *axes.objects]
    if not names or isinstance(names, str):
        raise UnlearnError(f"{key} is {names!r}; list the targets ([Sepia, apple]) or write all, from {axes.describe()}")
    out = []
    for n in (display_name(str(n)) for n in names):
        if n in axes.styles[1:]:
            out.append(Target(n, "style", axes))
        elif n in axes.objects:
            out.append(Target(n, "object", axes))
        else:
            raise UnlearnError(f"{key} names {n!r}, neither a style nor an object of the canvas ({axes.describe()}); use one of those")
    if len({t.name for t in out}) != len(out):
        raise UnlearnError(f"{key} names a target twice: {', '.join(map(str, names))}")
    return out


def check_cells(images, root: str | Path, axes: Axes) -> None:
    """Every (style, object) cell of the canvas, Seed_Images included, holds an image: a missing
    or empty cell would leave its concept out of the FID's real set unnoticed."""
    have = set(zip(images.styles.tolist(), images.objects.tolist()))
    missing = [f"{s_name if s_name != PHOTO else SEED_IMAGES}/{o_name}" for s, s_name in enumerate(axes.styles)
               for o, o_name in enumerate(axes.objects) if (s, o) not in have]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UnlearnError(f"the canvas at {root} has no image in {len(missing)} cell(s): {shown}; every <Style>/<Object>/ folder "
                           "needs at least one image (re-run `dvc repro download`, or complete the folder)")


def split_cells(images: Images, per_cell: int, root: str | Path, axes: Axes) -> tuple[Images, Images]:
    """The first `per_cell` images of every cell (what the methods train on) and the rest (the
    real set of the FID), from a real canvas over `axes`; every cell must keep at least one image for the rest."""
    cell = axes.cell_of(images)
    rank = torch.zeros_like(cell)
    seen: dict[int, int] = {}
    for i, c in enumerate(cell.tolist()):
        rank[i], seen[c] = seen.get(c, 0), seen.get(c, 0) + 1
    short = min(seen.values())
    if short <= per_cell:
        raise UnlearnError(f"a cell of the canvas at {root} holds {short} image(s), not more than unlearncanvas.train_images_per_cell "
                           f"({per_cell}): nothing would be left for the FID's real set; lower train_images_per_cell or give a fuller canvas")
    train = rank < per_cell
    return images.subset(train), images.subset(~train)


def named_mask(labelled, target: Target) -> torch.Tensor:
    """The items (an AnswerSet's prompts, or `unlearn.sd.data.Images`: anything with `objects`
    and `styles` indices) of the target's cells."""
    return (labelled.objects if target.axis == "object" else labelled.styles) == target.index


def score(answers: AnswerSet, pred: dict[str, torch.Tensor], target: Target) -> dict[str, float]:
    """UA, IRA and CRA (in %) of one target from the judges' predictions on the answer set."""
    named = named_mask(answers, target)
    truth = {"object": answers.objects, "style": answers.styles}
    ua = 1 - float((pred[target.axis][named] == target.index).float().mean())
    ira = float((pred[target.axis][~named] == truth[target.axis][~named]).float().mean())
    cra = float((pred[target.other][~named] == truth[target.other][~named]).float().mean())
    return {"UA": round(100 * ua, 2), "IRA": round(100 * ira, 2), "CRA": round(100 * cra, 2)}


def means(rows: list[dict]) -> dict[str, dict]:
    """Per axis, the mean of UA/IRA/CRA/FID over the rows that succeeded, and how many failed."""
    out = {}
    for axis in ("style", "object"):
        mine = [r for r in rows if r["axis"] == axis]
        ok = [r for r in mine if r["status"] == "ok"]
        out[axis] = {k: round(sum(r[k] for r in ok) / len(ok), 2) if ok else None for k in ("UA", "IRA", "CRA", "fid")}
        out[axis] |= {"targets": len(mine), "failed": len(mine) - len(ok)}
    return out


def _f(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def leaderboard(summary: dict[str, dict], timed: bool) -> str:
    """UnlearnCanvas's table shape: style UA/IRA/CRA, object UA/IRA/CRA, FID proxy, storage (and
    with `timed`, time and memory: figures of one run, kept out of git), then the published rows."""
    head = ["method", "style UA", "style IRA", "style CRA", "object UA", "object IRA", "object CRA", "FID (judges)"]
    head += ["time s", "memory GB"] if timed else []
    head += ["storage MB", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, s in summary.items():
        cells = [m] + [_f(s[a][k]) for a in ("style", "object") for k in ("UA", "IRA", "CRA")]
        fids = [s[a]["fid"] for a in ("style", "object") if s[a]["fid"] is not None]
        cells.append(_f(sum(fids) / len(fids) if fids else None))
        if timed:
            cells += [_f(s.get("time_s"), 1), _f(None if s.get("peak_memory_mb") is None else s["peak_memory_mb"] / 1024, 2)]
        cells += [_f(None if s.get("stored_bytes") is None else s["stored_bytes"] / 1e6, 3), str(s["style"]["failed"] + s["object"]["failed"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Published (UnlearnCanvas, arXiv 2402.11846: SD v1.5, 50 styles x 20 objects; SLUG's row from its paper): another model at "
              "another scale, for reference only; their FID is Inception's, ours the judges' proxy.", "",
              "| method | style UA | style IRA | style CRA | object UA | object IRA | object CRA | FID | time s | memory GB | storage GB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in PUBLISHED.items():
        cells = [m, *(_f(v) for v in r["style"]), *(_f(v) for v in r["object"]), _f(r["fid"]), _f(r["time_s"], 0), _f(r["memory_gb"], 1),
                 _f(r["storage_gb"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def canvas_scatter(rows: Sequence[dict], path: str | Path, title: str) -> None:
    """UnlearnCanvas: per method, every target's UA against its IRA (style targets round, object
    targets square); the unedited pipeline's IRA as a line per axis."""
    from unlearn.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "base"))
    for c, m in enumerate(methods):
        for axis, marker in (("style", "o"), ("object", "s")):
            pts = [r for r in rows if r["method"] == m and r["axis"] == axis and r["status"] == "ok"]
            if not pts:
                continue
            ax.scatter([r["IRA"] for r in pts], [r["UA"] for r in pts], c=f"C{c % 10}", marker=marker, s=40,
                       label=f"{m} ({axis})", edgecolors="k" if m == "slug" else "none")
    for axis, style in (("style", "--"), ("object", ":")):
        base = [r["IRA"] for r in rows if r["method"] == "base" and r["axis"] == axis]
        if base:
            ax.axvline(sum(base) / len(base), color="grey", linestyle=style, linewidth=1, label=f"unedited IRA ({axis})")
    ax.set_xlabel("IRA, in-domain retain accuracy (%)")
    ax.set_ylabel("UA, unlearning accuracy (%)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
