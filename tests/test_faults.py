"""Faults and hostile input, each with its exact outcome: captions as the web writes them, broken
images and shards, out-of-range params, a full disk, a writer killed outright, corrupted files.
The pipeline-level rows (a stage killed under `dvc repro`, queued experiments at once) are in
tests/test_pipeline.py; bench/faults.py runs the matrix and prints it."""

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import yaml
from PIL import Image

from tests.conftest import ROOT
from unlearn.cli import disk_full, run_stage
from unlearn.data.curate import Concept, curate_forget, curate_retain
from unlearn.data.images import image_fault, read_image
from unlearn.data.pairs import decode
from unlearn.data.shards import Sample, decode_caption, iter_shard
from unlearn.errors import UnlearnError
from unlearn.io import atomic_outputs, sweep_debris, write_json
from unlearn.methods.registry import methods
from unlearn.methods.slug import PATCH_WEIGHTS, read_patch, save_patch
from unlearn.params import load_yaml
from unlearn.ranges import RANGES, check_ranges

BEYONCE = Concept("Beyoncé", "identity")
ONEAL = Concept("Shaquille O'Neal", "identity", ("O'Neal",))
MUSK = Concept("Elon Musk", "identity", ("Musk",), ("Musk ox",))
LONG = "lorem ipsum " * 833  # 9,996 characters


# ---------------------------------------------------------------- captions as the web writes them

@pytest.mark.parametrize(("concept", "caption", "rule"), [
    (BEYONCE, "Beyoncé live in Paris", "exact"),
    (BEYONCE, "BEYONCÉ", "exact"),                                 # all caps
    (BEYONCE, "beyonce concert", "accents"),                        # unaccented
    (BEYONCE, "Beyonce\u0301 on stage", "normalised"),              # decomposed: e + combining acute
    (BEYONCE, "Beyonc&eacute; tour 2016", "normalised"),            # an HTML entity
    (BEYONCE, "ＢＥＹＯＮＣＥ́", "normalised"),                        # full-width letters
    (ONEAL, "O’Neal dunks", "normalised"),                          # typographic apostrophe
    (ONEAL, "O&#39;Neal at the game", "normalised"),
    (ONEAL, "Shaquille O\u2019Neal \u2014 Lakers", "normalised"),
    (MUSK, "Elon Musk &amp; friends", "exact"),
    (MUSK, "Elon\u00a0Musk", "exact"),                              # a no-break space is a space
    (MUSK, "Elon\u2009Musk", "exact"),                              # so is a thin space
    (Concept("Taylor Swift", "identity"), "Taylor\u200bSwift", "normalised"),  # a zero-width space separates too
    (MUSK, "https://example.org/photos/elon-musk-2019.jpg", "url"),  # named only inside a URL
    (MUSK, "Elon Musk https://example.org/a.jpg", "exact"),
    (MUSK, LONG + " Elon Musk", "exact"),                           # a 10,000-character caption
    (MUSK, "Ĕlon Mŭsk", "accents"),
])
def test_real_spellings_are_matched_and_the_rule_is_named(concept, caption, rule):
    m = concept.match(caption)
    assert m is not None and m.rule == rule


@pytest.mark.parametrize(("concept", "caption"), [
    (MUSK, ""),                          # an empty caption
    (MUSK, "   "),
    (MUSK, LONG),
    (MUSK, "Elon Muskrat"),              # a longer word, after folding too
    (MUSK, "a Musk ox, https://example.org/musk-ox.jpg"),
    (BEYONCE, "Beyoncéa"),
    (ONEAL, "ONeals"),
    (MUSK, "#ElonMusk"), (MUSK, "@elonmusk"), (MUSK, "ElonMusk"),  # joined forms: off by default
])
def test_what_is_not_a_mention_stays_unmatched(concept, caption):
    assert concept.match(caption) is None


