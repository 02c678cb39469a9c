"""Atomic outputs and small JSON helpers.

A stage writes every output to a temporary sibling path and renames all of them into place only
after all were written, so a failure leaves earlier outputs untouched and no partial files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path, tag: str) -> Path:
    # keep the suffix last so that writers which infer the format from it (PIL) still work
    return path.with_name(f".{path.stem}.{tag}-{os.getpid()}{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


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
        _remove(tmp)
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
