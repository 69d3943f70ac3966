"""Walking a traced program: every equation of a jaxpr, those of the programs nested in it included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jax.extend import core as jax_core


def equations(jaxpr: Any) -> Iterator[Any]:
    """The equations of `jaxpr` (a Jaxpr or ClosedJaxpr) in order, each followed by those of the programs in its
    parameters (a cond's branches, a scan's body, a jit's or custom_vjp's program), depth first."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for sub in jax_core.jaxprs_in_params(eqn.params):
            yield from equations(sub)
