"""The benches' shared helpers and decision rules (the benches themselves run for minutes to an
hour and print figures; what they decide must not drift unnoticed)."""

import json
import re
import subprocess
import sys

import pytest

from bench.tune_unlearncanvas import lr_text, merge, pick
from bench.workspace import assign, locked_out, override
from tests.conftest import ROOT


def _params():
    return {"ga": {"lr": 1.0e-5, "epochs": 10}, "unlearncanvas": {"esd": {"lr": 7.0e-5}}, "concept": "Elon Musk"}


def test_assign_sets_an_existing_dotted_key_and_refuses_a_new_one():
    params = _params()
    assign(params, "unlearncanvas.esd.lr", 1e-4)
    assign(params, "concept", "Mickey")
    assert params["unlearncanvas"]["esd"]["lr"] == 1e-4 and params["concept"] == "Mickey"
    for key in ("unlearncanvas.esd.lrr", "unlearncanvas.esdd.lr", "concept.name", "nothing"):
        with pytest.raises(KeyError):
            assign(params, key, 1)
    assert params == {**_params(), "unlearncanvas": {"esd": {"lr": 1e-4}}, "concept": "Mickey"}


def test_override_parses_values_as_dvc_exp_run_does():
    params = _params()
    assert override(params, "ga.lr=1e-4") == ("ga.lr", 1e-4)   # a float, as `dvc exp run -S` writes it, not the string "1e-4"
    assert override(params, "ga.epochs=3") == ("ga.epochs", 3)
    assert override(params, "concept=Taylor Swift") == ("concept", "Taylor Swift")
    with pytest.raises(SystemExit, match="give KEY=VALUE"):
        override(params, "ga.lr")
    with pytest.raises(SystemExit, match="params.yaml has no key ga.rate"):
        override(params, "ga.rate=1")


def _row(lr, ua, ira, cra, failed=0):
    return {"lr": lr, "UA": ua, "IRA": ira, "CRA": cra, "failed": failed}


def test_the_tuning_rule_picks_the_least_collateral_among_lrs_that_forget():
    rows = [_row(5e-5, 74.8, 87.8, 84.8), _row(7e-5, 87.6, 83.1, 79.4), _row(1e-4, 96.3, 76.7, 67.1)]
    assert pick(rows, 85.0) == 7e-5                         # 1e-4 forgets more but costs more
    assert pick(rows, 95.0) == 1e-4
    assert pick(rows, 99.0) == 1e-4                         # none reaches: the highest UA
    assert pick([*rows, _row(2e-4, 100.0, 90.0, 90.0, failed=1)], 85.0) == 7e-5   # a failed target is never picked
    assert pick([_row(1e-4, None, None, None, failed=8)], 85.0) is None


def _sweep(path, base_ira, *rows, seed=3002000):
    base = {"method": "base", "lr": None, "UA": 0.0, "IRA": base_ira, "CRA": 90.0, "failed": 0,
            "targets": [{"target": "Sepia", "UA": 0.0, "IRA": base_ira, "CRA": 90.0}]}
    path.write_text(json.dumps({"targets": ["Sepia"], "seed": seed, "min_ua": 85.0, "overrides": {},
                                "rows": [base, *({"method": "esd", **r} for r in rows)]}))
    return str(path)


def test_merged_sweeps_are_one_grid_and_refuse_another_pipeline(tmp_path):
    a = _sweep(tmp_path / "a.json", 89.9, _row(1e-4, 93.5, 85.0, 83.6), _row(2e-4, 100.0, 77.2, 59.1))
    b = _sweep(tmp_path / "b.json", 89.9, _row(8.5e-5, 86.2, 89.3, 86.7))
    got = merge([a, b], 85.0)
    assert [r["lr"] for r in got["rows"]] == [None, 8.5e-5, 1e-4, 2e-4]    # the base once, then the lrs in order
    assert got["chosen"] == {"esd": 8.5e-5}                                 # the rule over both files' lrs
    assert merge([a, b], 90.0)["chosen"] == {"esd": 1e-4}
    assert got["pipeline"] == "not recorded"                               # neither run named its pipeline
    recorded = json.loads(open(b).read()) | {"pipeline": "models/sd_base (dvc.lock 40ef7eaf)"}
    open(b, "w").write(json.dumps(recorded))
    assert merge([a, b], 85.0)["pipeline"] == ("models/sd_base (dvc.lock 40ef7eaf) (recorded by 1 of the 2 runs; "
                                               "every run's base rows agree)")
    with pytest.raises(SystemExit, match="base rows differ"):               # another pipeline drew c's base row
        merge([a, _sweep(tmp_path / "c.json", 94.0, _row(7e-5, 60.0, 90.0, 90.0))], 85.0)
    with pytest.raises(SystemExit, match="seed"):
        merge([a, _sweep(tmp_path / "d.json", 89.9, _row(7e-5, 60.0, 90.0, 90.0), seed=1)], 85.0)
    with pytest.raises(SystemExit, match="in two of the files"):
        merge([a, _sweep(tmp_path / "e.json", 89.9, _row(1e-4, 93.5, 85.0, 83.6))], 85.0)
    assert (lr_text(8.5e-5), lr_text(1e-4), lr_text(None)) == ("8.5e-05", "1e-04", "-")   # never rounded to one digit
    assert lr_text(1.25e-4) == "1.25e-04"
    other = json.loads(open(a).read()) | {"pipeline": "models/sd_base (dvc.lock 0badf00d)"}
    open(a, "w").write(json.dumps(other))
    with pytest.raises(SystemExit, match="name 2 pipelines"):                # two recorded pipelines never merge
        merge([a, b], 85.0)