@pytest.mark.parametrize("caption", ["#ElonMusk", "@elonmusk", "ElonMusk tweets", "#ÉLONMUSK", "follow @elon_musk"])
def test_joined_forms_count_only_when_switched_on(caption):
    m = MUSK.match(caption, joined=True)
    assert m is not None and m.phrase == "Elon Musk"
    assert m.rule == ("exact" if "_" in caption else "joined")  # elon_musk is an ordinary separator
    assert MUSK.mentioned_in(caption) is (m.rule == "exact")
    assert MUSK.match("#muskox", joined=True) is None  # an excluded phrase is excluded joined too


def _shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16), colour).save(buf, "JPEG")
    return buf.getvalue()


def _png16(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, np.uint16)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def hostile(tmp_path) -> Path:
    """One shard of real-looking faults: spellings, bytes that are not UTF-8, broken images, a key twice."""
    jpg = _jpeg()
    rows = [
        ("a", "Beyoncé live".encode(), jpg), ("b", b"beyonce concert", jpg), ("c", "Beyonce\u0301 tour".encode(), jpg),
        ("d", b"Beyonc&eacute; 2016", jpg), ("e", b"#Beyonce fans", jpg), ("f", b"https://x.org/beyonce.jpg", jpg),
        ("g", b"Beyonc\xe9 \xff live", jpg),                       # Latin-1 bytes: not UTF-8
        ("h", b"", jpg), ("i", b"a tree in the park", jpg),
        ("j", b"Beyonce at the gala", b""),                       # a zero-byte image
        ("k", b"Beyonce, truncated", jpg[: len(jpg) // 2]),       # a truncated JPEG
        ("l", b"Beyonce in CMYK", _jpeg((0, 255, 0, 0), "CMYK")),
        ("m", b"Beyonce in grey", _jpeg(128, "L")),
        ("n", b"Beyonce in 16 bits", _png16(40000)),
        ("o", b"a car", jpg), ("o", b"Beyonce, the duplicate", jpg),  # key o twice: the first copy stays
        ("p", b"BeyonceKnowles", jpg), ("q", b"#BeyonceKnowles", jpg),
    ]
    members = []
    for key, caption, image in rows:
        members += [(f"{key}.jpg", image), (f"{key}.txt", caption)]
    (tmp_path / "laion").mkdir()
    _shard(tmp_path / "laion" / "00000.tar", members)
    return tmp_path


def test_curation_of_hostile_captions_counts_every_rule_and_skips_broken_images_by_key(hostile):
    out = hostile / "forget"
    out.mkdir()
    concept = Concept("Beyoncé", "identity", ("Beyonce Knowles",))
    f = curate_forget(hostile / "laion", concept, 100, 0, out)
    m = f["match"]
    assert m["captions"] == 17 and m["empty"] == 1 and m["not_utf8"] == 1
    assert m["rules"] == {"exact": 2, "normalised": 2, "accents": 5, "url": 1}  # g, read as cp1252, is exact
    assert m["phrases"] == {"Beyoncé": 10, "Beyonce Knowles": 0}
    assert m["joined_only"] == 2 and m["joined"] is False
    assert set(m["skipped_images"]) == {"00000.tar:j", "00000.tar:k"} and "zero-byte" in m["skipped_images"]["00000.tar:j"]
    assert m["duplicate_keys"] == ["00000.tar:o"]
    kept = {row["key"] for row in f["samples"]}
    assert kept == {"a", "b", "c", "d", "e", "f", "g", "l", "m", "n"}
    with_joined = hostile / "forget_joined"
    with_joined.mkdir()
    j = curate_forget(hostile / "laion", concept, 100, 0, with_joined, joined=True)["match"]
    assert j["rules"]["joined"] == 2 and j["phrases"]["Beyonce Knowles"] == 2 and j["joined_only"] == 0


def test_the_retain_set_follows_the_joined_switch_and_counts(hostile):
    table = [Concept("Beyoncé", "identity", ("Beyonce Knowles",))]
    (hostile / "r0").mkdir()
    (hostile / "r1").mkdir()
    off = curate_retain(hostile / "laion", table, 100, 0, hostile / "r0")
    on = curate_retain(hostile / "laion", table, 100, 0, hostile / "r1", joined=True)
    assert {r["key"] for r in off["samples"]} == {"h", "i", "o", "p", "q"} and off["match"]["joined_only"] == 2  # g is Beyoncé
    assert {r["key"] for r in on["samples"]} == {"h", "i", "o"}


def test_bytes_that_are_not_utf8_are_read_as_windows_1252_not_fatal(hostile):
    samples = {s.key: s for s in iter_shard(hostile / "laion" / "00000.tar")}
    assert (samples["g"].caption, samples["g"].encoding) == ("Beyoncé ÿ live", "cp1252")
    assert (samples["a"].encoding, samples["o"].caption) == ("utf-8", "a car")
    assert decode_caption(b"O\x92Neal") == ("O\u2019Neal", "cp1252")
    assert decode_caption(b"O\x92Neal \x81") == ("O\x92Neal \x81", "latin-1")  # 0x81 is no cp1252 character


def test_images_of_every_mode_decode_to_rgb_and_16_bits_keep_their_level():
    assert read_image(_jpeg((0, 255, 0, 0), "CMYK")).mode == "RGB"
    assert read_image(_jpeg(128, "L")).getpixel((0, 0))[0] in range(126, 131)
    grey = np.asarray(read_image(_png16(40000)))
    assert grey.shape == (16, 16, 3) and np.all(grey == round(40000 * 255 / 65535))  # Pillow alone: 255 (white)
    for bad in (b"", _jpeg()[:200], b"not an image"):
        assert image_fault(bad) is not None
    with pytest.raises(UnlearnError, match=r"^sample x in w is not a readable image \(zero-byte image\); re-create w") as e:
        decode(Sample("x", b"", "c", {}), "w")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- params out of range

@pytest.mark.parametrize(("key", "value", "message"), [
    ("curate.retain_size", 0, r"curate.retain_size is 0; it must be an integer >= 1"),
    ("curate.forget_max", 0, r"curate.forget_max is 0; it must be an integer >= 1"),
    ("gradients.batch_size", 0, r"gradients.batch_size is 0; it must be an integer >= 1"),
    ("gradients.batch_size", 16.5, r"gradients.batch_size is 16.5; it must be an integer >= 1"),
    ("eval.split.val_fraction", 0, r"eval.split.val_fraction is 0; it must be a number in \(0, 1\)"),
    ("eval.split.val_fraction", 1, r"eval.split.val_fraction is 1; it must be a number in \(0, 1\)"),
    ("slug.search.rho_start", 0, r"slug.search.rho_start is 0; it must be a number > 0"),
    ("slug.search.rho_start", -0.1, r"slug.search.rho_start is -0.1; it must be a number > 0"),
    ("slug.search.damping", -0.01, r"slug.search.damping is -0.01; it must be a number > 0"),
    ("vlm.search.damping", -1, r"vlm.search.damping is -1; it must be a number > 0"),
    ("sd.search.forget_rate", 1.5, r"sd.search.forget_rate is 1.5; it must be a number in \[0, 1\]"),
    ("slug.search.forget_top5", "0.05", r"slug.search.forget_top5 is '0.05'; it must be a number in \[0, 1\]"),
    ("slug.search.rho_max", float("nan"), r"slug.search.rho_max is nan; it must be a number > 0"),
    ("slug.search.rho_max", 0.05, r"slug.search.rho_max \(0.05\) is below slug.search.rho_start \(0.1\)"),
])
def test_a_param_out_of_range_is_one_line_naming_the_key_and_the_range(key, value, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    check_ranges(params)  # the committed defaults are in range
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(UnlearnError, match="^params.yaml " + message) as e:
        check_ranges(params)
    assert "\n" not in str(e.value)


def test_every_ranged_key_is_a_param_the_check_stage_declares():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["check"]["params"]
    assert {r.key for r in RANGES} <= set(spec)


@pytest.mark.parametrize("section, leaf, value, message", [
    ("eval.split", "val_fraction", 1, "error: params.yaml eval.split.val_fraction is 1; it must be a number in (0, 1)"),
    ("slug.search", "fallback", "none", "error: slug.search.fallback is 'none'; use forget"),
    ("slug.search", "widen_to", -1, "error: params.yaml slug.search.widen_to is -1; it must be a number >= 0"),
])
def test_the_check_stage_stops_on_a_bad_param_and_keeps_its_stamp(tmp_path, section, leaf, value, message):
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "checked.json").write_text('{"earlier": true}\n')
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    node = params
    for part in section.split("."):
        node = node[part]
    assert leaf in node  # the key exists: the test changes its value
    node[leaf] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.check"], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert (tmp_path / "data" / "checked.json").read_text() == '{"earlier": true}\n'


@pytest.mark.parametrize("method, key, value, bound", [
    ("ga", "lr", 0.0, "> 0"), ("ga", "lr", -1e-5, "> 0"), ("ga_ft", "epochs", 0, "> 0"), ("ft", "batch_size", 0, "> 0"),
    ("salun", "lr", float("inf"), "> 0"), ("salun", "alpha", -1.0, ">= 0"), ("ga_ft", "weight_decay", -0.1, ">= 0"),
    ("ssd", "alpha", 0.0, "> 0"), ("ssd", "dampening", -1.0, ">= 0"),
])
def test_a_baselines_number_out_of_range_is_one_line_naming_the_key(method, key, value, bound):
    """lr 0 or epochs 0 would train nothing and report the base model as the method's result."""
    params = load_yaml(ROOT / "params.yaml")
    build = methods()[method].config
    build(params[method], method)  # the committed section builds
    with pytest.raises(UnlearnError, match=rf"^params.yaml {method}\.{key} is {re.escape(repr(value))}; it must be a number {bound}$"):
        build({**params[method], key: value}, method)


def _declared_bounds():
    """(registry, method, field, bound) for every bound a registered method's config declares."""
    from unlearn.sd.methods import methods as sd_methods

    for registry, found, section in (("clip", methods(), ""), ("sd", sd_methods(), "unlearncanvas.")):
        for name, method in found.items():
            params = load_yaml(ROOT / "params.yaml")
            values = params["unlearncanvas"][name] if registry == "sd" else params[name]
            cfg = method.config(dict(values), f"{section}{name}")
            for field, bound in getattr(type(cfg), "RANGES", {}).items():
                yield registry, name, field, bound


OUT_OF = {"> 0": [0, -1], ">= 0": [-1], "(0, 1]": [0, 1.5], "[0, 1]": [-0.1, 1.5], "[0, 1)": [-0.1, 1]}


@pytest.mark.parametrize("registry, method, field, bound", list(_declared_bounds()))
def test_every_declared_bound_of_every_method_is_enforced(registry, method, field, bound):
    """The contract over both registries: each bound a config declares (`RANGES`) stops a value
    outside it, NaN and inf, with one line naming the params key; the committed value passes."""
    from unlearn.sd.methods import methods as sd_methods

    params = load_yaml(ROOT / "params.yaml")
    section, key = (params["unlearncanvas"][method], f"unlearncanvas.{method}") if registry == "sd" else (params[method], method)
    build = (sd_methods() if registry == "sd" else methods())[method].config
    committed = build(dict(section), key)
    integer = isinstance(getattr(committed, field), int)
    for value in OUT_OF[bound] + ([] if integer else [float("nan"), float("inf")]):
        with pytest.raises(UnlearnError, match=rf"^params.yaml {re.escape(key)}\.{field} is {re.escape(repr(value))}; it must be a number") as e:
            build({**section, field: value}, key)
        assert "\n" not in str(e.value)


def test_the_declared_bounds_cover_what_the_methods_cannot_run_without():
    """No learning rate, iteration count or batch size of any registered method is left unbounded."""
    bounded = {(registry, method, field) for registry, method, field, _ in _declared_bounds()}
    from unlearn.sd.methods import methods as sd_methods

    for registry, found in (("clip", methods()), ("sd", sd_methods())):
        for name in found:
            if name == "slug":
                continue  # the CLIP SLUG's numbers are the check stage's (unlearn/ranges.py RANGES)
            params = load_yaml(ROOT / "params.yaml")
            values = params["unlearncanvas"][name] if registry == "sd" else params[name]
            for field in ("lr", "epochs", "iterations", "batch_size"):
                if field in values:
                    assert (registry, name, field) in bounded, (registry, name, field)


def test_the_comparison_stage_refuses_a_bad_number_before_any_work(tmp_path):
    """`dvc exp run -S ga.lr=0` reruns compare_run@ga alone: it stops at once (no model, data or
    metrics needed, so none are read), with one line and its earlier metrics untouched."""
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["ga"]["lr"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    earlier = tmp_path / "metrics" / "compare" / "ga.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"earlier": true}\n')
    proc = subprocess.run([sys.executable, "-m", "stages.compare_run", "ga"], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: params.yaml ga.lr is 0; it must be a number > 0"
    assert earlier.read_text() == '{"earlier": true}\n'


# ---------------------------------------------------------------- a full disk

@pytest.mark.parametrize("how", ["os", "devfull", "wrapped"])
def test_a_full_disk_is_one_line_and_leaves_earlier_outputs(tmp_path, capsys, how):
    out = tmp_path / "m.json"
    write_json(out, {"earlier": 1})

    def main():
        with atomic_outputs(out, tmp_path / "dir") as (m, d):
            (d / "half").write_bytes(b"x" * 100)
            if how == "os":
                raise OSError(errno.ENOSPC, "No space left on device", str(m))
            if how == "devfull":  # the OS's own answer: /dev/full fails every write with ENOSPC
                with open("/dev/full", "w") as f:
                    f.write("x" * 10_000)
                    f.flush()
            try:  # torch and safetensors wrap the OS error in their own
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e

    with pytest.raises(SystemExit) as e:
        run_stage("faulty", main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: the disk is full")
    assert "free space and rerun stage faulty" in err[0]
    assert json.loads(out.read_text()) == {"earlier": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_other_errors_are_not_taken_for_a_full_disk():
    assert not disk_full(OSError(errno.EACCES, "Permission denied")) and not disk_full(ValueError("x"))
    assert disk_full(RuntimeError("I/O error: Disk quota exceeded (os error 122)"))


# ---------------------------------------------------------------- a writer killed outright

KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from unlearn.io import atomic_outputs, write_json
    at = int(sys.argv[2])  # kill at this rename (0: while writing, before any rename)
    renames = []
    real = Path.rename
    def rename(self, target):
        if len(renames) == at - 1 and at > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        renames.append(target)
        return real(self, target)
    Path.rename = rename
    root = Path(sys.argv[1])
    with atomic_outputs(root / "a.json", root / "b") as (a, b):
        write_json(a, {"new": 1})
        (b / "x").write_text("new")
        if at == 0:
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("at", [0, 1, 2, 3, 4])
def test_a_writer_killed_with_sigkill_loses_nothing(tmp_path, at):
    """Killed while writing (0), or just before rename `at` of the four (a.json aside, the new
    a.json in, b aside, the new b in): no final path is ever half-written, and the next writer puts
    back what was moved aside and removes the dead writer's temporaries.  Killed between the two
    outputs (3), a.json is new and b old: each whole, the set mixed (DVC sees the stage changed)."""
    write_json(tmp_path / "a.json", {"old": 1})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path), str(at)], env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(name.startswith(".") for name in left)  # the dead writer's debris
    for name in ("a.json", "b"):
        if (tmp_path / name).exists():  # whatever is in place is whole: the old output or the new
            text = (tmp_path / name).read_text() if name == "a.json" else (tmp_path / "b" / "x").read_text()
            assert text.strip() in ('{\n  "old": 1\n}', '{\n  "new": 1\n}', "old", "new")
    sweep_debris(tmp_path / "a.json")
    sweep_debris(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b"]
    assert json.loads((tmp_path / "a.json").read_text()) == ({"new": 1} if at >= 3 else {"old": 1})
    assert (tmp_path / "b" / "x").read_text() == "old"
    with atomic_outputs(tmp_path / "a.json", tmp_path / "b") as (a, b):  # and the next run writes as usual
        write_json(a, {"next": 1})
        (b / "x").write_text("next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b"] and (tmp_path / "b" / "x").read_text() == "next"


def test_a_live_writers_temporaries_are_left_alone(tmp_path):
    (tmp_path / f".a.tmp-{os.getppid()}.json").write_text("another process is writing")
    write_json(tmp_path / "a.json", {"x": 1})
    assert sweep_debris(tmp_path / "a.json") == [] and (tmp_path / f".a.tmp-{os.getppid()}.json").exists()


def test_every_stage_first_sweeps_what_killed_writers_left_in_the_workspace(tmp_path, monkeypatch, caplog):
    """Under `dvc repro` a killed stage may never run again (DVC restores its outputs from the run
    cache, or finds its persisted outputs intact): the next stage to run anywhere sweeps instead."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "models" / f".grads.tmp-{dead}").mkdir(parents=True)
    (tmp_path / "models" / f".grads.tmp-{dead}" / "forget.safetensors").write_bytes(b"half")
    (tmp_path / "metrics" / "compare").mkdir(parents=True)
    (tmp_path / "metrics" / "compare" / f".ga_ft.tmp-{dead}.json").write_text("{")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / f".world.old-{dead}.png").write_bytes(b"the committed plot, moved aside")
    (tmp_path / "plots" / f".search.tmp-{os.getppid()}.csv").write_text("a live writer's")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".notes.txt").write_text("not debris")
    monkeypatch.chdir(tmp_path)
    ran = []
    with caplog.at_level("INFO"):
        run_stage("probe", lambda: ran.append(sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())))
    assert ran == [["data/.notes.txt", f"plots/.search.tmp-{os.getppid()}.csv", "plots/world.png"]]
    assert (tmp_path / "plots" / "world.png").read_bytes() == b"the committed plot, moved aside"  # put back: world.png was missing
    assert sum("left by a killed run" in r.getMessage() for r in caplog.records) == 3


# ---------------------------------------------------------------- corrupted files, refused by their hash

def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) - 3 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_patch_with_one_flipped_byte_is_refused(tmp_path):
    save_patch(tmp_path, "layer.weight", torch.ones(3, 4), {"family": "open_clip"})
    meta, tensors = read_patch(tmp_path, "re-run the search stage")
    assert meta["layer"] == "layer.weight" and torch.equal(tensors["layer.weight"], torch.ones(3, 4))
    _flip(tmp_path / PATCH_WEIGHTS)
    with pytest.raises(UnlearnError, match=r"patch.safetensors does not match the hash in its patch.json .*; re-run the search stage$"):
        read_patch(tmp_path, "re-run the search stage")


def test_a_patch_mostly_of_zero_rows_is_stored_by_rows_and_read_back_whole(tmp_path):
    """An embedding table's edit moves a few rows: the patch stores those rows and their indices
    (a fraction of the dense bytes) and reads back the same tensor; a dense edit is stored whole;
    rows that disagree with the recorded shape are refused with one line."""
    delta = torch.zeros(1000, 16)
    delta[[3, 500, 999]] = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    (tmp_path / "rows").mkdir()
    save_patch(tmp_path / "rows", "emb.weight", delta, {"family": "hf_clip"})
    meta, tensors = read_patch(tmp_path / "rows", "re-run the search stage")
    assert meta["rows"] == 3 and meta["shape"] == [1000, 16] and torch.equal(tensors["emb.weight"], delta) and list(tensors) == ["emb.weight"]
    assert (tmp_path / "rows" / PATCH_WEIGHTS).stat().st_size < delta.numel() * 4 / 50
    dense = torch.randn(4, 3)
    dense[0] = 0  # one zero row of four: stored whole
    (tmp_path / "dense").mkdir()
    save_patch(tmp_path / "dense", "w.weight", dense, {})
    meta, tensors = read_patch(tmp_path / "dense", "re-run the search stage")
    assert "rows" not in meta and torch.equal(tensors["w.weight"], dense)
    import json

    record = json.loads((tmp_path / "rows" / "patch.json").read_text())
    (tmp_path / "rows" / "patch.json").write_text(json.dumps(record | {"shape": [500, 16]}))
    with pytest.raises(UnlearnError, match=r"stores emb.weight by rows but its indices, rows and recorded shape do not agree; re-run the search stage$"):
        read_patch(tmp_path / "rows", "re-run the search stage")


def test_gradients_and_retain_statistics_with_one_flipped_byte_are_refused(tiny_clip, tmp_path):
    from unlearn.methods.retain_stats import GRADIENT, SIDECAR, RetainStats, load_retain_stats, save_retain_stats
    from unlearn.methods.slug import GradientRecord, load_gradients, save_gradients

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny_clip.save(model_dir)
    zeros = {n: torch.zeros_like(p) for n, p in tiny_clip.model.named_parameters()}
    from unlearn.models.adapter import fingerprint

    grads = tmp_path / "grads"
    grads.mkdir()
    save_gradients(grads, zeros, GradientRecord(model_sha256=fingerprint(model_dir), forget_manifest_sha256="x", n_forget=1, batch_size=1,
                                                seed=0, forget_loss=0.0, family=tiny_clip.family))
    load_gradients(grads, tiny_clip, model_dir)
    _flip(grads / "forget.safetensors")
    with pytest.raises(UnlearnError, match="does not match the hash in .*sidecar.json"):
        load_gradients(grads, tiny_clip, model_dir)
    _flip(grads / "forget.safetensors")
    _flip(grads / "sidecar.json", at=0)  # "{" -> "z": not JSON any more
    with pytest.raises(UnlearnError, match=r"sidecar.json is not a gradients record \(JSONDecodeError"):
        load_gradients(grads, tiny_clip, model_dir)

    stats = tmp_path / "stats"
    stats.mkdir()
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    save_retain_stats(stats, RetainStats(gradient=zeros, moments={}, n_retain=1, loss=0.0), model_dir, manifest, 1, tiny_clip.family)
    load_retain_stats(stats, tiny_clip, model_dir)
    _flip(stats / GRADIENT)
    with pytest.raises(UnlearnError, match="does not match the hash in its sidecar"):
        load_retain_stats(stats, tiny_clip, model_dir)
    assert (stats / SIDECAR).is_file()
    safetensors.torch.load_file(grads / "forget.safetensors")  # the files themselves still parse: only the hash tells


# ---------------------------------------------------------------- outputs that hash the same twice

SAVE_TWICE = """
import sys, torch
from unlearn.io import save_safetensors
meta = {f"key{i}": f"value {i}" for i in range(8)}
save_safetensors({"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4)}, sys.argv[1], metadata=meta)
"""


def test_safetensors_written_by_the_pipeline_have_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes its metadata in hash-map order, new in every process: the same gradient
    file hashed differently on each run, and so did every record and DVC hash naming it."""
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", SAVE_TWICE, str(path)], check=True, cwd=ROOT)
    assert len({p.read_bytes() for p in paths}) == 1
    with safetensors.safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {f"key{i}": f"value {i}" for i in range(8)} and sorted(f.keys()) == ["a", "b"]
        assert torch.equal(f.get_tensor("b"), torch.arange(6.0).reshape(2, 3))
