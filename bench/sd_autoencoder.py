"""The autoencoder's ceiling against its configuration: trains `sd.base.vae` with overrides on the
canvas `sd_base` trains on (the same images, seed and loss), then asks the judges what they
recognise in its reconstructions of held-out images (the real canvas `data/eval/canvas` and
held-out renders), per style, with the PSNR and the training time.  No UNet is trained: this is
the ceiling the pipeline's drawings sit under (docs/sd.md, "What the default pipeline draws").

Needs `dvc repro sd_judges` (models/sd_judges, data/eval).  Each --variant is a comma-separated
list of `sd.base.vae` keys (`steps=3000,latent_channels=8`); the empty string is the committed
config.  Writes bench/results/sd_autoencoder_<tag>.{json,md}.

    python bench/sd_autoencoder.py --variant "" --variant steps=3000 --variant latent_channels=8 --tag amd
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.workspace import assign  # noqa: E402
from unlearn.errors import UnlearnError  # noqa: E402
from unlearn.params import as_config, load_yaml, parse_yaml  # noqa: E402
from unlearn.sd.data import HELD_STREAM, TRAIN_STREAM, WORLD, canvas_images, render_images  # noqa: E402
from unlearn.sd.evaluate import judge_images  # noqa: E402
from unlearn.sd.judges import load_judges  # noqa: E402
from unlearn.sd.model import VaeConfig  # noqa: E402
from unlearn.sd.train import train_vae  # noqa: E402


def variant(base: dict, text: str) -> tuple[str, dict]:
    """('steps=3000', the committed `sd.base.vae` with steps 3000); ('committed', it as it is) for ''."""
    cfg = dict(base)
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise KeyError(key)
            assign(cfg, key, parse_yaml(value))  # the benches' -S mechanism: only a key the config has
        except KeyError:
            sys.exit(f"--variant {text!r}: {item!r} is not KEY=VALUE over sd.base.vae's keys ({', '.join(cfg)})")
    try:
        as_config(VaeConfig, cfg, "sd.base.vae")
    except UnlearnError as e:  # a value of the wrong type or out of bounds: refused before any work, as a bad key is
        sys.exit(f"--variant {text!r}: {e}")
    return (text or "committed"), cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", default=None, help="sd.base.vae overrides, KEY=VALUE[,KEY=VALUE]; repeatable")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    params = load_yaml(ROOT / "params.yaml")
    sd = params["sd"]
    size, seed, per_cell = int(sd["image_size"]), int(params["data"]["synthetic"]["seed"]), int(sd["base"]["images_per_cell"])
    variants = [variant(sd["base"]["vae"], v) for v in (args.variant or [""])]  # every variant checked before any work
    if not (ROOT / "models/sd_judges").exists() or not (ROOT / "data/eval/canvas").exists():
        sys.exit("missing models/sd_judges or data/eval/canvas: run `dvc repro sd_judges` first")
    torch.set_num_threads(args.threads)
    judges = load_judges(ROOT / "models/sd_judges")
    x = render_images(seed, TRAIN_STREAM, per_cell, size).as_float()
    held = {"canvas": canvas_images(ROOT / "data/eval/canvas", size, WORLD), "rendered": render_images(seed, HELD_STREAM, 2, size)}
    rows = []
    for name, cfg in variants:
        t0 = time.perf_counter()
        vae, losses = train_vae(x, as_config(VaeConfig, cfg, "sd.base.vae"), seed, progress=name)
        row = {"variant": name, "config": cfg, "train_s": round(time.perf_counter() - t0, 1),
               "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 5)}
        for where, images in held.items():
            xr = images.as_float()
            with torch.no_grad():
                rec = torch.cat([vae.decode(vae.encode(xr[s : s + 256]).latent_dist.mode()).sample for s in range(0, len(images), 256)])
            judged = judge_images(judges, rec, images.objects, images.styles)
            row[where] = {"psnr_db": round(float(10 * torch.log10(4.0 / ((rec.clamp(-1, 1) - xr) ** 2).mean())), 2),
                          "object": judged["object"]["accuracy"], "style": judged["style"]["accuracy"],
                          "per_style": judged["style"]["per_class"]}
        rows.append(row)
        print(f"{name}: {row['train_s']} s; canvas PSNR {row['canvas']['psnr_db']} dB, object {row['canvas']['object']:.3f}, "
              f"style {row['canvas']['style']:.3f}; " + ", ".join(f"{k} {v:.2f}" for k, v in row["canvas"]["per_style"].items()), flush=True)
    out = Path(args.out) / f"sd_autoencoder{'_' + args.tag if args.tag else ''}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1) + "\n")
    styles = list(rows[0]["canvas"]["per_style"])
    lines = [f"# The autoencoder's ceiling ({args.threads} threads; judges on reconstructions of held-out images, %)", "",
             "| variant | train s | where | PSNR dB | object | style | " + " | ".join(styles) + " |",
             "|---" * (6 + len(styles)) + "|"]
    for r in rows:
        for where in held:
            c = r[where]
            lines.append(f"| {r['variant']} | {r['train_s']} | {where} | {c['psnr_db']} | {100 * c['object']:.1f} | {100 * c['style']:.1f} | "
                         + " | ".join(f"{100 * c['per_style'][s]:.0f}" for s in styles) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
