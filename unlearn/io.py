"""Atomic outputs, small JSON helpers and checked reads of hashed tensor files.

A stage writes every output to a temporary sibling path and renames all of them into place only
after all were written, so a failure leaves earlier outputs untouched and no partial files.  A
writer killed outright (SIGKILL, power loss) cannot clean up: the next writer of the same output
removes the temporaries its dead predecessor left and, if the kill fell between moving the old
output aside and moving the new one in, puts the old output back (`sweep_debris`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from unlearn.errors import UnlearnError

# what `_tmp_sibling` names: `.NAME.tmp-PID` (an output being written) or `.NAME.old-PID` (the
# previous output moved aside), NAME's suffix kept last
DEBRIS = re.compile(r"^\.(?P<stem>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)(?P<suffix>\.[^.]*)?$")


def _tmp_sibling(path: Path, tag: str) -> Path:
    # keep the suffix last so that writers which infer the format from it (PIL) still work
    return path.with_name(f".{path.stem}.{tag}-{os.getpid()}{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_debris(final: str | Path) -> list[Path]:
    """Clean what killed writers of `final` left beside it; return the paths removed or restored.

    A temporary (`.NAME.tmp-PID`) of a process that is gone is deleted.  An aside copy
    (`.NAME.old-PID`) of a process that is gone is the previous output when `final` is missing
    (the kill fell between the two renames): it is moved back; otherwise it is deleted."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    touched = []
    for path in sorted(final.parent.iterdir()):
        m = DEBRIS.match(path.name)
        if not m or (m["stem"], m["suffix"] or "") != (final.stem, final.suffix) or (int(m["pid"]) != os.getpid() and _alive(int(m["pid"]))):
            continue
        if m["tag"] == "old" and not (final.exists() or final.is_symlink()):
            path.rename(final)
        else:
            _remove(path)
        touched.append(path)
    return touched


OUTPUT_ROOTS = ("data", "models", "metrics", "plots", "report", "runs")


def sweep_workspace(roots: tuple[str, ...] = OUTPUT_ROOTS) -> list[Path]:
    """`sweep_debris` for every output under `roots` (relative to the working directory) that a
    killed writer left debris beside.  Every stage runs it first (`unlearn.cli.run_stage`): a run
    killed under `dvc repro` whose outputs DVC then restores from its cache, or finds intact, is
    never rerun, so its temporaries would otherwise stay until that stage's next run."""
    touched: list[Path] = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                m = DEBRIS.match(name)
                if m:
                    touched += sweep_debris(Path(folder) / f"{m['stem']}{m['suffix'] or ''}")
            dirs[:] = [d for d in dirs if (Path(folder) / d).is_dir()]  # swept debris folders are gone
    return touched


@contextlib.contextmanager
def atomic_outputs(*paths: str | Path) -> Iterator[tuple[Path, ...]]:
    """Yield temporary paths for `paths`; on success move them all into place, else delete them.

    A path ending in a suffix (``.json``) is a file: the caller writes it.  Any other path is a
    directory, created empty for the caller.
    """
    finals = [Path(p) for p in paths]
    tmps = [_tmp_sibling(p, "tmp") for p in finals]
    for final, tmp in zip(finals, tmps):
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_debris(final)
        if not final.suffix:
            tmp.mkdir(parents=True)
    try:
        yield tuple(tmps)
        for final, tmp in zip(finals, tmps):
            if not tmp.exists():
                raise FileNotFoundError(f"output {final} was not written")
    except BaseException:
        for tmp in tmps:
            _remove(tmp)
        raise
    for final, tmp in zip(finals, tmps):
        old = _tmp_sibling(final, "old")
        if final.exists() or final.is_symlink():
            final.rename(old)
        tmp.rename(final)
        _remove(old)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the same bytes for the same tensors and metadata: the
    library writes the metadata in hash-map order, which changes from run to run (and with it the
    file's hash, and every DVC hash and record that names it).  The header is rewritten with the
    metadata keys sorted; its length and the tensor bytes do not change."""
    import safetensors.torch

    data = safetensors.torch.save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items()))} | {k: v for k, v in header.items() if k != "__metadata__"}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:
        raise RuntimeError(f"the safetensors header for {path} grew when sorted ({len(text)} > {size} bytes); report this")
    Path(path).write_bytes(data[:8] + text.ljust(size) + data[8 + size:])


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """A content hash of a directory: relative names and file bytes, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def read_hashed_tensors(directory: str | Path, record: str, files: Sequence[str], hashes: Callable[[dict], Mapping[str, Any]], what: str, fix: str,
                        nan_fix: str | None = None) -> tuple[dict, dict[str, dict]]:
    """Safetensors files saved beside a JSON `record` of their sha256 (`hashes(record)`: file ->
    hash), read checked: every file present, the record a JSON object, each file hashing as
    recorded (a flipped byte, a truncated copy, a file from another run), every tensor finite.
    Any failure is one line naming the file, `what` it is and the `fix` (`nan_fix` for NaN or
    inf).  Returns the record and each file's tensors; what the record says about the model or
    the data is the caller's to check (retain statistics, concept moments, gradients, patches)."""
    import safetensors.torch
    import torch

    directory = Path(directory)
    missing = [str(directory / f) for f in (*files, record) if not (directory / f).is_file()]
    if missing:
        raise UnlearnError(f"{what} missing: {', '.join(missing)}; {fix}")
    try:
        meta = json.loads((directory / record).read_text())
        expected = dict(hashes(meta))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UnlearnError(f"{directory / record} is not a {what} record ({type(e).__name__}: {e}); {fix}") from None
    for f in files:
        if sha256_file(directory / f) != expected.get(f):
            raise UnlearnError(f"{directory / f} does not match the hash in its {record} (corrupted or replaced); {fix}")
    tensors = {f: safetensors.torch.load_file(directory / f) for f in files}
    for f, named in tensors.items():
        for name, t in named.items():
            if not torch.isfinite(t).all():
                raise UnlearnError(f"{what} in {directory / f}: {name} holds NaN or inf; {nan_fix or fix}")
    return meta, tensors
