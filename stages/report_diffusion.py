"""Stage `report_diffusion` (and `report_diffusion_small`, on the small twins): one
self-contained HTML page (images inlined) of the diffusion track: what the base pipeline draws,
the SLUG edit of its text encoder (`sd_unlearn`) with drawings before and after, and the
UnlearnCanvas benchmark (leaderboard with the published rows beside it, UA against IRA, the
answer-set drawings of every method).  Writes report/diffusion.html (report/diffusion_small.html),
committed with the metrics: the same bytes on every run, so no wall times (those are in runs/).

    python -m stages.report_diffusion --stage report_diffusion
"""

from __future__ import annotations

import argparse
import html
import logging
from pathlib import Path

from unlearn.cli import run_stage
from unlearn.compare import pct
from unlearn.errors import UnlearnError
from unlearn.io import read_json
from unlearn.params import stage_params
from unlearn.report import inline_image, markdown_table, write_page

log = logging.getLogger("report_diffusion")


def _rows(pairs: list[tuple[str, str, str]]) -> str:
    return "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in pairs)


def base_section(small: str) -> str:
    b, judges = read_json(f"metrics/sd_base{small}.json"), read_json("metrics/sd_judges.json")
    test = b["test"]
    weak = sorted(((c, a) for axis in ("object", "style") for c, a in test[axis]["per_class"].items()), key=lambda x: x[1])[:3]
    held = {axis: judges["held_out_real"][axis]["accuracy"] for axis in ("object", "style")}
    return f"""<h2>The base pipeline (sd_base{small})</h2>
<p>A tiny <code>diffusers.StableDiffusionPipeline</code> trained here, its text encoder the CLIP base model's text tower.
On {test['images']} drawings of the test seeds (DDIM {b['sampler']['steps']} steps, guidance {b['sampler']['guidance']}) the judges, trained
on real images only, recognise the object in {pct(test['object']['accuracy'], 1, ' %')} and the style in
{pct(test['style']['accuracy'], 1, ' %')} (on real held-out images: object {pct(held['object'], 1, ' %')}, style {pct(held['style'], 1, ' %')}).
Least recognised: {', '.join(f'{html.escape(c)} {pct(a, 1, " %")}' for c, a in weak)}.</p>
{inline_image(f'plots/sd_base{small}.png', 'what the base pipeline draws')}
"""


def unlearn_section(small: str) -> str:
    m = read_json(f"metrics/sd_unlearn{small}.json")
    names = {"UA": "UA (target not drawn)", "IRA": "IRA (other concepts, same axis)", "CRA": "CRA (the other axis)"}
    rows = [(n, pct(m["base_test"][k], 1, " %"), pct(m["test"][k], 1, " %")) for k, n in names.items()]
    rows += [(f"UA, named {name}", pct(v["base_UA"], 1, " %"), pct(v["UA"], 1, " %")) for name, v in m["other_names"].items()]
    status = "converged" if m["converged"] else "NOT converged: the figures are for the best step seen"
    return f"""<h2>SLUG on the text encoder: forgetting {html.escape(m['concept'])} ({m['kind']}; sd_unlearn{small})</h2>
<p>Edited <code>{html.escape(m['layer'])}</code> at &rho; = {m['rho']:.3g} ({status}, {m['evaluations']} validation scorings);
the patch stores {m['stored_bytes']:,} bytes; UNet and autoencoder bit-identical: {m['unet_vae_unchanged']}.
Test seeds ({m['test_sizes']['forget']} drawings naming the target, {m['test_sizes']['retain']} of the other prompts), never used by the search:</p>
<table><tr><th>test drawings</th><th>base</th><th>after SLUG</th></tr>{_rows(rows)}</table>
<p>Fr&eacute;chet distance in the judges' feature space (not comparable with published FIDs):
{m['frechet_judges']['base']} &rarr; {m['frechet_judges']['after']}.</p>
{inline_image(f'plots/sd_unlearn{small}.png', 'drawings before and after')}
"""


def canvas_section(small: str, methods: list[str]) -> str:
    stage = f"unlearncanvas{small}"
    m = read_json(f"metrics/{stage}.json")
    grids = "".join(f"<h3>{html.escape(name)}</h3>{inline_image(f'plots/{stage}/{name}.png', f'{name}: answer-set drawings')}"
                    for name in ["base", *methods])
    answers, sampler = m["answer_set"], m["sampler"]
    return f"""<h2>UnlearnCanvas ({stage})</h2>
<p>One unlearned pipeline per (method, target); the answer set: every (object, style) prompt, photos included
(seed images: {answers['seed_images']}), &times; {answers['images_per_prompt']} seeds, {answers['images']} drawings, one sampler for every method
({sampler['scheduler']} {sampler['steps']} steps, guidance {sampler['guidance']}).  Times and memory are in
<code>plots/runs/{stage}.md</code> (one run's figures, not in this page).</p>
{markdown_table(''.join(line for line in Path(f'plots/{stage}.md').read_text().splitlines(keepends=True) if not line.startswith('#')))}
{inline_image(f'plots/{stage}_scatter.png', 'UA against IRA per method')}
<p>Answer-set drawings of the first style and object target, per method (rows: prompts naming the target, then as many others).</p>
{grids}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="report_diffusion")
    args = ap.parse_args()
    if args.stage not in ("report_diffusion", "report_diffusion_small"):
        raise UnlearnError(f"--stage {args.stage!r}: use report_diffusion or report_diffusion_small")
    p = stage_params(args.stage)
    small = "_small" if args.stage.endswith("_small") else ""
    out_path = f"report/diffusion{small}.html"
    for f in (f"metrics/sd_base{small}.json", f"metrics/sd_unlearn{small}.json", f"metrics/unlearncanvas{small}.json"):
        if not Path(f).is_file():
            raise UnlearnError(f"{f} is missing; run `dvc repro {args.stage}` (it runs the diffusion stages first)")
    body = (f"<h1>unlearn: the diffusion track{' (small twins)' if small else ''}</h1>" + base_section(small) + unlearn_section(small)
            + canvas_section(small, list(p("unlearncanvas.methods"))))
    write_page(out_path, f"diffusion{small}", body, log)


if __name__ == "__main__":
    run_stage("report_diffusion", main)
