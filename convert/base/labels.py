"""What a training loss may be given: label ids within the vocabulary (or -100 for padding), as integers, and a
label smoothing factor in [0, 1). Both models' `loss` and the Flax train step check their inputs here, on the host,
so that a bad label is one line naming it instead of a NaN loss or an index silently clamped by the gather."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from convert.base.errors import UsageError

IGNORE_INDEX = -100


def check_label_smoothing(value: Any, param: str = "label_smoothing") -> float:
    """`value` as a float if it is a finite number in [0, 1) (1 would ignore the labels altogether)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise UsageError(f"{param}={value!r}: is not a number", param=param)
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number < 1.0:
        raise UsageError(f"{param}={value!r}: must be at least 0 and below 1", param=param)
    return number


def check_labels(labels: Any, vocab_size: int, batch_size: int | None = None, param: str = "labels",
                 need_tokens: bool = True) -> None:
    """Refuses labels a loss cannot score.

    Args:
        labels: [B, T] token ids (numpy, or anything `np.asarray` reads: a list, a host copy of a tensor).
        vocab_size: the decoder's vocabulary; ids must lie in [0, vocab_size) or be -100.
        batch_size: the inputs' rows, when known.
        need_tokens: refuse labels that are all -100 (a mean over no token is NaN).

    Raises:
        UsageError: `labels: ...` naming the first bad id and where it is.
    """
    array = np.asarray(labels)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise UsageError(f"{param}: dtype {array.dtype}, expected integer token ids (-100 for padding)",
                         param=param)
    if array.ndim != 2:
        raise UsageError(f"{param}: shape {list(array.shape)}, expected [batch, tokens]", param=param)
    if batch_size is not None and array.shape[0] != batch_size:
        raise UsageError(f"{param}: {array.shape[0]} rows, but the inputs have {batch_size}", param=param)
    bad = (array != IGNORE_INDEX) & ((array < 0) | (array >= vocab_size))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise UsageError(f"{param}: token id {int(array[row, col])} at [{row}, {col}] is outside the decoder's "
                         f"vocabulary (0 to {vocab_size - 1}; -100 marks padding); {int(bad.sum())} such id(s)",
                         param=param)
    if need_tokens and not (array != IGNORE_INDEX).any():
        raise UsageError(f"{param}: no token to score (every label is -100 or there are none): the mean loss "
                         "would be NaN", param=param)
