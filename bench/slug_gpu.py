"""SLUG's cost in the paper's regime, measured on one GPU: ViT-B-32 at 224 px over an 8k-pair shard.

Random weights (the cost of a pass does not depend on them) and random-noise images with the
world's captions (the tokens are padded to the context length either way).  Timed with the
project's own functions, the model in float32 as the pipeline runs it:

  gradient pass       mean_gradient of L_f over the forget pairs, and of L_r over the shard
  retain statistics   compute_retain_stats over the shard (g_r and the input moments of every candidate)
  one evaluation      Evaluator.evaluate after a one-tensor edit, text tower and vision tower,
                      on a CelebA/ImageNet-shaped suite (forget images of one identity, 100
                      identities x 10 images, 1,000 classes x 5 images with the 7 simple templates)
  baselines           one epoch of GA+FT and of SalUn (mask included) at batch 32 over the forget set

From these it prints the paper's regime: SLUG's one pass + its search (the evaluation counts of
the committed default run, bench/results/slug_cost.json) against 10 epochs of each baseline,
labelled as measured per-step costs times the paper's step counts.  Writes slug_gpu.{json,md}.
`--recount` takes the per-step costs of an earlier measurement instead (no GPU needed) and the
counts of the current slug_cost.json, and writes <name>_recounted.{json,md}: the regime table
again after the search's counts changed.

    python bench/slug_gpu.py                          # on a GPU: the paper's regime
    python bench/slug_gpu.py --device cpu --arch unlearn-tiny-vit --pairs 256 --forget 64 --classes 50 --per-class 2   # smoke run
    python bench/slug_gpu.py --recount bench/results/slug_gpu.json   # the regime with today's counts, from the stored GPU costs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from unlearn.data.captions import identity_caption, object_caption  # noqa: E402
from unlearn.data.world import IDENTITIES, OBJECTS  # noqa: E402
from unlearn.eval.suite import ConceptTasks, Evaluator, Task  # noqa: E402
from unlearn.eval.zeroshot import IDENTITY_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES  # noqa: E402
from unlearn.methods.baselines import TrainConfig  # noqa: E402
from unlearn.methods.ga_ft import ga_ft  # noqa: E402
from unlearn.methods.registry import chunks  # noqa: E402
from unlearn.methods.retain_stats import compute_retain_stats  # noqa: E402
from unlearn.methods.salun import SalunConfig, saliency_mask, salun  # noqa: E402
from unlearn.methods.slug import forget_gradient  # noqa: E402
from unlearn.models import openclip  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds, peak bytes allocated on the GPU during fn or None on CPU)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return out, time.perf_counter() - t, peak


def pairs_of(adapter, n: int, size: int, device: torch.device, seed: int, caption) -> tuple[torch.Tensor, torch.Tensor]:
    """n random-noise images (already preprocessed size) and n tokenised captions, on the device."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = adapter.tokenize([caption(rng) for _ in range(n)])
    return images.to(device), tokens.to(device)


