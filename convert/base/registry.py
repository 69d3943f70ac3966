"""The supported architectures: one registration line each. Everything else is derived from `SPECS`.

To add an architecture, write its spec module under `convert/base/archs/` and add its `SPEC` here (see DESIGN.md,
"Adding an architecture").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convert.base.archs import (
    bart,
    bert,
    data2vec_audio,
    gemma2,
    gpt2,
    hubert,
    llama,
    mistral,
    qwen2,
    roberta,
    wav2vec2,
    wav2vec2_bert,
    wav2vec2_conformer,
    wavlm,
)
from convert.base.configs import HFConfig
from convert.base.errors import UnsupportedConfig
from convert.base.spec import ArchSpec, Role

SPECS: tuple[ArchSpec, ...] = (
    wav2vec2.SPEC,
    hubert.SPEC,
    wavlm.SPEC,
    data2vec_audio.SPEC,
    wav2vec2_conformer.SPEC,
    wav2vec2_bert.SPEC,
    bart.SPEC,
    gpt2.SPEC,
    bert.SPEC,
    roberta.SPEC,
    llama.SPEC,
    qwen2.SPEC,
    mistral.SPEC,
    gemma2.SPEC,
)

BY_MODEL_TYPE: dict[str, ArchSpec] = {t: spec for spec in SPECS for t in spec.model_types}
BY_NAME: dict[str, ArchSpec] = {spec.name: spec for spec in SPECS}


def model_types(role: Role | None = None) -> tuple[str, ...]:
    """The `model_type`s this toolkit reads, for one role or all."""
    return tuple(t for t, spec in BY_MODEL_TYPE.items() if role is None or spec.role == role)


def specs(role: Role | None = None) -> tuple[ArchSpec, ...]:
    return tuple(spec for spec in SPECS if role is None or spec.role == role)


def spec_for(config: Mapping[str, Any] | HFConfig, where: str = "config.json", role: Role | None = None) -> ArchSpec:
    """The architecture of a config dict (by `model_type`) or config object; `role` restricts the choice.

    Raises:
        UnsupportedConfig: naming `where`, the model type and the supported ones.
    """
    if isinstance(config, HFConfig):
        spec = next((s for s in SPECS if isinstance(config, s.config_class)), None)
        if spec is not None and (role is None or spec.role == role):
            return spec
        model_type = config.to_hf_dict().get("model_type")
    else:
        model_type = config.get("model_type")
    candidates = {t: s for t, s in BY_MODEL_TYPE.items() if role is None or s.role == role}
    if model_type not in candidates:
        what = f"a supported {role}" if role else "supported"
        raise UnsupportedConfig(
            f"{where}: model_type={model_type!r} is not {what} (supported: {', '.join(candidates)})"
        )
    return candidates[model_type]


def config_from_hf_dict(d: Mapping[str, Any], where: str = "config.json", role: Role | None = None) -> HFConfig:
    """The typed config of a parsed single-architecture `config.json`."""
    return spec_for(d, where, role).config(dict(d), where)