def test_the_slug_search_bench_takes_configs_over_unlearncanvas_slug_keys_only():
    from bench.slug_canvas_search import parse_config

    slug = {"steps": 20, "rho_tolerance": 0.05, "stop": "first"}
    assert parse_config("committed:", slug) == ("committed", {})
    assert parse_config("fast:steps=10,rho_tolerance=0.25", slug) == ("fast", {"steps": 10, "rho_tolerance": 0.25})
    for bad in ("fast", ":steps=10", "fast:step=10", "fast:steps"):
        with pytest.raises(SystemExit, match="--config"):
            parse_config(bad, slug)


def test_the_salun_mask_bench_times_both_thresholds_and_finds_them_equal(tmp_path):
    proc = subprocess.run([sys.executable, "bench/salun_mask.py", "--sizes", "1000", "20001", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "salun_mask.json").read_text())["rows"]
    assert [r["scores"] for r in rows] == [1000, 20001] and all(r["equal"] and r["kthvalue_s"] > 0 and r["topk_s"] > 0 for r in rows)
    assert "| 20,001 |" in (tmp_path / "salun_mask.md").read_text()
    bad = subprocess.run([sys.executable, "bench/salun_mask.py", "--fraction", "0", "--out", str(tmp_path / "no")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: --fraction") and not (tmp_path / "no").exists()


def test_the_interactions_bench_refuses_a_k_outside_the_concept_list_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "bench/forget_many_interactions.py", "-k", "1", "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: -k must be between 2 and ")
    assert not (tmp_path / "out").exists()


def test_the_gpu_bench_recounts_its_stored_costs_into_the_same_regime_and_adds_the_own_moments_when_kept(tmp_path):
    """`bench/slug_gpu.py --recount` rebuilds the paper's-regime table from a stored measurement:
    with the counts that measurement used it gives back its table; with the kept moments SLUG's
    rows add the target's own moments, bounded by one more forget gradient."""
    from bench.slug_gpu import recount

    measured = json.loads((ROOT / "bench/results/slug_gpu.json").read_text())
    res, used = measured["results"], measured["counts"]
    counts = tmp_path / "slug_cost.json"
    for moments in ("shared", "kept"):
        counts.write_text(json.dumps({"summary": {"moments": moments},
                                      "concepts": [{"evals_forget": used["evals_forget"], "evals_guard": used["evals_guard"]}]}))
        copy = tmp_path / "slug_gpu.json"
        copy.write_text(json.dumps(measured))
        recount(copy, counts, 10)
        recounted = json.loads((tmp_path / "slug_gpu_recounted.json").read_text())
        again = recounted["regime"]
        # the measured per-step costs carried over untouched, the counts read from the given file
        assert {k: v for k, v in recounted["results"].items() if k in res} == res and recounted["info"]["device"] == measured["info"]["device"]
        assert (recounted["counts"]["evals_forget"], recounted["counts"]["evals_guard"], recounted["counts"]["moments"]) == (
            used["evals_forget"], used["evals_guard"], moments)
        own = res["forget_gradient_s"] if moments == "kept" else 0.0
        for new, old in zip(again, measured["regime"]):
            extra = own if new["method"].startswith("SLUG") else 0.0
            assert new["seconds"] == pytest.approx(old["seconds"] + extra, rel=1e-12), new["method"]
        assert "Recounted without a GPU" in (tmp_path / "slug_gpu_recounted.md").read_text()


def test_the_storage_bench_counts_each_methods_own_selection_on_stable_diffusion_shapes():
    """`bench/sd_storage_scale.py` builds SD v1.5 from its config on the meta device: the UNet has
    the published parameter count, ESD-x ships every cross-attention tensor of its 16 transformer
    blocks, UCE and CA their keys and values, SalUn the whole UNet, and SLUG one text-encoder
    tensor that the pipeline reads (none past the layers it reads) or the embedding's rows with
    their indices, whose bytes grow row by row."""
    import torch

    from bench.sd_storage_scale import ESD, SD, nbytes, rows_within, sd_pipeline, stored

    spec = SD["Stable Diffusion v1.5"]
    unet, clip = sd_pipeline(spec)
    assert sum(p.numel() for p in unet.parameters()) == spec["published_unet"]
    ships = stored(unet, clip, spec["layers_read"], [52, 114])
    esd, kv = ships["esd (ESD-x: every attn2 tensor)"], ships["uce, ca (attn2 to_k, to_v)"]
    assert all(".attn2." in n and n.startswith("unet.") for n in esd) and len(esd) == 16 * 5   # to_q, to_k, to_v, to_out weight and bias
    assert set(kv) < set(esd) and len(kv) == 16 * 2 and all(n.endswith(("to_k.weight", "to_v.weight")) for n in kv)
    assert len(ships["salun (the whole UNet)"]) == len(list(unet.parameters()))
    whole = [m for m in ships if m.startswith("slug (") and "whole tensor" in m]
    assert len(whole) == 2 and all(len(ships[m]) == 1 and next(iter(ships[m])).startswith("text_encoder.encoder.layers.") for m in whole)
    first_only = stored(unet, clip, 1, [])  # a pipeline that reads only the first layer's output
    assert all(".layers.0." in next(iter(first_only[m])) for m in whole) and not any("embedding" in m for m in first_only)
    rows = {n: ships[f"slug (token embedding, {n} rows)"] for n in (52, 114)}
    assert all(sorted(t) == ["text_encoder.embeddings.token_embedding.weight", "text_encoder.embeddings.token_embedding.weight:rows"] for t in rows.values())
    assert nbytes(rows[114], torch.float16) - nbytes(rows[52], torch.float16) == 62 * (768 * 2 + 8)  # half-precision rows, int64 indices
    limit = rows_within(clip, nbytes(ships[ESD], torch.float16), torch.float16)
    assert limit * (768 * 2 + 8) * 100 <= nbytes(ships[ESD], torch.float16) < (limit + 1) * (768 * 2 + 8) * 100


def test_the_cpu_fingerprint_repeats_and_tells_a_thread_count_apart():
    """`bench/cpu_bits.py`'s fingerprint is the same from call to call on one machine, and changes
    with what changes the pipeline's bits (here the thread count); the caller's threads are kept."""
    import torch

    from bench.cpu_bits import committed_base, fingerprint

    threads = torch.get_num_threads()
    two = fingerprint("unlearn-tiny-vit", False, 0, 2)
    assert fingerprint("unlearn-tiny-vit", False, 0, 2) == two
    assert fingerprint("unlearn-tiny-vit", False, 0, 1) != two
    assert torch.get_num_threads() == threads
    assert len(committed_base()) == 8  # dvc.lock's models/base hash, as the README names base models


@pytest.mark.parametrize("args, message", [
    (["bench/sd.py", "-S", "sd.base.unet.snr_gama=5"], "-S 'sd.base.unet.snr_gama=5': params.yaml has no key sd.base.unet.snr_gama"),
    (["bench/sd.py", "--keep", "{tmp}"], "--keep {tmp} exists; name a new folder"),
    (["bench/sd_unlearn.py", "--pipeline", "{tmp}"], "--pipeline {tmp} is not a saved diffusers pipeline (no model_index.json)"),
    (["bench/unknown_word.py", "--pipeline", "{tmp}"], "--pipeline {tmp} is not a saved diffusers pipeline (no model_index.json)"),
    (["bench/tune_unlearncanvas.py", "--merge", "bench/results/tune_unlearncanvas_4500.json", "-S", "unlearncanvas.esd.iterations=50"],
     "--merge re-reads finished sweeps: -S would be ignored"),
    (["bench/sd_autoencoder.py", "--variant", "steps=3000", "--variant", "step=3000"], "--variant 'step=3000': 'step=3000' is not KEY=VALUE over sd.base.vae's keys"),
    (["bench/sd_autoencoder.py", "--variant", "latent_channels"], "--variant 'latent_channels': 'latent_channels' is not KEY=VALUE"),
    (["bench/sd_autoencoder.py", "--variant", "steps=many"], "--variant 'steps=many': params.yaml sd.base.vae.steps"),
])
def test_the_diffusion_benches_refuse_bad_arguments_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, *(a.format(tmp=tmp_path) for a in args), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(message.format(tmp=tmp_path))
    assert not out.exists()


def test_a_bench_names_the_committed_output_it_read_by_its_dvc_lock_hash():
    pipeline, small = locked_out("sd_base", "models/sd_base"), locked_out("sd_base_small", "models/sd_base_small")
    assert re.fullmatch(r"[0-9a-f]{8}", pipeline) and re.fullmatch(r"[0-9a-f]{8}", small) and pipeline != small
    assert locked_out("sd_base", "models/sd_base_small") is None and locked_out("no_such_stage", "models/sd_base") is None
