"""Mistral decoders: config, key table (HF `MistralForCausalLM` <-> HF `FlaxMistralForCausalLMModule`), source rules.

transformers' Mistral is Llama without biases, with a sliding window on every layer when `sliding_window` is set
(a key at most `sliding_window - 1` positions before its query is attended to). transformers ignores a
`layer_types` field in a Mistral config (it warns), and so does this toolkit.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from convert.base.archs.llama import FULL_ATTENTION, LAYOUT, SLIDING_ATTENTION, RotaryDecoderConfig, spec

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class MistralConfig(RotaryDecoderConfig):
    """HF's `MistralConfig` (transformers 5)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("mistral",)
    POSITIVE: ClassVar[tuple[str, ...]] = (*RotaryDecoderConfig.POSITIVE, "sliding_window")

    intermediate_size: int = 14336
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = 4096

    @property
    def window(self) -> int | None:
        return self.sliding_window

    @property
    def layer_types(self) -> tuple[str, ...]:
        kind = FULL_ATTENTION if self.sliding_window is None else SLIDING_ATTENTION
        return (kind,) * self.num_hidden_layers


MistralConfig.LAYOUT = LAYOUT  # Llama's names
SPEC = spec("mistral", MistralConfig, ('MistralForCausalLM', 'MistralModel'))
