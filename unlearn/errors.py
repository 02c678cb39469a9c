"""One error type for bad input: its message is a single line naming the input and the fix."""

from __future__ import annotations


class UnlearnError(Exception):
    """Bad input or a failed precondition; stages print it as one line and exit non-zero."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))
