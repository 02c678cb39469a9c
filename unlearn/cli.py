"""The wrapper every stage runs under: logging, timing, and one-line errors with exit code 1.

A full disk (or quota) is one of those errors wherever it strikes: Python's own writes raise
OSError(ENOSPC), torch and safetensors wrap it in their own exceptions with the OS message."""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from collections.abc import Callable

from unlearn.errors import UnlearnError
from unlearn.io import sweep_workspace


def run_stage(name: str, main: Callable[[], None]) -> None:
    # Our loggers speak at INFO; libraries (open_clip logs at INFO on the root logger) at WARNING.
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(message)s", stream=sys.stderr)
    level = os.environ.get("UNLEARN_LOG", "INFO")
    for logger in (name, "unlearn"):
        logging.getLogger(logger).setLevel(level)
    log = logging.getLogger(name)
    start = time.perf_counter()
    for path in sweep_workspace():
        log.info("swept %s, left by a killed run", path)
    try:
        main()
    except UnlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        if not disk_full(e):
            raise
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: the disk is full{where} ({e.__class__.__name__}); free space and rerun stage {name}; "
              "its earlier outputs are untouched", file=sys.stderr)
        sys.exit(1)
    log.info("done in %.1f s", time.perf_counter() - start)


def disk_full(e: BaseException) -> bool:
    """Whether `e` (or an exception it wraps) is the OS saying the disk or the quota is full."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def torch_device(choice: str) -> str:
    """`auto` picks CUDA when present; anything else is passed through (`cpu`, `cuda:1`)."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise UnlearnError(f"device {choice!r} requested but CUDA is not available; set it to 'auto' or 'cpu'")
    return choice


def peak_memory_mb() -> float:
    """Peak resident memory of this process (and peak CUDA memory when a GPU was used), in MB."""
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return round(rss + gpu, 1)
