"""Llama decoders (Llama 2/3.x, SmolLM2, TinyLlama): config, key table (HF `LlamaForCausalLM` <-> HF
`FlaxLlamaForCausalLMModule`), source rules.

The config class here also carries what every rotary decoder of this toolkit shares (Qwen2, Mistral and Gemma 2
derive from it, as transformers' modular files derive them from Llama): grouped-query attention
(`num_key_value_heads`), an explicit `head_dim`, RMSNorm, a gated MLP, rotary positions (`convert.base.rope`) and
the token ids. Its properties say what a family computes in the words of the decoder core (`bias_qkv`,
`layer_windows`, `norm_offset`, ...), so that a family is a config and a key table.

Composed, a decoder gets cross-attention in every layer, which no transformers class of these families has:
`model.layers.{i}.cross_attn.{q,k,v,o}_proj` (the names of transformers' Mllama cross-attention) after a norm
`model.layers.{i}.cross_attn_layernorm`, between the self-attention and the MLP; the composer creates them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from convert.base.configs import HFConfig
from convert.base.keymap import KeyMap, Rule, SourceRules, T
from convert.base.rope import RopeSettings, inverse_frequencies, rope_settings

# ----------------------------------------------------------------------------------------------------------
# Config

class FrozenDict(dict):
    """A JSON object kept in a frozen config: equal as a dict, hashable, and refusing changes (configs are hashed
    as static arguments of compiled functions, so a rotary setting must take part in their equality)."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self.items())))

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a config's JSON object cannot be changed; use config.replace(...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def frozen(value: Any) -> Any:
    """`value` with every JSON object in it a `FrozenDict` (lists as tuples)."""
    if isinstance(value, Mapping):
        return FrozenDict({k: frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    return value


FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class RotaryDecoderConfig(HFConfig):
    """The fields transformers' Llama-derived configs share (their names, Llama's defaults) and what the decoder
    core asks of them. Families override the defaults and the properties that differ."""

    POSITIVE: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "cross_attention_hidden_size",
    )
    PROBABILITIES: ClassVar[tuple[str, ...]] = ("attention_dropout",)
    ALIASES: ClassVar[dict[str, str]] = {"eos_token_id": "eos_token_ids"}

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    # Rotary settings as config.json holds them (see convert.base.rope); JSON objects are kept hashable.
    rope_parameters: Any = None
    rope_scaling: Any = None
    rope_theta: float | None = None
    partial_rotary_factor: float | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_ids: int | tuple[int, ...] | None = 2
    decoder_start_token_id: int | None = None
    # Ours, set when composed (transformers' classes of these families have no cross-attention).
    is_decoder: bool = False
    add_cross_attention: bool = False
    cross_attention_hidden_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("rope_parameters", "rope_scaling"):
            object.__setattr__(self, name, frozen(getattr(self, name)))

    def to_hf_dict(self) -> dict[str, Any]:
        out = super().to_hf_dict()
        for name in ("rope_parameters", "rope_scaling"):
            if isinstance(out.get(name), dict):
                out[name] = _thawed(out[name])
        return out

    # -- the decoder core's view -----------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def activation(self) -> str:
        return self.hidden_act

    @property
    def activation_field(self) -> str:
        """The config field that names the MLP's activation (for messages)."""
        return "hidden_act"

    @property
    def bias_qkv(self) -> bool:
        return False

    @property
    def bias_o(self) -> bool:
        return False

    @property
    def bias_mlp(self) -> bool:
        return False

    @property
    def norm_offset(self) -> float:
        """RMSNorm multiplies by `norm_offset + weight` (Gemma: 1 + weight, weights start at 0)."""
        return 0.0

    @property
    def sandwich_norms(self) -> bool:
        """Whether each sub-layer's output is normed too before the residual add (Gemma 2)."""
        return False

    @property
    def embedding_multiplier(self) -> float | None:
        """What the token embeddings are multiplied by (Gemma: sqrt(hidden_size)), or None."""
        return None

    @property
    def attention_multiplier(self) -> float:
        """What the attention scores q.k are multiplied by."""
        return self.head_size ** -0.5

    @property
    def attention_softcap(self) -> float | None:
        return None

    @property
    def final_logit_softcap(self) -> float | None:
        return None

    @property
    def layer_types(self) -> tuple[str, ...]:
        return (FULL_ATTENTION,) * self.num_hidden_layers

    @property
    def window(self) -> int | None:
        """The sliding window of the `sliding_attention` layers (keys at most `window - 1` positions back)."""
        return None

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window, None for full attention."""
        return tuple(self.window if t == SLIDING_ATTENTION else None for t in self.layer_types)

    @property
    def rope(self) -> RopeSettings:
        return rope_settings(self.rope_parameters, self.rope_scaling, self.rope_theta, self.partial_rotary_factor,
                             self.max_position_embeddings, "config.json")

    def rotary_frequencies(self) -> tuple[np.ndarray, float]:
        """(inv_freq [head_size // 2] float32, the factor on cos/sin), as transformers computes them."""
        return inverse_frequencies(self.rope, self.head_size)

    # -- what the composed model asks (DecoderConfig) --------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (Llama 3 configs list several; generation reads them all from the
        generation config)."""
        ids = self.eos_token_ids
        return ids[0] if isinstance(ids, tuple) and ids else ids if isinstance(ids, int) else None

    @property
    def init_scale(self) -> float:
        return self.initializer_range

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def has_cross_attention(self) -> bool:
        return self.add_cross_attention

    def as_cross_attending_decoder(self) -> RotaryDecoderConfig:
        return self.replace(is_decoder=True, add_cross_attention=True)

    def as_causal_lm(self) -> RotaryDecoderConfig:
        """The same decoder without the cross-attention the composer gave it: what transformers' `...ForCausalLM`
        of the family reads (`convert.extract`)."""
        return self.replace(is_decoder=False, add_cross_attention=False)

    # -- refusals --------------------------------------------------------------------------------------------

    def validate(self, where: str) -> None:
        self._check_activation(where, self.activation_field)
        if self.num_attention_heads % self.num_kv_heads:
            self._refuse(where, "num_key_value_heads", self.num_key_value_heads,
                         f"does not divide num_attention_heads={self.num_attention_heads}")
        if self.head_size % 2:
            self._refuse(where, "head_dim", self.head_size, "is odd (rotary positions rotate pairs of features)")
        if self.cross_attention_hidden_size not in (None, self.hidden_size):
            self._refuse(where, "cross_attention_hidden_size", self.cross_attention_hidden_size,
                         f"is not supported (must equal hidden_size={self.hidden_size} or be unset)")
        if isinstance(self.eos_token_ids, tuple) and not self.eos_token_ids:
            self._refuse(where, "eos_token_id", [], "is an empty list")
        rope_settings(self.rope_parameters, self.rope_scaling, self.rope_theta, self.partial_rotary_factor,
                      self.max_position_embeddings, where)
        types = self.layer_types
        if SLIDING_ATTENTION in types and self.window is not None and self.window < 1:
            self._refuse(where, "sliding_window", self.window, "must be at least 1")
        if len(types) != self.num_hidden_layers:
            self._refuse(where, "layer_types", list(types), f"has {len(types)} entries for "
                         f"num_hidden_layers={self.num_hidden_layers}")
        bad = sorted({t for t in types if t not in (FULL_ATTENTION, SLIDING_ATTENTION)})
        if bad:
            self._refuse(where, "layer_types", bad[0], f"is not supported (supported: {FULL_ATTENTION}, "
                         f"{SLIDING_ATTENTION})")

    def _check_divides_hidden(self, where: str) -> None:
        # LlamaConfig / Gemma2Config.validate_architecture: transformers refuses such a config even with head_dim.
        if self.hidden_size % self.num_attention_heads:
            self._refuse(where, "num_attention_heads", self.num_attention_heads,
                         f"does not divide hidden_size={self.hidden_size}")


def _thawed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _thawed(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class LlamaConfig(RotaryDecoderConfig):
    """HF's `LlamaConfig` (transformers 5): optional biases on every attention projection and on the MLP."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("llama",)

    attention_bias: bool = False
    mlp_bias: bool = False
    pretraining_tp: int | None = 1  # ignored by transformers 5 (a tensor-parallel split of the same sums)

    @property
    def bias_qkv(self) -> bool:
        return self.attention_bias

    @property
    def bias_o(self) -> bool:
        return self.attention_bias

    @property
    def bias_mlp(self) -> bool:
        return self.mlp_bias

    def validate(self, where: str) -> None:
        self._check_divides_hidden(where)
        super().validate(where)


# ----------------------------------------------------------------------------------------------------------
# Key table

_MODEL = ("model.", "model/")
_LAYER = ("model.layers.{i}.", "model/layers/{i}/")

# (PyTorch parameter, Flax parameter, transform) of each kind of module. HF's Flax Llama names its RMSNorm
# scale `weight`; Qwen2 and Gemma 2, never ported to Flax by HF, follow it.
LINEAR = (("weight", "kernel", T.LINEAR), ("bias", "bias", T.IDENTITY))
RMS_NORM = (("weight", "weight", T.NORM),)
EMBED = (("weight", "embedding", T.EMBED),)


def rows(prefix: tuple[str, str], module: str, params: tuple[tuple[str, str, T], ...]) -> tuple[Rule, ...]:
    """Rules for one module; `module` is dotted (`self_attn.q_proj`), its Flax path `/`-joined."""
    torch_prefix, flax_prefix = prefix
    flax_module = module.replace(".", "/")
    return tuple(Rule(f"{torch_prefix}{module}.{p}", f"{flax_prefix}{flax_module}/{f}", t) for p, f, t in params)


def keymap(name: str, layer_norms: tuple[str, ...]) -> KeyMap:
    """A Llama-family key table whose layers have the RMSNorms `layer_norms` (besides the cross-attention's)."""
    modules = (
        (_MODEL, "embed_tokens", EMBED),  # [V, D]
        *((_LAYER, f"{attn}.{proj}", LINEAR)
          for attn in ("self_attn", "cross_attn") for proj in ("q_proj", "k_proj", "v_proj", "o_proj")),
        *((_LAYER, norm, RMS_NORM) for norm in (*layer_norms, "cross_attn_layernorm")),
        *((_LAYER, f"mlp.{proj}", LINEAR) for proj in ("gate_proj", "up_proj", "down_proj")),
        (_MODEL, "norm", RMS_NORM),
    )
    return KeyMap(name, (
        *(rule for prefix, module, params in modules for rule in rows(prefix, module, params)),
        Rule("lm_head.weight", "lm_head/kernel", T.LINEAR),  # [V, D]; untied heads only
    ))


KEYMAP = keymap("llama", ("input_layernorm", "post_attention_layernorm"))

# Flax paths the composer may create: the cross-attention no source of these families has.
INITIALIZABLE: tuple[str, ...] = (
    r"model/layers/\d+/cross_attn/(q_proj|k_proj|v_proj|o_proj)/(kernel|bias)\Z",
    r"model/layers/\d+/cross_attn_layernorm/weight\Z",
)

EMBED_TOKENS = "model.embed_tokens.weight"


def source_rules(config: RotaryDecoderConfig) -> SourceRules:
    """Raw checkpoint names (`...ForCausalLM`, or a prefix-less `...Model`) -> `...ForCausalLM` names."""
    drops = [(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq\Z",
              "rotary inverse frequencies saved by old transformers versions; computed from the config")]
    if config.tie_word_embeddings:
        drops.append((r"lm_head\.weight\Z", f"tied to {EMBED_TOKENS}"))
    return SourceRules(renames=((r"^(embed_tokens|layers|norm)\.", r"model.\1."),), drops=tuple(drops))


def flax_source_rules(config: RotaryDecoderConfig) -> SourceRules:
    """Raw Flax msgpack paths (`Flax...ForCausalLM` or a prefix-less `Flax...Model`) -> our Flax paths."""
    return SourceRules(renames=((r"^(embed_tokens|layers|norm)/", r"model/\1/"),))


def tied_keys(config: RotaryDecoderConfig) -> dict[str, str]:
    """{"lm_head.weight": the token embedding} when the LM head is tied, else {}."""
    return {"lm_head.weight": EMBED_TOKENS} if config.tie_word_embeddings else {}
