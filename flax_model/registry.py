"""Finds the Flax code of a registered architecture (`ArchSpec.flax_class`).

The specs live in the base layer (`convert.base.registry`) and name their Flax module by import path; resolving
that name here keeps the import edge inside the models layer.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from convert.base.registry import spec_for
from convert.base.spec import ArchSpec


def arch_module(spec: ArchSpec) -> ModuleType:
    """The `flax_model.<name>` module: the module class, `init_shapes(config)`."""
    return importlib.import_module(spec.flax_class.split(":")[0])


def module_class(spec: ArchSpec) -> type:
    """The linen module class of an architecture (e.g. `Wav2Vec2Module`)."""
    module, name = spec.flax_class.split(":")
    return getattr(importlib.import_module(module), name)


def module_for(config: Any, role: str | None = None, dtype: Any = None, **kwargs: Any) -> Any:
    """An instance of the linen module for `config` (an encoder or decoder config)."""
    cls = module_class(spec_for(config, role=role))
    return cls(config, **({} if dtype is None else {"dtype": dtype}), **kwargs)
