"""`ArchSpec`: everything the toolkit knows about one architecture, declared once in `convert/archs/<name>.py`.

A spec holds the base-layer pieces themselves (config class, key table, source rules, tie and init rules) and
names the pieces that live in higher layers by import path: the Flax module (`flax_model.<name>`), the PyTorch
reference module (`torch_reference.<name>`) and the fixture builder (`scripts.fixtures_<name>`). Each of those
layers resolves its own names (`flax_model.registry`, `torch_reference.registry`), so the base never imports a
layer above it. `convert.registry` lists the specs; everything else (supported model types, built-in names,
test parametrisation) is derived from that list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

from convert.configs import HFConfig
from convert.keymap import KeyMap, SourceRules

Role = Literal["encoder", "decoder"]


def no_tied_keys(config: Any) -> dict[str, str]:
    """For architectures whose parameters share no storage."""
    return {}


def unchanged_config(config: Any, checkpoint: Any) -> Any:
    """For architectures whose config needs no fix from the checkpoint's contents."""
    return config


def no_source_rules(config: Any) -> SourceRules:
    return SourceRules()


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """One architecture.

    Attributes:
        name: the file stem shared by `convert/archs/`, `flax_model/`, `torch_reference/` and
            `scripts/fixtures_<name>.py`.
        role: "encoder" (speech) or "decoder" (text).
        config_class: reads the architecture's `config.json`; its `MODEL_TYPES` are the model types served.
        keymap: canonical PyTorch keys <-> HF Flax paths, every parameter of the model.
        source_rules: config -> how raw checkpoint names (task heads, prefixes, old spellings) become
            canonical names, with every dropped key's reason.
        flax_source_rules: the same for sources that hold only `flax_model.msgpack`.
        tied_keys: config -> {canonical key: the key it shares storage with} (left out of files).
        adapt_config: (config, checkpoint) -> config with data-dependent fixes (e.g. a non-zero logits bias).
        initializable: regexes of Flax paths the composer may create when the source lacks them
            (e.g. GPT-2's cross-attention).
        layer_stack: (config field holding the number of identical layers, Flax path prefix of the stack).
        flax_class: "module:Class" of the Flax module (under `flax_model`).
        torch_class: "module:Class" of the reference module (under `torch_reference`); the module also has
            `from_pretrained(directory) -> (model, LoadReport)`.
        fixtures: the module under `scripts` whose `CASES` build tiny seeded checkpoints.
        hf_classes: the transformers classes whose checkpoints are read (for messages and documentation).
    """

    name: str
    role: Role
    config_class: type[HFConfig]
    keymap: KeyMap
    source_rules: Callable[[Any], SourceRules]
    flax_class: str
    torch_class: str
    fixtures: str
    layer_stack: tuple[str, str]
    flax_source_rules: Callable[[Any], SourceRules] = no_source_rules
    tied_keys: Callable[[Any], dict[str, str]] = no_tied_keys
    adapt_config: Callable[[Any, Any], Any] = unchanged_config
    initializable: tuple[str, ...] = ()
    hf_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for attr, package in (("flax_class", "flax_model."), ("torch_class", "torch_reference."),
                              ("fixtures", "scripts.")):
            value = getattr(self, attr)
            if not value.startswith(package):
                raise ValueError(f"{self.name}: {attr}={value!r} must name a module under {package[:-1]}")

    @property
    def model_types(self) -> tuple[str, ...]:
        return self.config_class.MODEL_TYPES

    def config(self, d: dict[str, Any], where: str = "config.json") -> HFConfig:
        """The typed config of a parsed `config.json`."""
        return self.config_class.from_hf_dict(d, where)

    def num_layers(self, config: Any) -> int:
        return int(getattr(config, self.layer_stack[0]))
