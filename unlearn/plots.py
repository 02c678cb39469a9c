"""Pictures people open: image grids, the Pareto fronts, the step search, the comparison.
Layer labels come from the model's adapter (`Adapter.short_name`), so plots work for every
family."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image


def image_grid(tiles: Sequence[Image.Image], path: str | Path, size: int = 96, cols: int = 12) -> None:
    """Save `tiles` as a PNG grid of `size`-pixel squares, `cols` to a row."""
    rows = max(1, (len(tiles) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * (size + 2), rows * (size + 2)), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile.convert("RGB").resize((size, size), Image.LANCZOS), ((k % cols) * (size + 2), (k // cols) * (size + 2)))
    sheet.save(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_pareto(ranking, directory: str | Path, short: Callable[[str], str]) -> None:
    """Per ranked tower, `<tower>.csv` (every candidate's scores, for `dvc plots`) and
    `<tower>.png` (the log-log front) in `directory`."""
    directory = Path(directory)
    for tower, rows in ranking.rows.items():
        with open(directory / f"{tower}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        pareto_plot(rows, directory / f"{tower}.png", f"{tower} tower: {len(ranking.fronts[tower])} of {len(rows)} layers on the Pareto front",
                    short)


def pareto_plot(rows: Sequence[dict], path: str | Path, title: str, short: Callable[[str], str] = str) -> None:
    """Log-log scatter of importance against alignment; the Pareto front joined and labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    floor = 1e-12
    others = [r for r in rows if not r["front"]]
    front = sorted((r for r in rows if r["front"]), key=lambda r: r["alignment"])
    ax.scatter([max(r["alignment"], floor) for r in others], [max(r["importance"], floor) for r in others], s=14, c="0.6", label="layer")
    ax.plot([max(r["alignment"], floor) for r in front], [max(r["importance"], floor) for r in front], "o-", c="C3", ms=5, label="Pareto front")
    for r in front:
        ax.annotate(short(r["layer"]), (max(r["alignment"], floor), max(r["importance"], floor)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gradient alignment |cos(g_f, g_r)|")
    ax.set_ylabel("importance ||g_f|| / ||theta||")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


TARGET_ONLY = ("forget", "forget_above")  # a search row scored on the target's images alone (whole, or given up part way)


def search_plot(rows: Sequence[dict], path: str | Path, chosen: dict, title: str, short: Callable[[str], str] = str) -> None:
    """Per searched layer: validation FA@1 and the two utility accuracies against rho.  Every step
    is scored on the target's images (filled markers: also on the guard sets, the retain set
    alone when it already broke its bound, or part of it when it could no longer meet it; hollow:
    only on the target's images, because the choice never reads the rest; hollow triangles: the
    target's images given up part way, at the share that already showed the target)."""
    plt = _pyplot()
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharex=True)
    for c, layer in enumerate(layers):
        pts = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["rho"])
        for ax, key in zip(axes, ("forget_top1", "retain_top1", "utility_top1")):
            have = [r for r in pts if r.get(key) is not None]
            ax.plot([r["rho"] for r in have], [r[key] for r in have], "-", lw=1, c=f"C{c % 10}", label=short(layer))
            full = [r for r in have if r.get("scored", "all") not in TARGET_ONLY]
            part = [r for r in have if r.get("scored", "all") in TARGET_ONLY]
            ax.plot([r["rho"] for r in full], [r[key] for r in full], "o", ms=3, c=f"C{c % 10}")
            ax.plot([r["rho"] for r in part], [r[key] for r in part], "o", ms=3, mfc="none", c=f"C{c % 10}")
        above = [r for r in pts if r.get("scored") == "forget_above"]
        if above:
            axes[0].plot([r["rho"] for r in above], [r["forget_at_least"] for r in above], "^", ms=4, mfc="none", c=f"C{c % 10}")
    n_full = sum(r.get("scored", "all") not in TARGET_ONLY for r in rows)
    for ax, key in zip(axes, ("forget top-1 (val)", "retain top-1 (val)", "other-kind top-1 (val)")):
        ax.set_xscale("log")
        ax.set_xlabel("relative step rho")
        ax.set_title(key)
        ax.axvline(chosen["rho"], c="k", ls=":", lw=1)
    axes[0].legend(fontsize=6)
    n_above = sum(r.get("scored") == "forget_above" for r in rows)
    fig.suptitle(f"{title}\n{len(rows)} steps scored on the target's images (hollow: only those"
                 + (f"; triangles: {n_above} given up part way" if n_above else "") + f"), {n_full} also on the guard sets (filled)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_scatter(summary: Sequence[dict], path: str | Path, title: str) -> None:
    """Per method (mean over concepts): other-kind and retain top-1 against forget top-1."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, key, label in zip(axes, ("utility_top1", "retain_top1"), ("ImageNet-style top-1 (test)", "retain identity top-1 (test)")):
        for c, s in enumerate(summary):
            if s.get(key) is None:
                continue
            ax.scatter(s["forget_top1"], s[key], s=50, c=f"C{c % 10}", marker="*" if s["method"] == "slug" else "o")
            ax.annotate(s["method"], (s["forget_top1"], s[key]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("forget top-1 (test, lower is better)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_time_bars(summary: Sequence[dict], path: str | Path, title: str) -> None:
    """Unlearning wall time per method (mean over concepts), log scale."""
    plt = _pyplot()
    rows = [s for s in summary if s.get("time_unlearn_s") is not None]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
    ax.barh([s["method"] for s in rows], [s["time_unlearn_s"] for s in rows], color=["C3" if s["method"] == "slug" else "0.55" for s in rows])
    for k, s in enumerate(rows):
        ax.annotate(f"{s['time_unlearn_s']:.1f} s", (s["time_unlearn_s"], k), fontsize=8, xytext=(3, -3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("unlearning wall time per concept, s (log)")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def forget_many_plot(rows: Sequence[dict], path: str | Path, title: str) -> None:
    """Against the number of concepts removed together, per mode (edits added up, or found one
    after another): the worst target's FA@1 and FA@5, and the accuracy on what is not a target
    (identity retain, ImageNet-style) beside the base model's."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    modes = list(dict.fromkeys(r.get("mode", "sum") for r in rows))
    for m, mode in enumerate(modes):
        rs = [r for r in rows if r.get("mode", "sum") == mode]
        k, ls = [r["removed"] for r in rs], ("-", "--")[m % 2]
        axes[0].plot(k, [r["max_forget_top1"] for r in rs], "o" + ls, c="C3", label=f"worst target FA@1 ({mode})")
        axes[0].plot(k, [r["max_forget_top5"] for r in rs], "s" + ls, c="C1", label=f"worst target FA@5 ({mode})")
        for c, (key, label) in enumerate((("identity_retain_top1", "identity retain @1 (not removed)"), ("object_top1", "ImageNet-style @1"))):
            axes[1].plot(k, [r[key] for r in rs], "o" + ls, c=f"C{c}", label=f"{label} ({mode})")
    base = [r for r in rows if r.get("mode", "sum") == modes[0]]
    for c, key in enumerate(("identity_retain_base", "object_base")):
        axes[1].plot([r["removed"] for r in base], [r[key] for r in base], ":", c=f"C{c}", label="base" if c == 0 else None)
    axes[0].set_ylabel("accuracy on the removed concepts (lower is better)")
    axes[1].set_ylabel("accuracy (higher is better)")
    for ax in axes:
        ax.set_xlabel("concepts removed together")
        ax.set_xticks(sorted({r["removed"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
