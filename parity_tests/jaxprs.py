"""Walking a traced program: every equation of a jaxpr, those of the programs nested in it included; what a
function's backward pass keeps."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax.ad_checkpoint
from jax.extend import core as jax_core


def equations(jaxpr: Any) -> Iterator[Any]:
    """The equations of `jaxpr` (a Jaxpr or ClosedJaxpr) in order, each followed by those of the programs in its
    parameters (a cond's branches, a scan's body, a jit's or custom_vjp's program), depth first."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for sub in jax_core.jaxprs_in_params(eqn.params):
            yield from equations(sub)


def saved_residuals(fn: Callable[..., Any], *args: Any) -> list[tuple[tuple[int, ...], str]]:
    """(shape, what) of every array the backward pass of `fn(*args)` keeps (`print_saved_residuals`' lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    found = []
    for line in out.getvalue().splitlines():
        match = re.match(r"\s*\w+\[([\d,]*)\]\s+(.*)", line)
        if match:
            found.append((tuple(int(d) for d in match.group(1).split(",") if d), match.group(2)))
    return found
