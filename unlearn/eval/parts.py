"""Equal parts: how a set is cut when it is scored or drawn a part at a time.

Every part of one set has the same size (within one item), so a kernel never sees a small last
part whose rounding could differ, and a caller that stops part way cuts the set exactly as a
caller that scores it whole.
"""

from __future__ import annotations


def equal_parts(n: int, most: int) -> int:
    """The fewest parts of at most `most` items each that `n` items can be cut into (at least 1)."""
    return max(1, -(-n // max(1, most)))


def equal_cuts(n: int, most: int) -> list[int]:
    """Cut points of `n` items into `equal_parts(n, most)` parts whose sizes differ by at most one,
    as `torch.tensor_split` cuts them (the larger parts first): [0, ..., n]."""
    parts = equal_parts(n, most)
    size, extra = divmod(n, parts)
    return [k * size + min(k, extra) for k in range(parts)] + [n] if n else [0]
