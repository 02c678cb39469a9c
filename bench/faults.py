"""The fault matrix, run and timed: hostile captions and images, out-of-range params, a full disk,
a writer killed outright, corrupted files, a stage failing or killed under `dvc repro`.

Each row injects one fault into a scratch copy and reports what happened (the outcome a user
sees), what was lost (must be "none") and how long recovery took (the next run that puts things
right, timed; "-" where nothing needs recovering).  The `dvc repro` rows build a tiny world in a
scratch DVC project first (about 5 min on 2 CPU cores; --no-pipeline skips them).  The same
faults, with their exact outcomes asserted, are tests/test_faults.py and the fault tests of
tests/test_pipeline.py.

    python bench/faults.py                 # prints the table, writes bench/results/faults.{json,md}
    python bench/faults.py --no-pipeline   # the library rows only (about 20 s)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workspace import assign  # noqa: E402
from unlearn.cli import run_stage  # noqa: E402
from unlearn.data.curate import Concept, curate_forget  # noqa: E402
from unlearn.errors import UnlearnError  # noqa: E402
from unlearn.io import DEBRIS, atomic_outputs, sha256_tree, sweep_debris, write_json  # noqa: E402
from unlearn.methods.slug import PATCH_WEIGHTS, read_patch, save_patch  # noqa: E402
from unlearn.params import load_yaml  # noqa: E402

ROWS: list[dict] = []
ENV = os.environ | {"PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def row(fault: str, outcome: str, lost: str, recover_s: float | None) -> None:
    ROWS.append({"fault": fault, "outcome": outcome, "lost": lost, "recover_s": None if recover_s is None else round(recover_s, 2)})
    print(f"{fault:<48} | {outcome:<70} | {lost:<5} | {'-' if recover_s is None else f'{recover_s:.2f} s'}", flush=True)


def _tar(path: Path, rows: list[tuple[str, bytes, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, caption, image in rows:
            for name, data in ((f"{key}.jpg", image), (f"{key}.txt", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _jpeg(mode="RGB", colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16), colour).save(buf, "JPEG")
    return buf.getvalue()


def curation_rows(tmp: Path) -> None:
    jpg = _jpeg()
    png16 = io.BytesIO()
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(png16, "PNG")
    cases = [("a", "Beyoncé live".encode(), jpg), ("b", b"beyonce concert", jpg), ("c", "Beyonce\u0301 tour".encode(), jpg),
             ("d", b"Beyonc&eacute; 2016", jpg), ("e", "BEYONCÉ".encode(), jpg), ("f", b"https://x.org/beyonce.jpg", jpg),
             ("g", b"Beyonc\xe9 live", jpg), ("h", b"", jpg), ("i", ("x " * 5000 + "Beyonce").encode(), jpg),
             ("j", b"Beyonce, zero bytes", b""), ("k", b"Beyonce, truncated", jpg[: len(jpg) // 2]),
             ("l", b"Beyonce CMYK", _jpeg("CMYK", (0, 255, 0, 0))), ("m", b"Beyonce grey", _jpeg("L", 128)),
             ("n", b"Beyonce 16-bit", png16.getvalue()), ("o", b"a car", jpg), ("o", b"Beyonce duplicate", jpg),
             ("p", b"#BeyonceKnowles", jpg)]
    (tmp / "laion").mkdir()
    _tar(tmp / "laion" / "00000.tar", cases)
    (tmp / "forget").mkdir()
    f = curate_forget(tmp / "laion", Concept("Beyoncé", "identity", ("Beyonce Knowles",)), 100, 0, tmp / "forget")
    m = f["match"]
    rules = ", ".join(f"{k} {v}" for k, v in m["rules"].items())
    row("captions: accents, entities, NFD, caps, URL, 10k chars", f"{f['count']} matched ({rules})", "none", None)
    row("caption bytes not UTF-8 (Latin-1 'Beyonc\\xe9')", f"read as cp1252 and matched; counted (not_utf8 {m['not_utf8']})", "none", None)
    row("empty caption", f"not matched; counted (empty {m['empty']})", "none", None)
    row("joined form '#BeyonceKnowles' (curate.joined off)", f"not matched; counted (joined_only {m['joined_only']})", "none", None)
    skipped = ", ".join(k.split(":")[1] for k in m["skipped_images"])
    row("images: zero-byte, truncated", f"skipped, counted by key ({skipped})", "none", None)
    row("images: CMYK, greyscale, 16-bit PNG", "decoded to RGB (16 bits scaled, not clipped to white)", "none", None)
    row("tar with a duplicate key", f"first copy kept, counted ({', '.join(m['duplicate_keys'])})", "none", None)


def _check_stage(tmp: Path, key: str, value) -> tuple[int, str, float]:
    work = tmp / f"check-{key}-{value}"
    (work / "data").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", work)
    params = load_yaml(ROOT / "params.yaml")
    assign(params, key, value)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "data" / "checked.json").write_text("{}\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages.check"], cwd=work, capture_output=True, text=True, env=ENV)
    took = time.perf_counter() - start
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    intact = (work / "data" / "checked.json").read_text() == "{}\n" and "Traceback" not in proc.stderr
    return proc.returncode, (errors[-1] if errors else proc.stderr[-200:]) if intact else "TRACEBACK or stamp changed", took


def params_rows(tmp: Path) -> None:
    for key, value in (("curate.retain_size", 0), ("curate.forget_max", 0), ("gradients.batch_size", 0),
                       ("eval.split.val_fraction", 0), ("eval.split.val_fraction", 1), ("slug.search.rho_start", 0),
                       ("slug.search.damping", -0.1)):
        rc, line, took = _check_stage(tmp, key, value)
        short = re.sub(r"^error: params.yaml ", "", line)
        row(f"param {key}: {value}", f"exit {rc} in {took:.1f} s: {short[:58]}", "none" if rc == 1 else "?", None)


def disk_and_kill_rows(tmp: Path) -> None:
    out = tmp / "disk"
    out.mkdir()
    write_json(out / "m.json", {"earlier": 1})

    def full():
        with atomic_outputs(out / "m.json", out / "d") as (_m, d):
            (d / "part").write_bytes(b"x" * 1000)
            with open("/dev/full", "w") as f:  # the OS's ENOSPC
                f.write("x" * 10_000)
                f.flush()

    import contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run_stage("bench", full)
        except SystemExit as e:
            code = e.code
    intact = json.loads((out / "m.json").read_text()) == {"earlier": 1} and sorted(p.name for p in out.iterdir()) == ["m.json"]
    row("disk full while a stage writes (/dev/full)", f"exit {code}: {err.getvalue().strip()[:62]}", "none" if intact else "LOST", None)

    killer = ("import os, signal, sys\nfrom pathlib import Path\nfrom unlearn.io import atomic_outputs, write_json\n"
              "at = int(sys.argv[2]); n = [0]; real = Path.rename\n"
              "def rename(self, t):\n    n[0] += 1\n    if n[0] == at: os.kill(os.getpid(), signal.SIGKILL)\n    return real(self, t)\n"
              "Path.rename = rename\nroot = Path(sys.argv[1])\n"
              "with atomic_outputs(root / 'a.json', root / 'b') as (a, b):\n    write_json(a, {'new': 1}); (b / 'x').write_text('new')\n"
              "    at == 0 and os.kill(os.getpid(), signal.SIGKILL)\n")
    for at, where in ((0, "while writing"), (1, "after moving the old a.json aside"), (3, "between two outputs"),
                      (4, "after moving the old b aside")):
        d = tmp / f"kill{at}"
        d.mkdir()
        write_json(d / "a.json", {"old": 1})
        (d / "b").mkdir()
        (d / "b" / "x").write_text("old")
        subprocess.run([sys.executable, "-c", killer, str(d), str(at)], env=ENV)
        start = time.perf_counter()
        sweep_debris(d / "a.json")
        sweep_debris(d / "b")
        took = time.perf_counter() - start
        a = json.loads((d / "a.json").read_text())
        ok = sorted(p.name for p in d.iterdir()) == ["a.json", "b"] and (d / "b" / "x").read_text() == "old"
        row(f"SIGKILL {where}", f"next writer swept the temporaries; a.json {next(iter(a))}, b old", "none" if ok else "LOST", took)


def corruption_rows(tmp: Path) -> None:
    import torch
    d = tmp / "patch"
    d.mkdir()
    save_patch(d, "w", torch.ones(4, 4), {})
    data = bytearray((d / PATCH_WEIGHTS).read_bytes())
    data[-3] ^= 1
    (d / PATCH_WEIGHTS).write_bytes(bytes(data))
    try:
        read_patch(d, "re-run the search stage")
        outcome = "ACCEPTED"
    except UnlearnError as e:
        outcome = "refused: " + str(e).split("/")[-1][:60]
    row("patch with one flipped byte", outcome, "none", None)
    from unlearn.methods.retain_stats import GRADIENT, RetainStats, load_retain_stats, save_retain_stats
    from unlearn.methods.slug import GradientRecord, load_gradients, save_gradients
    from unlearn.models import openclip as oc
    from unlearn.models.adapter import fingerprint

    adapter = oc.create(oc.TINY_ARCH, seed=0)
    (tmp / "model").mkdir()
    adapter.save(tmp / "model")
    zeros = {n: torch.zeros_like(p) for n, p in adapter.model.named_parameters()}
    (tmp / "grads").mkdir()
    save_gradients(tmp / "grads", zeros, GradientRecord(model_sha256=fingerprint(tmp / "model"), forget_manifest_sha256="-", n_forget=1,
                                                        batch_size=1, seed=0, forget_loss=0.0, family=adapter.family))
    (tmp / "stats").mkdir()
    (tmp / "manifest.json").write_text("{}")
    save_retain_stats(tmp / "stats", RetainStats(zeros, {}, 1, 0.0), tmp / "model", tmp / "manifest.json", 1, adapter.family)
    for what, path, load in (("gradients", tmp / "grads" / "forget.safetensors", lambda: load_gradients(tmp / "grads", adapter, tmp / "model")),
                             ("retain statistics", tmp / "stats" / GRADIENT,
                              lambda: load_retain_stats(tmp / "stats", adapter, tmp / "model"))):
        data = bytearray(path.read_bytes())
        data[-3] ^= 1
        path.write_bytes(bytes(data))
        try:
            load()
            outcome = "ACCEPTED"
        except UnlearnError as e:
            outcome = "refused: " + str(e).split("/")[-1][:60]
        row(f"{what} with one flipped byte", outcome, "none", None)


def pipeline_rows(tmp: Path) -> None:
    """The dvc repro rows, on a tiny world (tests/test_pipeline.py's configuration)."""
    sys.path.insert(0, str(ROOT))
    from tests.test_pipeline import KILL_ON_RENAME, _run, _set_params, _stages_run, _tracked_outputs

    repo = tmp / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "unlearn"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    _set_params(repo, **{"data.synthetic.shards": 2, "data.synthetic.samples_per_shard": 150, "data.synthetic.eval_per_class": 3,
                         "data.synthetic.canvas_per_cell": 2, "data.synthetic.workers": 1, "model.train.epochs": 2,
                         "model.train.batch_size": 32, "curate.retain_size": 60, "gradients.batch_size": 16,
                         "slug.search.max_layers": 2, "slug.search.evals_per_layer": 3, "eval.mia.folds": 2, "eval.mia.seeds": 2,
                         "compare.concepts": ["Elon Musk"],
                         "compare.methods": ["slug", "ga_ft"], "ga_ft.epochs": 2})
    _run(["git", "init", "-q"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    targets = ["gradients", "search", "compare_run@ga_ft", "evaluate"]
    start = time.perf_counter()
    _run([sys.executable, "-m", "dvc", "repro", *targets], repo)
    print(f"(tiny pipeline built in {time.perf_counter() - start:.0f} s)", flush=True)
    (tmp / "inject").mkdir()
    (tmp / "inject" / "sitecustomize.py").write_text(KILL_ON_RENAME)
    def debris() -> list[Path]:
        return [p for p in repo.rglob(".*-*") if DEBRIS.match(p.name)]

    def metrics() -> dict:
        return {p: json.loads(p.read_text()) for p in sorted((repo / "metrics").rglob("*.json")) if not DEBRIS.match(p.name)}

    def models() -> dict:  # every model output's content hash (a killed writer's debris beside them is not one)
        return {p.name: sha256_tree(p) for p in sorted((repo / "models").iterdir()) if p.is_dir() and not DEBRIS.match(p.name)}

    for stage in ("gradients", "search", "compare_run@ga_ft"):
        before, tracked, weights = metrics(), _tracked_outputs(repo, stage), models()
        proc = _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], repo, check=False, PYTHONPATH=str(tmp / "inject"),
                    UNLEARN_TEST_KILL=stage.partition("@")[0])
        kept, left = _tracked_outputs(repo, stage) == tracked, len(debris())
        start = time.perf_counter()
        out = _run([sys.executable, "-m", "dvc", "repro", *targets], repo).stdout
        took = time.perf_counter() - start
        how = "rerun" if stage in _stages_run(out) else "restored from the run cache" if "is cached" in out else "up to date"
        after = metrics()
        same = after == before and models() == weights
        for path in sorted(set(before) | set(after)):
            if before.get(path) != after.get(path):
                print(f"  {path.relative_to(repo)} differs: {json.dumps(before.get(path))[:300]} -> {json.dumps(after.get(path))[:300]}", flush=True)
        if not debris():
            swept = f"its {left} temporaries swept by the rerun"
        else:
            _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "check"], repo)
            swept = f"its {left} temporaries swept by the next stage to run" if not debris() else f"{len(debris())} temporaries LEFT"
        row(f"SIGKILL of {stage} under dvc repro", f"exit {proc.returncode}; committed outputs {'kept' if kept else 'GONE'}; dvc repro: {how}, "
            f"metrics and models {'identical' if same else 'DIFFER'}; {swept}", "none" if kept and same and not debris() else "LOST", took)
    world = (repo / "plots" / "world.png").read_bytes()
    params = (repo / "params.yaml").read_text()
    _set_params(repo, **{"data.source": "bogus"})
    proc = _run([sys.executable, "-m", "dvc", "repro", "download"], repo, check=False)
    kept = (repo / "plots" / "world.png").read_bytes() == world
    (repo / "params.yaml").write_text(params)
    start = time.perf_counter()
    _run([sys.executable, "-m", "dvc", "repro", *targets], repo)
    row("stage failing under dvc repro (download)", f"exit {proc.returncode}; plots/world.png {'kept (persist)' if kept else 'GONE'}",
        "none" if kept else "LOST", time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-pipeline", action="store_true", help="skip the dvc repro rows (a tiny world's pipeline, about 5 min)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    print(f"{'fault':<48} | {'outcome':<70} | lost  | recovery")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        curation_rows(tmp)
        params_rows(tmp)
        disk_and_kill_rows(tmp)
        corruption_rows(tmp)
        if not args.no_pipeline:
            pipeline_rows(tmp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(ROWS, indent=2) + "\n")
    lines = ["| fault | outcome | data lost | recovery |", "|---|---|---|---|"]
    recovery = lambda r: "-" if r["recover_s"] is None else f"{r['recover_s']:.2f} s"  # noqa: E731
    lines += [f"| {r['fault']} | {r['outcome']} | {r['lost']} | {recovery(r)} |" for r in ROWS]
    (out / "faults.md").write_text("\n".join(lines) + "\n")
    lost = [r["fault"] for r in ROWS if r["lost"] != "none"]
    print(f"{len(ROWS)} faults, data lost in {len(lost)}" + (f": {', '.join(lost)}" if lost else ""))
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
