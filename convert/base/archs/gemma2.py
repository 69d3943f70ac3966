"""Gemma 2 decoders: config, key table (HF `Gemma2ForCausalLM`), source rules.

transformers' Gemma 2 differs from Llama in: RMSNorms that multiply by `1 + weight` (computed in float32), a
norm after each sub-layer as well as before (`post_attention_layernorm`, `pre_feedforward_layernorm`,
`post_feedforward_layernorm`), token embeddings multiplied by sqrt(hidden_size) (rounded to the weights'
dtype), attention scores scaled by `query_pre_attn_scalar ** -0.5` and soft-capped (`attn_logit_softcapping`:
c * tanh(s / c)), soft-capped logits (`final_logit_softcapping`), a GeGLU MLP (`hidden_activation`), and
layers alternating between a sliding window (even layers) and full attention (`layer_types`). Gemma 2 rather
than Gemma 1: it is the one of the two with soft-capping and local/global layers, the features the core needed.
HF never ported Gemma 2 to Flax: the Flax paths are Llama's (`convert.base.archs.llama`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from convert.base.archs.llama import (
    FULL_ATTENTION,
    HF_FLAX_NORM,
    SLIDING_ATTENTION,
    RotaryDecoderConfig,
    layout,
    spec,
)
from convert.base.decoder_layout import Kind, Slot

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class Gemma2Config(RotaryDecoderConfig):
    """HF's `Gemma2Config` (transformers 5)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("gemma2",)
    POSITIVE: ClassVar[tuple[str, ...]] = (*RotaryDecoderConfig.POSITIVE, "sliding_window")
    ALIASES: ClassVar[dict[str, str]] = {**RotaryDecoderConfig.ALIASES, "layer_types": "given_layer_types"}

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    # transformers' Gemma 2 reads hidden_activation; a hidden_act next to it is kept and ignored.
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 0
    eos_token_ids: int | tuple[int, ...] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    given_layer_types: tuple[str, ...] | None = None
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    use_bidirectional_attention: bool | None = None

    @property
    def activation(self) -> str:
        return self.hidden_activation

    @property
    def activation_field(self) -> str:
        return "hidden_activation"

    @property
    def bias_qkv(self) -> bool:
        return self.attention_bias

    @property
    def bias_o(self) -> bool:
        return self.attention_bias

    @property
    def norm_offset(self) -> float:
        return 1.0

    @property
    def sandwich_norms(self) -> bool:
        return True

    @property
    def embedding_multiplier(self) -> float:
        return self.hidden_size ** 0.5

    @property
    def attention_multiplier(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    @property
    def attention_softcap(self) -> float | None:
        return self.attn_logit_softcapping

    @property
    def final_logit_softcap(self) -> float | None:
        return self.final_logit_softcapping

    @property
    def window(self) -> int | None:
        return self.sliding_window

    @property
    def layer_types(self) -> tuple[str, ...]:
        if self.given_layer_types is not None:
            return self.given_layer_types
        return tuple(SLIDING_ATTENTION if (i + 1) % 2 else FULL_ATTENTION for i in range(self.num_hidden_layers))

    def validate(self, where: str) -> None:
        if self.use_bidirectional_attention:
            self._refuse(where, "use_bidirectional_attention", True, "is not supported (a decoder is causal)")
        for name in ("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                self._refuse(where, name, value, "must be positive")
        self._check_divides_hidden(where)
        super().validate(where)


# transformers' Gemma 2 layer: `post_attention_layernorm` is the attention's post norm (Llama's is the MLP's pre
# norm), `pre_feedforward_layernorm` / `post_feedforward_layernorm` wrap the MLP. A composed layer's cross-attention
# is wrapped likewise: `cross_attn_layernorm` before, `post_cross_attn_layernorm` after.
Gemma2Config.LAYOUT = layout("gemma2", (
    ("self_attn_norm", "input_layernorm"), ("self_attn_post_norm", "post_attention_layernorm"),
    ("mlp_norm", "pre_feedforward_layernorm"), ("mlp_post_norm", "post_feedforward_layernorm"),
), cross=(Slot("cross_attn_post_norm", "post_cross_attn_layernorm", "post_cross_attn_layernorm", Kind.RMS_NORM,
               HF_FLAX_NORM),))
SPEC = spec("gemma2", Gemma2Config, ("Gemma2ForCausalLM", "Gemma2Model"), norm_init="zeros")
