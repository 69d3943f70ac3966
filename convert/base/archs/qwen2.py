"""Qwen2 / Qwen2.5 decoders: config, key table (HF `Qwen2ForCausalLM`), source rules.

transformers' Qwen2 is Llama with biases on the query, key and value projections (none on the output
projection or the MLP, whatever the config says) and an optional sliding window on the layers from
`max_window_layers` on (`use_sliding_window`), or on those `layer_types` names. HF never ported Qwen2 to Flax:
the Flax paths are Llama's (`convert.base.archs.llama`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from convert.base.archs.llama import FULL_ATTENTION, LAYOUT, SLIDING_ATTENTION, RotaryDecoderConfig, spec

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class Qwen2Config(RotaryDecoderConfig):
    """HF's `Qwen2Config` (transformers 5)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen2",)
    POSITIVE: ClassVar[tuple[str, ...]] = (*RotaryDecoderConfig.POSITIVE, "sliding_window")
    ALIASES: ClassVar[dict[str, str]] = {**RotaryDecoderConfig.ALIASES, "layer_types": "given_layer_types"}

    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: int | None = 32
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: int | tuple[int, ...] | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    given_layer_types: tuple[str, ...] | None = None

    @property
    def bias_qkv(self) -> bool:
        return True

    @property
    def window(self) -> int | None:
        # transformers' Qwen2Config: the window is unset unless use_sliding_window.
        return self.sliding_window if self.use_sliding_window else None

    @property
    def layer_types(self) -> tuple[str, ...]:
        if self.given_layer_types is not None:
            return self.given_layer_types
        return tuple(SLIDING_ATTENTION if self.window is not None and i >= self.max_window_layers else FULL_ATTENTION
                     for i in range(self.num_hidden_layers))


Qwen2Config.LAYOUT = LAYOUT  # Llama's names
SPEC = spec("qwen2", Qwen2Config, ('Qwen2ForCausalLM', 'Qwen2Model'))
