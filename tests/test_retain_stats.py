"""SLUG's shared retain statistics: computed once, saved with hashes, refused when they belong to
another model, another retain set, or were corrupted; and data-parallel under torchrun with the
single-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn.data.curate import curate_retain, table_concepts  # noqa: E402
from unlearn.data.pairs import pair_batches  # noqa: E402
from unlearn.errors import UnlearnError  # noqa: E402
from unlearn.methods.retain_stats import MOMENTS, SIDECAR, compute_retain_stats, load_retain_stats, save_retain_stats  # noqa: E402


def _stats(adapter, retain_dir: Path, batch_size: int):
    return compute_retain_stats(adapter, lambda: pair_batches(retain_dir, adapter.preprocess, adapter.tokenize, batch_size))


@pytest.fixture(scope="module")
def workspace(tiny_clip, tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("retain")
    table = table_concepts(yaml.safe_load((ROOT / "params.yaml").read_text())["concepts"])
    for name, seed in (("retain", 0), ("other_retain", 1)):
        (root / name).mkdir()
        curate_retain(tiny_world / "laion", table, 12, seed, root / name)
    tiny_clip.save(root / "model")
    return root


def test_round_trip_and_refusals(tiny_clip, workspace, tmp_path):
    stats = _stats(tiny_clip, workspace / "retain", 5)
    assert stats.n_retain == 12 and set(stats.moments) == set(tiny_clip.candidate_layers(True))
    out = tmp_path / "stats"
    out.mkdir()
    save_retain_stats(out, stats, workspace / "model", workspace / "retain" / "manifest.json", 5, tiny_clip.family)
    back, sidecar = load_retain_stats(out, tiny_clip, workspace / "model", workspace / "retain" / "manifest.json")
    assert all(torch.equal(back.gradient[n], stats.gradient[n]) for n in stats.gradient)
    assert all(torch.equal(back.moments[n], stats.moments[n]) for n in stats.moments) and sidecar["n_retain"] == 12

    with pytest.raises(UnlearnError, match="computed from another retain set"):
        load_retain_stats(out, tiny_clip, workspace / "model", workspace / "other_retain" / "manifest.json")
    side = json.loads((out / SIDECAR).read_text())
    (out / SIDECAR).write_text(json.dumps(side | {"model_sha256": "0" * 64}))
    with pytest.raises(UnlearnError, match="another model"):
        load_retain_stats(out, tiny_clip, workspace / "model")
    (out / SIDECAR).write_text(json.dumps(side))
    data = bytearray((out / MOMENTS).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (out / MOMENTS).write_bytes(bytes(data))
    with pytest.raises(UnlearnError, match=r"moments.safetensors does not match the hash in its sidecar.json .*retain_stats"):
        load_retain_stats(out, tiny_clip, workspace / "model")
    (out / MOMENTS).unlink()
    with pytest.raises(UnlearnError, match="retain statistics missing"):
        load_retain_stats(out, tiny_clip, workspace / "model")


def _torchrun(workspace: Path, out: Path, batch_size: int) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           str(workspace / "model"), str(workspace / "retain"), str(out), str(batch_size)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_give_the_single_process_statistics(tiny_clip, workspace, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: float32 kernels reduce in the same order
    try:
        single = _stats(tiny_clip, workspace / "retain", 5)   # 3 batches: 5, 5, 2 pairs
    finally:
        torch.set_num_threads(threads)
    run = _torchrun(workspace, tmp_path / "dist.safetensors", 5)
    assert run.returncode == 0, run.stderr[-2000:]
    dist = safetensors.torch.load_file(tmp_path / "dist.safetensors")
    assert int(dist["n"]) == single.n_retain
    worst = 0.0
    for prefix, tensors in (("g.", single.gradient), ("m.", single.moments)):
        for name, t in tensors.items():
            d = dist[prefix + name].to(t.dtype)
            scale = float(t.abs().max())
            if scale > 0:
                worst = max(worst, float((d - t).abs().max()) / scale)
    assert worst <= 1e-6, worst


def test_more_processes_than_batches_is_a_one_line_error(workspace, tmp_path):
    run = _torchrun(workspace, tmp_path / "x.safetensors", 64)  # one batch for two processes
    assert run.returncode != 0 and not (tmp_path / "x.safetensors").exists()
    assert "error: retain gradient: 1 of 2 processes got no batch (more processes than batches); lower gradients.nproc" in run.stderr


if __name__ == "__main__":  # a torchrun worker: the statistics of the retain set, rank 0 writes them
    from unlearn import distributed
    from unlearn.models.adapter import load

    model_dir, retain_dir, out, batch = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    distributed.init("cpu")
    torch.set_num_threads(1)
    adapter = load(model_dir)
    try:
        stats = compute_retain_stats(adapter, lambda: pair_batches(retain_dir, adapter.preprocess, adapter.tokenize, batch), progress=True)
    except UnlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if distributed.rank() == 0:
        tensors = {f"g.{k}": v for k, v in stats.gradient.items()} | {f"m.{k}": v for k, v in stats.moments.items()}
        safetensors.torch.save_file(tensors | {"n": torch.tensor(stats.n_retain)}, out)
    distributed.finish()
