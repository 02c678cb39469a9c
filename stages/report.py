"""Stage `report`: one self-contained HTML page (images inlined) of the run: the base model, the
chosen layer and step, the Pareto fronts, the search curve, the comparison table and plots, and
examples of the forgotten concept's training images.  Writes report/index.html."""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from PIL import Image, ImageDraw

from unlearn.cli import run_stage
from unlearn.data.pairs import decode
from unlearn.data.shards import iter_samples
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs, read_json
from unlearn.params import stage_params

OUT = "report/index.html"
FORGET = "data/forget"
log = logging.getLogger("report")
_DIRECTION = {"gradient": "forget gradient (the paper's direction)",
              "retain_preconditioned": "forget gradient preconditioned by the layer's retain inputs"}


def _img(path: str | Path, alt: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UnlearnError(f"{p} is missing; run `dvc repro` before the report")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'


def _examples(n: int) -> str:
    tiles = []
    for sample in iter_samples(FORGET):
        img = decode(sample, FORGET).resize((128, 128))
        sheet = Image.new("RGB", (128, 150), "white")
        sheet.paste(img, (0, 0))
        ImageDraw.Draw(sheet).text((2, 132), sample.caption[:24], fill="black")
        tiles.append(sheet)
        if len(tiles) == n:
            break
    grid = Image.new("RGB", (len(tiles) * 130, 150), "white")
    for k, t in enumerate(tiles):
        grid.paste(t, (k * 130, 0))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return f'<img alt="forget-set examples" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(markdown: str) -> str:
    """A markdown pipe table (and the text around it) as HTML."""
    out, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
            continue
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            rows = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def main() -> None:
    p = stage_params("report")
    n_examples = int(p("report.examples"))
    base, m, layers = read_json("metrics/base.json"), read_json("metrics/unlearn.json"), read_json("metrics/layers.json")
    b = m["base"]
    rows = [(k, _pct(b[k]), _pct(m[k])) for k in ("forget_top1", "forget_top5", "retain_top1", "retain_top5", "utility_top1", "utility_top5")]
    rows.append(("membership inference accuracy", f"{b['mia']['mean']:.3f}", f"{m['mia']['mean']:.3f}"))
    result = "".join(f"<tr><td>{k}</td><td>{x}</td><td>{y}</td></tr>" for k, x, y in rows)
    status = "converged" if m["converged"] else "NOT converged: the figures are for the best step seen"
    body = f"""
<h1>unlearn: forgetting {html.escape(m['concept'])} ({m['kind']})</h1>
<h2>Base model</h2>
<p>{html.escape(str(p('model.arch')))} ({html.escape(str(p('model.pretrained')))}): identity top-1 {_pct(base.get('identity_top1'))}, ImageNet-style top-1 {_pct(base.get('object_top1'))}.</p>
<h2>SLUG edit</h2>
<p>Layer <code>{html.escape(m['layer'])}</code>, relative step &rho; = {m['rho']:.4g} along the {_DIRECTION[m['direction']]} ({status}).
Unlearning took {m['time_s']['unlearn']:.1f} s (gradients + ranking + search), peak memory {m['peak_memory_mb']:.0f} MB,
and the patch stores {m['stored_bytes']:,} bytes.</p>
<table><tr><th>test images</th><th>base</th><th>after SLUG</th></tr>{result}</table>
<h2>Pareto fronts (importance against gradient alignment)</h2>
{_img('plots/pareto_image.png', 'image tower')} {_img('plots/pareto_text.png', 'text tower')}
<p>Front: {', '.join(html.escape(n) for t in layers['front'].values() for n in t)}</p>
<h2>Step-size search (validation images)</h2>
{_img('plots/search.png', 'search')}
<h2>Comparison with the baselines</h2>
{_table(Path('plots/compare.md').read_text()) if Path('plots/compare.md').is_file() else '<p>(no comparison: run dvc repro compare)</p>'}
{_img('plots/compare_scatter.png', 'utility against forget accuracy')} {_img('plots/compare_time.png', 'time')}
<h2>Forget-set examples</h2>
{_examples(n_examples)}
"""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>unlearn report: {html.escape(m['concept'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}img{{max-width:100%}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>{body}</body></html>
"""
    with atomic_outputs(OUT) as (out,):
        out.write_text(page)
    log.info("wrote %s (%d kB)", OUT, len(page) // 1024)


if __name__ == "__main__":
    run_stage("report", main)
