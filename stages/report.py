"""Stage `report`: one self-contained HTML page (images inlined) of the run: the base model, the
chosen layer and step, the Pareto fronts, the search curve, the comparison table and plots, and
examples of the forgotten concept's training images.  Writes report/index.html, committed with the
metrics: the same bytes on every run, so it shows results, not wall times or memory (a run's cost:
runs/*.json, `dvc metrics show`)."""

from __future__ import annotations

import html
import logging
from pathlib import Path

from unlearn.cli import run_stage
from unlearn.compare import pct
from unlearn.io import read_json
from unlearn.params import stage_params
from unlearn.report import examples, inline_image, markdown_table, write_page

OUT = "report/index.html"
FORGET = "data/forget"
VLM, VLM_BASE = "metrics/vlm_unlearn.json", "metrics/vlm_base.json"
log = logging.getLogger("report")
_DIRECTION = {"gradient": "forget gradient (the paper's direction)",
              "retain_preconditioned": "forget gradient preconditioned by the layer's retain inputs"}


def vlm_section() -> str:
    """The vision-language track: the edit of the LLaVA's vision tower and its answers."""
    if not Path(VLM).is_file():
        return "<h2>Vision-language model</h2><p>(not run: dvc repro vlm_unlearn)</p>"
    v, b = read_json(VLM), read_json(VLM_BASE)
    names = {"forget_identification": "target named", "retain_identification": "other identities named right",
             "object_accuracy": "object answered right"}
    rows = "".join(f"<tr><td>{n}</td><td>{pct(v['base_test'][k], 1, ' %')}</td><td>{pct(v['test'][k], 1, ' %')}</td></tr>" for k, n in names.items())
    said = v["says_instead"]
    return f"""<h2>Vision-language model: forgetting {html.escape(v['concept'])} in a LLaVA</h2>
<p>Base LLaVA ({html.escape(str(b['pretrained']))}): identity named right on {pct(b['test']['identity']['accuracy'], 1, ' %')} of
{b['test']['identity']['images']} test portraits, object on {pct(b['test']['object']['accuracy'], 1, ' %')} of {b['test']['object']['images']} test
object images.  SLUG edited <code>{html.escape(v['layer'])}</code> of its vision tower (&rho; = {v['rho']:.3g},
{'converged' if v['converged'] else 'NOT converged'}); the patch stores {v['stored_bytes']:,} bytes.
On the target's test portraits it now says "I don't know" {pct(said['dont_know'], 1, ' %')}, another identity's name
{pct(said['other_identity'], 1, ' %')}, something else {pct(said['other'], 1, ' %')}.</p>
<table><tr><th>test images (greedy answers)</th><th>base</th><th>after SLUG</th></tr>{rows}</table>
{inline_image('plots/vlm_answers.png', 'answers before and after')}
"""


def main() -> None:
    p = stage_params("report")
    n_examples = int(p("report.examples"))
    base, m, layers = read_json("metrics/base.json"), read_json("metrics/unlearn.json"), read_json("metrics/layers.json")
    export = read_json("metrics/export.json")
    b = m["base"]
    rows = [(k, pct(b[k], 1, ' %'), pct(m[k], 1, ' %')) for k in ("forget_top1", "forget_top5", "retain_top1", "retain_top5", "utility_top1", "utility_top5")]
    rows.append(("membership inference accuracy", f"{b['mia']['mean']:.3f}", f"{m['mia']['mean']:.3f}"))
    result = "".join(f"<tr><td>{k}</td><td>{x}</td><td>{y}</td></tr>" for k, x, y in rows)
    status = "converged" if m["converged"] else "NOT converged: the figures are for the best step seen"
    body = f"""
<h1>unlearn: forgetting {html.escape(m['concept'])} ({m['kind']})</h1>
<h2>Base model</h2>
<p>{html.escape(str(p('model.family')))} model, {html.escape(str(p('model.arch')))} ({html.escape(str(p('model.pretrained')))}): identity top-1 {pct(base.get('identity_top1'), 1, ' %')}, ImageNet-style top-1 {pct(base.get('object_top1'), 1, ' %')}{f", style top-1 {pct(base['style_top1'], 1, ' %')} (canvas, among the styles)" if 'style_top1' in base else ''}.</p>
<h2>SLUG edit</h2>
<p>Layer <code>{html.escape(m['layer'])}</code>, relative step &rho; = {m['rho']:.4g} along the {_DIRECTION[m['direction']]} ({status}).
The patch stores {m['stored_bytes']:,} bytes.  What the run cost (wall time of each stage, peak memory) is kept out of this page
and out of git, in the run records <code>runs/*.json</code> (<code>dvc metrics show</code>), since it differs from run to run.</p>
<table><tr><th>test images</th><th>base</th><th>after SLUG</th></tr>{result}</table>
<h2>Export to transformers</h2>
<p>models/hf/base and models/hf/unlearned (transformers CLIPModel folders, from the {html.escape(export['base']['family'])} model): largest absolute
difference of the normalised embeddings over {export['base']['images']:,} evaluation images and {export['base']['texts']:,} texts:
image {max(export[k]['image_embedding_max_abs_diff'] for k in ('base', 'unlearned')):.1e}, text
{max(export[k]['text_embedding_max_abs_diff'] for k in ('base', 'unlearned')):.1e} (tolerance {export['tolerance']:.0e}).</p>
<h2>Pareto fronts (importance against gradient alignment, {html.escape(layers['family'])} model)</h2>
{' '.join(inline_image(f'plots/pareto/{t}.png', f'{t} tower') for t in layers['towers'])}
<p>Front: {', '.join(html.escape(n) for t in layers['front'].values() for n in t)}</p>
<h2>Step-size search (validation images)</h2>
{inline_image('plots/search.png', 'search')}
<h2>Comparison with the baselines</h2>
{markdown_table(Path('plots/compare.md').read_text()) if Path('plots/compare.md').is_file() else '<p>(no comparison: run dvc repro compare)</p>'}
{inline_image('plots/compare_scatter.png', 'utility against forget accuracy')}
{vlm_section()}
<h2>Forget-set examples</h2>
{examples(FORGET, n_examples)}
"""
    write_page(OUT, m["concept"], body, log)


if __name__ == "__main__":
    run_stage("report", main)
