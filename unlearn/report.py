"""The report page's parts (stage `report`): images inlined as data URIs, a markdown table as
HTML, a strip of training examples."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image, ImageDraw

from unlearn.data.pairs import decode
from unlearn.data.shards import iter_samples
from unlearn.errors import UnlearnError


def write_page(path: str | Path, title: str, body: str, log) -> None:
    """The report's HTML page around `body` (one style for every page), written atomically."""
    from unlearn.io import atomic_outputs

    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>unlearn report: {html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}img{{max-width:100%}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>{body}</body></html>
"""
    with atomic_outputs(path) as (out,):
        out.write_text(page)
    log.info("wrote %s (%d kB)", path, len(page) // 1024)


def inline_image(path: str | Path, alt: str) -> str:
    """An <img> with the PNG inlined; a missing file is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise UnlearnError(f"{p} is missing; run `dvc repro` before the report")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'


def examples(shard_dir: str | Path, n: int) -> str:
    """The first `n` samples of a shard folder as one inline PNG strip, captions under each."""
    tiles = []
    for sample in iter_samples(shard_dir):
        img = decode(sample, shard_dir).resize((128, 128))
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


def markdown_table(markdown: str) -> str:
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
