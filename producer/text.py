"""Small helpers for the messages vlq prints."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``1 job``, ``2 jobs``, ``1 box``, ``0 boxes``."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("x", "s")) else f"{n} {noun}s"
