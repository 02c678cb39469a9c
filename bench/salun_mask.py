"""SalUn's global threshold: selection (`kthvalue`, what `saliency_threshold` does) against the
sort it replaced (`topk(k, sorted=True).values[-1]`), on |N(0, 1)| scores of several sizes.

Both SalUns (CLIP and diffusion) take the k-th largest |gradient| over every tensor of the model
(k = half the coordinates by default): 151 M scores for ViT-B-32, 860 M for Stable Diffusion's
UNet.  Prints, per size, both times and whether the values agree; writes
bench/results/salun_mask.{json,md}.

    python bench/salun_mask.py                        # 10 M and 40 M scores, 2 threads
    python bench/salun_mask.py --sizes 151000000      # ViT-B-32's count (about 1.2 GB of float32 twice)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from unlearn.methods.salun import saliency_threshold  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 40_000_000], help="scores per run")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if not 0 < args.fraction <= 1 or min(args.sizes) < 1 or args.threads < 1:
        sys.exit("error: --fraction must be in (0, 1], --sizes and --threads >= 1")
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        # two tensors, as a model's gradients are several
        scores = {"a": torch.randn(n // 3, generator=torch.Generator().manual_seed(0)),
                  "b": torch.randn(n - n // 3, generator=torch.Generator().manual_seed(1))}
        t = time.perf_counter()
        selected = saliency_threshold(scores, args.fraction)
        t_select = time.perf_counter() - t
        t = time.perf_counter()
        flat = torch.cat([g.abs().flatten() for g in scores.values()])
        k = max(1, int(round(args.fraction * flat.numel())))
        sorted_ = torch.topk(flat, k, sorted=True).values[-1].item()
        t_sort = time.perf_counter() - t
        rows.append({"scores": n, "kthvalue_s": round(t_select, 6), "topk_s": round(t_sort, 6), "speedup": round(t_sort / t_select, 2),
                     "equal": selected == sorted_})
        print(f"{n:>13,} scores: kthvalue {t_select:.2f} s, topk {t_sort:.2f} s ({t_sort / t_select:.1f}x), same value: {selected == sorted_}")
        if selected != sorted_:
            sys.exit(f"error: the two thresholds differ at {n} scores ({selected} against {sorted_})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"fraction": args.fraction, "threads": args.threads, "device": "cpu", "rows": rows}
    (out / "salun_mask.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"SalUn's threshold over |N(0,1)| scores, fraction {args.fraction}, CPU, {args.threads} threads (bench/salun_mask.py)", "",
             "| scores | kthvalue (saliency_threshold), s | topk sorted, s | speed-up | same value |", "|---|---|---|---|---|"]
    lines += [f"| {r['scores']:,} | {r['kthvalue_s']:.2f} | {r['topk_s']:.2f} | {r['speedup']}x | {r['equal']} |" for r in rows]
    (out / "salun_mask.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
