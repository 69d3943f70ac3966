"""Finds the reference code of a registered architecture (`ArchSpec.torch_class`).

The specs live in the base layer (`convert.base.registry`) and name their reference module by import path;
resolving that name here keeps the import edge inside the models layer.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from convert.base.checkpoint import CONFIG, Checkpoint
from convert.base.registry import spec_for
from convert.base.spec import ArchSpec
from torch_reference.loading import LoadReport, load_checkpoint_into


def arch_module(spec: ArchSpec) -> ModuleType:
    """The `torch_reference.<name>` module."""
    return importlib.import_module(spec.torch_class.split(":")[0])


def model_class(spec: ArchSpec) -> type:
    """The nn.Module class of an architecture (e.g. `Wav2Vec2Model`)."""
    module, name = spec.torch_class.split(":")
    return getattr(importlib.import_module(module), name)


def model_for(config: Any, role: str | None = None) -> Any:
    """A freshly initialised reference model for `config` (an encoder or decoder config)."""
    return model_class(spec_for(config, role=role))(config)


def from_pretrained(directory: str | Path, role: str | None = None) -> tuple[Any, LoadReport]:
    """Loads a single-architecture checkpoint directory into its reference model, in eval mode.

    Source keys go through the architecture's source rules (task heads, prefixes and old spellings), every
    dropped key is listed with why in the report, and tied keys are filled from their source.

    Args:
        directory: holds `config.json` and safetensors or `.bin` weights (sharded or not).
        role: "encoder" or "decoder" to refuse the other kind.

    Returns:
        (model in eval mode, what the load did).

    Raises:
        CheckpointError, UnsupportedConfig: naming the file and what does not fit.
    """
    checkpoint = Checkpoint(directory)
    where = str(Path(directory) / CONFIG)
    spec = spec_for(checkpoint.config, where, role=role)
    config = spec.adapt_config(spec.config(checkpoint.config, where), checkpoint)
    model = model_class(spec)(config)
    report = load_checkpoint_into(model, checkpoint, spec.source_rules(config), spec.tied_keys(config))
    return model.eval(), report
