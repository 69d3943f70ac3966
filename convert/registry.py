"""Which code implements each supported `model_type`: its config class, key table, Flax and reference modules.

Modules are named by import path and imported on first use, so that reading this table never imports torch
(flax_model must stay torch-free) nor jax (the reference must not need it).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from convert.configs import BartConfig, GPT2Config, HFConfig, SpeechEncoderDecoderConfig, Wav2Vec2Config
from convert.errors import UnsupportedConfig


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture: where its pieces live."""

    name: str  # the file stem shared by flax_model/, torch_reference/ and convert/keymaps/
    role: str  # "encoder" or "decoder"
    config_class: type[HFConfig]
    flax_class: str
    torch_class: str
    # The stack of identical transformer layers: (config field with their number, Flax path of the stack).
    layer_stack: tuple[str, str]

    @property
    def keymaps(self) -> ModuleType:
        """The `convert.keymaps.<name>` module: KEYMAP, source_rules, tied_keys, INITIALIZABLE, adapt_config."""
        return importlib.import_module(f"convert.keymaps.{self.name}")

    @property
    def flax_module(self) -> ModuleType:
        return importlib.import_module(f"flax_model.{self.name}")

    @property
    def torch_module(self) -> ModuleType:
        return importlib.import_module(f"torch_reference.{self.name}")

    def flax_module_class(self) -> type:
        return getattr(self.flax_module, self.flax_class)

    def torch_module_class(self) -> type:
        return getattr(self.torch_module, self.torch_class)

    def config(self, d: Mapping[str, Any], where: str) -> HFConfig:
        return self.config_class.from_hf_dict(d, where)


WAV2VEC2 = Arch("wav2vec2", "encoder", Wav2Vec2Config, "Wav2Vec2Module", "Wav2Vec2Model",
                ("num_hidden_layers", "encoder/layers/"))
BART = Arch("bart", "decoder", BartConfig, "BartForCausalLMModule", "BartForCausalLM",
            ("decoder_layers", "model/decoder/layers/"))
GPT2 = Arch("gpt2", "decoder", GPT2Config, "GPT2LMHeadModule", "GPT2LMHeadModel", ("n_layer", "transformer/h/"))

ARCHS: dict[str, Arch] = {"wav2vec2": WAV2VEC2, "bart": BART, "mbart": BART, "gpt2": GPT2}


def arch_for(config: Mapping[str, Any] | HFConfig, where: str = "config.json", role: str | None = None) -> Arch:
    """The architecture for a config dict (by `model_type`) or config object; `role` restricts the choice."""
    if isinstance(config, HFConfig):
        model_type = config.to_hf_dict().get("model_type")
    else:
        model_type = config.get("model_type")
    candidates = {k: a for k, a in ARCHS.items() if role is None or a.role == role}
    if model_type not in candidates:
        what = f"a supported {role}" if role else "supported"
        raise UnsupportedConfig(
            f"{where}: model_type={model_type!r} is not {what} (supported: {', '.join(candidates)})"
        )
    return candidates[model_type]


def composed_tied_keys(config: SpeechEncoderDecoderConfig) -> dict[str, str]:
    """Tied PyTorch keys of the composed model: the decoder's, one level down (`decoder.`)."""
    tied = arch_for(config.decoder, role="decoder").keymaps.tied_keys(config.decoder)
    return {f"decoder.{k}": f"decoder.{v}" for k, v in tied.items()}
