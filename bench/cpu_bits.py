"""Will this machine reproduce the committed bytes?  A fingerprint of the CPU's float kernels, in seconds.

The pipeline is deterministic on one CPU type, but its float bits depend on the CPU's kernels
(docs/gate.md "A note on the figures"): the Intel Xeons behind the committed outputs until 2026-12-05
gave the base model `f9c8f168`, the AMD EPYCs `b4eaf17b`, and CI fails on a machine whose bits
are not the committed ones.  Finding that out by `dvc repro` takes 15-25 minutes; this takes a
few seconds: it trains the default tiny CLIP (`model.arch`, the base model's own code and seed)
for a few steps on fixed random pairs, on the thread count a stage would use here, and hashes its weights, the same kernels the base model's
training runs (matrix products, the patch convolution, the attention, AdamW).

Known fingerprints are in bench/results/cpu_bits.json, each with the base model (`dvc.lock`'s
hash of models/base) a full run gave on that machine.  The bench prints whether this machine's
fingerprint is known and, if so, whether its base model is the committed one.

    python bench/cpu_bits.py                      # the fingerprint and the verdict (exit 0; 3 when it predicts other bytes)
    python bench/cpu_bits.py --record "AMD EPYC"  # after a `dvc repro` on this machine: add it, with models/base's hash
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.workspace import locked_out  # noqa: E402
from unlearn.models import openclip as oc  # noqa: E402
from unlearn.models.train import TrainConfig, train_contrastive  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402
from unlearn.runs import cpu_model, torch_kernels  # noqa: E402

KNOWN = ROOT / "bench/results/cpu_bits.json"
PAIRS, STEPS = 64, 4


def fingerprint(arch: str, quick_gelu: bool, seed: int, threads: int) -> str:
    """The md5 of the tiny CLIP's weights after STEPS AdamW steps on fixed random pairs (on
    `threads` torch threads; the caller's count is restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _trained_hash(arch, quick_gelu, seed)
    finally:
        torch.set_num_threads(before)


def _trained_hash(arch: str, quick_gelu: bool, seed: int) -> str:
    torch.manual_seed(seed)
    adapter = oc.create(arch, quick_gelu=quick_gelu, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    size = adapter.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(PAIRS, 3, size, size, generator=gen)
    tokens = adapter.tokenize([f"A photo of person {i} holding object {i % 7}." for i in range(PAIRS)])
    train_contrastive(adapter, images, tokens, TrainConfig(epochs=STEPS, batch_size=PAIRS, warmup_steps=1, seed=seed))
    h = hashlib.md5()
    for name, p in sorted(adapter.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def committed_base() -> str | None:
    """dvc.lock's hash of models/base (the base_model stage's output)."""
    return locked_out("base_model", "models/base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", metavar="NAME", help="add this machine's fingerprint with the base model in the workspace (after a dvc repro here)")
    args = ap.parse_args()
    params = load_yaml(ROOT / "params.yaml")
    m = params["model"]
    threads = torch.get_num_threads()  # what a stage on this machine runs with (torch's default, OMP_NUM_THREADS): the bits depend on it
    fp = fingerprint(str(m["arch"]), bool(m["quick_gelu"]), int(m["train"]["seed"]), threads)
    known = json.loads(KNOWN.read_text()) if KNOWN.is_file() else {}
    committed = committed_base()
    print(f"CPU: {cpu_model()}; torch {torch_kernels()}")
    print(f"fingerprint: {fp} ({m['arch']}, {STEPS} steps on {PAIRS} random pairs, {threads} threads)")
    if args.record:
        base = ROOT / "models/base"
        if not base.is_dir():
            raise SystemExit("error: models/base is missing; run `dvc repro base_model` on this machine first, then --record")
        from dvc.repo import Repo

        status = Repo(str(ROOT)).status(targets=["base_model"])
        if status:
            raise SystemExit(f"error: models/base does not match dvc.lock ({status}); run `dvc repro base_model` here first, then --record")
        known[fp] = {"base_model": committed, "cpu": args.record, "kernels": torch_kernels(), "date": date.today().isoformat()}
        KNOWN.parent.mkdir(parents=True, exist_ok=True)
        KNOWN.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        print(f"recorded: {fp} -> base model {committed} ({args.record}) in {KNOWN.relative_to(ROOT)}")
        return
    print(f"committed base model (dvc.lock): {committed}")
    if fp not in known:
        print("verdict: unknown fingerprint; `dvc repro` will tell (compare models/base with dvc.lock), then record it with --record")
        return
    entry = known[fp]
    if entry["base_model"] == committed:
        print(f"verdict: this machine gave {entry['base_model']} before ({entry['cpu']}, {entry['date']}): it should reproduce the committed bytes")
        return
    print(f"verdict: this machine gives {entry['base_model']} ({entry['cpu']}, {entry['date']}), not the committed {committed}: "
          "a dvc repro here writes other bytes and CI here fails its clean-status check until they are regenerated and committed")
    sys.exit(3)


if __name__ == "__main__":
    main()
