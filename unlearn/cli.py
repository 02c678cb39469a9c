"""The wrapper every stage runs under: logging, timing, and one-line errors with exit code 1."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

from unlearn.errors import UnlearnError


def run_stage(name: str, main: Callable[[], None]) -> None:
    # Our loggers speak at INFO; libraries (open_clip logs at INFO on the root logger) at WARNING.
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(message)s", stream=sys.stderr)
    level = os.environ.get("UNLEARN_LOG", "INFO")
    for logger in (name, "unlearn"):
        logging.getLogger(logger).setLevel(level)
    log = logging.getLogger(name)
    start = time.perf_counter()
    try:
        main()
    except UnlearnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    log.info("done in %.1f s", time.perf_counter() - start)


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