def noise_images(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def suite(adapter, root: Path, forget_n: int, identities: int, per_identity: int, classes: int, per_class: int) -> Evaluator:
    """The paper's evaluation shape: the target's images and the other identities' (one template),
    ImageNet-style classes with the 7 simple templates."""
    names = [f"person {i}" for i in range(identities)]
    forget = Task(noise_images(root / "forget", forget_n, 1), [0] * forget_n, names, IDENTITY_TEMPLATES)
    retain = Task(noise_images(root / "retain", (identities - 1) * per_identity, 2),
                  [1 + i // per_identity for i in range((identities - 1) * per_identity)], names, IDENTITY_TEMPLATES)
    utility = Task(noise_images(root / "utility", classes * per_class, 3), [i // per_class for i in range(classes * per_class)],
                   [f"thing {i}" for i in range(classes)], SIMPLE_IMAGENET_TEMPLATES)
    return Evaluator(adapter, ConceptTasks(forget, retain, utility, 0), batch_size=256)


def eval_cost(adapter, ev: Evaluator, layer: str, device: torch.device, repeats: int) -> dict:
    """Seconds of one scoring after an edit of `layer`: the target's images only (a rejected step)
    and every set (a kept step); median of `repeats` after one warm-up that fills the caches."""
    p = dict(adapter.model.named_parameters())[layer]
    base = p.detach().clone()
    ev.reset()
    ev.prepare(layer)
    out = {}
    for sets, key in ((("forget",), "forget_only_s"), (("forget", "retain", "utility"), "all_sets_s")):
        times = []
        for r in range(repeats + 1):
            with torch.no_grad():
                p.copy_(base + 1e-3 * (r + 1) * torch.randn_like(base))
            _, s, _ = timed(lambda sets=sets: ev.evaluate(layer, sets), device)
            times.append(s)
        out[key] = statistics.median(times[1:])
    with torch.no_grad():
        p.copy_(base)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--pairs", type=int, default=8192, help="retain shard pairs")
    ap.add_argument("--forget", type=int, default=1000, help="forget pairs (the baselines' epoch and the forget gradient)")
    ap.add_argument("--grad-batch", type=int, default=256, help="batch of the gradient pass and the retain statistics")
    ap.add_argument("--identities", type=int, default=100)
    ap.add_argument("--per-identity", type=int, default=10)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=5)
    ap.add_argument("--forget-images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10, help="the paper's epochs of each baseline (the regime table)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matrix products (the pipeline runs float32 without)")
    ap.add_argument("--counts", default="bench/results/slug_cost.json", help="the search's evaluation counts per concept")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--recount", type=Path, help="a slug_gpu.json: its measured per-step costs, the counts of --counts (no GPU)")
    args = ap.parse_args()
    if args.recount:
        recount(args.recount, Path(args.counts), args.epochs)
        return
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    adapter = openclip.create(args.arch, seed=0)
    adapter.model.to(device).eval()
    size = adapter.config["preprocess_cfg"]["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    n_params = sum(p.numel() for p in adapter.model.parameters())
    who = IDENTITIES[0]
    forget = pairs_of(adapter, args.forget, size, device, 10, lambda rng: identity_caption(who, rng))
    shard = pairs_of(adapter, args.pairs, size, device, 11, lambda rng: object_caption(OBJECTS[int(rng.integers(len(OBJECTS)))].name, rng))
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "arch": args.arch, "image_size": size,
            "params_M": round(n_params / 1e6, 2), "precision": "float32" + (" (TF32 matmuls)" if args.tf32 else ""),
            "retain_pairs": args.pairs, "forget_pairs": args.forget, "grad_batch": args.grad_batch, "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    print(json.dumps(info))
    res: dict = {}

    forget_gradient(adapter, chunks((forget[0][: args.grad_batch], forget[1][: args.grad_batch]), args.grad_batch))  # warm-up
    (_, _, _), res["forget_gradient_s"], res["forget_gradient_peak"] = timed(
        lambda: forget_gradient(adapter, chunks(forget, args.grad_batch)), device)
    (_, _, _), res["retain_gradient_s"], res["retain_gradient_peak"] = timed(
        lambda: forget_gradient(adapter, chunks(shard, args.grad_batch)), device)
    stats, res["retain_stats_s"], res["retain_stats_peak"] = timed(
        lambda: compute_retain_stats(adapter, lambda: chunks(shard, args.grad_batch)), device)
    res["moment_tensors"] = len(stats.moments)
    res["moment_bytes"] = sum(m.numel() * m.element_size() for m in stats.moments.values())
    print(f"forget gradient ({args.forget} pairs) {res['forget_gradient_s']:.2f} s | gradient pass over the shard ({args.pairs} pairs) "
          f"{res['retain_gradient_s']:.2f} s | retain statistics (g_r + {res['moment_tensors']} moments) {res['retain_stats_s']:.2f} s")
    del stats

    layers = adapter.candidate_layers()
    text = [n for n in layers if adapter.tower(n) == "text"]
    vision = [n for n in layers if adapter.tower(n) != "text"]
    blocks = sorted({adapter.image_block_of(n) for n in vision if adapter.image_block_of(n) is not None})
    mid = blocks[len(blocks) // 2]
    picks = {"text": next(n for n in reversed(text) if "mlp" in n and n.endswith("weight")),
             "vision": next(n for n in vision if adapter.image_block_of(n) == mid and "mlp" in n and n.endswith("weight"))}
    with tempfile.TemporaryDirectory() as tmp:
        ev = suite(adapter, Path(tmp), args.forget_images, args.identities, args.per_identity, args.classes, args.per_class)
        res["eval_sets"] = ev.sizes
        res["eval_prompts"] = {"own": args.identities * len(IDENTITY_TEMPLATES), "utility": args.classes * len(SIMPLE_IMAGENET_TEMPLATES)}
        _, res["eval_base_s"], _ = timed(lambda: ev.evaluate(reference=True), device)
        for tower, layer in picks.items():
            res[f"eval_{tower}"] = {"layer": layer, **eval_cost(adapter, ev, layer, device, args.repeats)}
            print(f"one evaluation after a {tower}-tower edit ({layer}): target's images {res[f'eval_{tower}']['forget_only_s']*1e3:.1f} ms, "
                  f"every set {res[f'eval_{tower}']['all_sets_s']*1e3:.1f} ms")
    print(f"evaluation sets {res['eval_sets']}, prompts {res['eval_prompts']}; base scoring {res['eval_base_s']:.2f} s")

    base = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}

    def restore() -> None:
        with torch.no_grad():
            for n, p in adapter.model.named_parameters():
                p.copy_(base[n])

    one = TrainConfig(lr=1e-7, epochs=1, batch_size=32)
    ga_ft(adapter, (forget[0][:64], forget[1][:64]), shard, one)  # warm-up (optimizer state, kernels)
    restore()
    _, res["ga_ft_epoch_s"], res["ga_ft_peak"] = timed(lambda: ga_ft(adapter, forget, shard, one), device)
    restore()
    scfg = SalunConfig(lr=1e-7, epochs=1, batch_size=32, mask_fraction=0.5)

    def mask():
        g_f, _, _ = forget_gradient(adapter, chunks(forget, args.grad_batch))
        return saliency_mask(g_f, scfg.mask_fraction)

    m, res["salun_mask_s"], _ = timed(mask, device)
    _, res["salun_epoch_s"], res["salun_peak"] = timed(lambda: salun(adapter, forget, shard, scfg, m), device)
    restore()
    steps = math.ceil(args.forget / 32)
    print(f"one epoch at batch 32 ({steps} steps): GA+FT {res['ga_ft_epoch_s']:.2f} s, SalUn {res['salun_epoch_s']:.2f} s "
          f"(+ mask {res['salun_mask_s']:.2f} s)")

    info["epochs"] = args.epochs
    counts = counts_of(Path(args.counts))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(report(out / "slug_gpu", info, res, counts))


def counts_of(path: Path) -> dict:
    """The search's mean scoring counts per concept (and the moments it used) in a slug_cost.json."""
    if not path.is_file():
        return {"evals_forget": 20.0, "evals_guard": 5.0, "moments": "shared", "source": f"assumed (no {path})"}
    data = json.loads(path.read_text())
    rows = data["concepts"]
    return {"evals_forget": statistics.mean(r["evals_forget"] for r in rows), "evals_guard": statistics.mean(r["evals_guard"] for r in rows),
            "moments": data["summary"].get("moments", "shared"), "source": f"{path}: mean over {len(rows)} concepts of the default run"}


def search_seconds(res: dict, counts: dict) -> float:
    """SLUG's search per concept: the counts' target and guard scorings at the measured costs (text-
    and vision-tower edits averaged), plus one base scoring."""
    ev_mean = lambda k: statistics.mean(res[f"eval_{t}"][k] for t in ("text", "vision"))  # noqa: E731
    return counts["evals_forget"] * ev_mean("forget_only_s") + counts["evals_guard"] * (ev_mean("all_sets_s") - ev_mean("forget_only_s")) + res["eval_base_s"]


def regime_of(res: dict, counts: dict, epochs: int) -> list[dict]:
    """Per concept: measured per-step costs times the step counts (the search's, the baselines' epochs).
    With the kept moments SLUG also reads the target's own moments, one forward pass over its forget
    pairs that was not measured on the GPU: counted as one more forget gradient (a forward and a
    backward), an upper bound; the table's concept moments are computed once beside the retain
    statistics and were not measured either."""
    search_s = search_seconds(res, counts)
    own = res["forget_gradient_s"] if counts.get("moments") == "kept" else 0.0
    regime = [
        {"method": "SLUG with a retain gradient per concept, as the reference computes it",
         "seconds": res["forget_gradient_s"] + res["retain_gradient_s"] + own + search_s},
        {"method": "SLUG, this project (forget gradient + search; retain statistics once)" if not own else
         "SLUG, this project (forget gradient + the target's own moments, bounded by a second forget gradient, + search; retain statistics once, "
         "the concept moments once, not measured)", "seconds": res["forget_gradient_s"] + own + search_s, "once_s": res["retain_stats_s"]},
        {"method": f"GA+FT, {epochs} epochs", "seconds": epochs * res["ga_ft_epoch_s"]},
        {"method": f"SalUn, mask + {epochs} epochs", "seconds": res["salun_mask_s"] + epochs * res["salun_epoch_s"]},
    ]
    for r in regime[2:]:
        r["seconds_with_epoch_evals"] = r["seconds"] + epochs * res["eval_base_s"]
    return regime


def report(stem: Path, info: dict, res: dict, counts: dict, note: str = "") -> str:
    """Writes <stem>.json and <stem>.md (the measured steps, then the regime table); returns the table text."""
    epochs = int(info.get("epochs", 10))
    regime = regime_of(res, counts, epochs)
    res = res | {"search_s_estimate": search_seconds(res, counts)}
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "results": res, "counts": counts, "regime": regime}, indent=2) + "\n")
    gb = lambda b: f"{b / 2**30:.1f} GB" if b else "-"  # noqa: E731
    mid = re.search(r"\.(\d+)\.", res["eval_vision"]["layer"])
    steps = math.ceil(info["forget_pairs"] / 32)
    lines = ([note, ""] if note else []) + [
             f"Measured on {info['device']}, {info['arch']} at {info['image_size']} px ({info['params_M']} M parameters), {info['precision']}, "
             f"random weights and noise images; {info['forget_pairs']} forget pairs, a {info['retain_pairs']:,}-pair retain shard.", "",
             "| step | seconds | peak GPU memory |", "|---|---|---|",
             f"| forget gradient ({info['forget_pairs']} pairs, batch {info['grad_batch']}) | {res['forget_gradient_s']:.2f} | {gb(res['forget_gradient_peak'])} |",
             f"| gradient pass over the shard ({info['retain_pairs']:,} pairs) | {res['retain_gradient_s']:.2f} | {gb(res['retain_gradient_peak'])} |",
             f"| retain statistics (g_r + {res['moment_tensors']} input moments) | {res['retain_stats_s']:.2f} | {gb(res['retain_stats_peak'])} |",
             f"| one evaluation, text-tower edit, target's images / every set | {res['eval_text']['forget_only_s']:.3f} / {res['eval_text']['all_sets_s']:.3f} | |",
             f"| one evaluation, vision-tower edit (block {mid.group(1) if mid else '?'}), target's images / every set | {res['eval_vision']['forget_only_s']:.3f} / "
             f"{res['eval_vision']['all_sets_s']:.3f} | |",
             f"| base scoring (every set, nothing cached) | {res['eval_base_s']:.2f} | |",
             f"| GA+FT, one epoch at batch 32 ({steps} steps) | {res['ga_ft_epoch_s']:.2f} | {gb(res['ga_ft_peak'])} |",
             f"| SalUn, mask | {res['salun_mask_s']:.2f} | |",
             f"| SalUn, one epoch at batch 32 ({steps} steps) | {res['salun_epoch_s']:.2f} | {gb(res['salun_peak'])} |", "",
             f"The paper's regime, **measured per-step costs times the paper's step counts** (search: {counts['evals_forget']:.1f} target "
             f"scorings and {counts['evals_guard']:.1f} guard scorings per concept, {counts.get('moments', 'shared')} moments, {counts['source']}; "
             "the baselines' per-epoch evaluation counted apart):", "", "| method | seconds per concept | with a base-sized evaluation per epoch |", "|---|---|---|"]
    for r in regime:
        once = f" (+ {r['once_s']:.1f} once)" if "once_s" in r else ""
        lines.append(f"| {r['method']} | {r['seconds']:.1f}{once} | " + (f"{r['seconds_with_epoch_evals']:.1f} |" if "seconds_with_epoch_evals" in r else "|"))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def recount(measured: Path, counts_path: Path, epochs: int) -> None:
    """The regime table of an earlier measurement (its per-step costs) with the counts of `counts_path`."""
    data = json.loads(measured.read_text())
    info = data["info"] | {"epochs": data["info"].get("epochs", epochs)}
    counts = counts_of(counts_path)
    note = (f"Recounted without a GPU: the per-step costs are those measured in {measured} (on {info['device']}); the step counts are "
            f"today's ({counts['source']}; the measurement used {data['counts']['evals_forget']:.1f} target and {data['counts']['evals_guard']:.1f} "
            "guard scorings).")
    print(report(measured.with_name(measured.stem + "_recounted"), info, dict(data["results"]), counts, note))


if __name__ == "__main__":
    main()
