"""A cover of encoder x decoder pairs for the heavy tests that need not run every pair (test_training.py's gradient
pairs, test_pairs.py's logits): every encoder and every decoder in one pair at least."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

E = TypeVar("E")
D = TypeVar("D")


def cover(encoders: Sequence[E], decoders: Sequence[D], allowed: Callable[[E, D], bool]) -> list[tuple[E, D]]:
    """The decoders that pair with fewest encoders first, each with an encoder not yet taken where one is allowed;
    then each encoder left with the decoders that pair with every encoder, in turn."""
    pairs, unused = [], list(encoders)
    for d in sorted(decoders, key=lambda d: sum(allowed(e, d) for e in encoders)):
        permitted = [e for e in encoders if allowed(e, d)]
        e = next((e for e in unused if e in permitted), permitted[0])
        pairs.append((e, d))
        if e in unused:
            unused.remove(e)
    free = [d for d in decoders if all(allowed(e, d) for e in encoders)]
    return pairs + [(e, free[i % len(free)]) for i, e in enumerate(unused)]
