"""Llama decoders (Llama 2/3.x, SmolLM2, TinyLlama): config, layout (HF `LlamaForCausalLM` <-> HF
`FlaxLlamaForCausalLMModule`), key table, source rules, spec; and what the other rotary families share.

`RotaryDecoderConfig` carries what every rotary decoder of this toolkit shares (Qwen2, Mistral and Gemma 2 derive
from it, as transformers' modular files derive them from Llama): grouped-query attention (`num_key_value_heads`), an
explicit `head_dim`, RMSNorm, a gated MLP, rotary positions (`convert.base.rope`) and the token ids. Its properties
say what a family computes (`bias_qkv`, `layer_windows`, `norm_offset`, ...) and `decoder_core()` turns them into
the decoder core's description: a family is a config, a layout and a spec, on the core's modules
(`flax_model.decoder`, `torch_reference.decoder`).

Composed, a decoder gets cross-attention in every layer, which no transformers class of these families has: after
the self-attention block, `model.layers.{i}.cross_attn.{q,k,v,o}_proj` (the names of transformers' Mllama
cross-attention; keys and values with the self-attention's `num_key_value_heads`) normalised before by
`model.layers.{i}.cross_attn_layernorm` (Gemma 2: and after by `post_cross_attn_layernorm`). The composer creates
them as transformers' initialiser would (kernels from N(0, `initializer_range`), biases 0, norm weights at the
value that makes the norm a plain RMSNorm: 1, and 0 for Gemma's `1 + weight`). Without an encoder output the
cross-attention is skipped: the decoder then computes exactly what transformers' `...ForCausalLM` computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from convert.base.configs import HFConfig
from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import CROSS_ATTENTION_SLOTS, DecoderLayout, Kind, Slot, cross_attention_slots
from convert.base.keymap import SourceRules
from convert.base.rope import RopeSettings, inverse_frequencies, rope_settings
from convert.base.spec import ArchSpec

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

    def __copy__(self) -> FrozenDict:  # immutable: a copy is itself
        return self

    def __deepcopy__(self, memo: dict) -> FrozenDict:
        return self

    def __reduce__(self) -> tuple:  # pickled through the constructor, not item by item
        return FrozenDict, (dict(self),)


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
    LAYOUT: ClassVar[DecoderLayout]  # where the core's parameters sit: each family sets its own below its config

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

    def decoder_core(self) -> DecoderCore:
        """Pre-norm layers of RMSNorm, grouped-query attention with rotary positions, a gated MLP, a final norm."""
        multiplier = self.embedding_multiplier
        return DecoderCore(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads, head_dim=self.head_size, intermediate_size=self.intermediate_size,
            num_kv_heads=self.num_kv_heads, cross_num_kv_heads=self.num_kv_heads, padding_idx=self.pad_token_id,
            embed_scale=multiplier, positions="rotary",
            max_positions=self.max_position_embeddings, rope=self.rope, norm="rms", norm_eps=self.rms_norm_eps,
            norm_offset=self.norm_offset, pre_norm=True, post_block_norm=self.sandwich_norms,
            qkv_bias=self.bias_qkv, out_bias=self.bias_o, score_scale=self.attention_multiplier,
            attn_logit_softcap=self.attention_softcap, sliding_window=self.window,
            sliding_layers=tuple(t == SLIDING_ATTENTION for t in self.layer_types),
            cross_attention=self.add_cross_attention, activation=self.activation, gated_mlp=True,
            mlp_bias=self.bias_mlp, final_norm=True, tie_word_embeddings=self.tie_word_embeddings,
            final_logit_softcap=self.final_logit_softcap, attention_dropout=self.attention_dropout,
            init_scale=self.initializer_range)

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
# Layout (HF `LlamaForCausalLM` <-> HF `FlaxLlamaForCausalLMModule`), key table, source rules, spec

# HF's Flax Llama names its RMSNorm scale `weight`; Qwen2 and Gemma 2, never ported to Flax by HF, follow it.
HF_FLAX_NORM = (("weight", "weight"),)


def layout(name: str, norms: tuple[tuple[str, str], ...], cross: tuple[Slot, ...] = ()) -> DecoderLayout:
    """A Llama-family layout: `model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`; each layer's
    `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` and the RMSNorms `norms` ((core slot, module name)
    pairs), in the order transformers registers them; then the cross-attention a composed model adds
    (`cross_attn.*_proj`, `cross_attn_layernorm`, and `cross`)."""
    def rms(slot: str, module: str) -> Slot:
        return Slot(slot, module, module.replace(".", "/"), Kind.RMS_NORM, HF_FLAX_NORM)

    def linear(slot: str, module: str) -> Slot:
        return Slot(slot, module, module.replace(".", "/"), Kind.LINEAR)

    return DecoderLayout(name, top=(
        Slot("embed_tokens", "model.embed_tokens", "model/embed_tokens", Kind.EMBED),  # [V, D]
        Slot("layers", "model.layers", "model/layers", Kind.STACK),
        rms("final_norm", "model.norm"),
        Slot("head", "lm_head", "lm_head", Kind.HEAD),  # [V, D]; untied heads only
    ), layer=(
        *(linear(f"self_attn.{p}", f"self_attn.{p}_proj") for p in ("q", "k", "v", "o")),  # q: [N H, D]; k, v: [K H, D]
        *(linear(f"mlp.{p}", f"mlp.{p}_proj") for p in ("gate", "up", "down")),
        *(rms(slot, module) for slot, module in norms),
        *cross_attention_slots(Kind.RMS_NORM, HF_FLAX_NORM),
        *cross,
    ))


LAYOUT = layout("llama", (("self_attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")))
LlamaConfig.LAYOUT = LAYOUT
KEYMAP = LAYOUT.keymap()

EMBED_TOKENS = "model.embed_tokens.weight"


def cross_attention(family: DecoderLayout) -> tuple[str, ...]:
    """The cross-attention slots of a family's layout (what the composer creates)."""
    return tuple(s for s in CROSS_ATTENTION_SLOTS if s in family.slots)


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
    return type(config).LAYOUT.tied_keys(config.decoder_core())


def spec(name: str, config_class: type[RotaryDecoderConfig], hf_classes: tuple[str, ...],
         norm_init: str = "ones") -> ArchSpec:
    """The spec of a rotary decoder family: the core's modules, the family's layout; transformers' class has no
    cross-attention (`hf_cross_attention=False`), so a composed model is read back by this toolkit and its decoder
    by transformers after `convert.extract`. `norm_init`: the value created RMSNorm weights start at (transformers'
    initialiser: 1, and 0 where the norm multiplies by `1 + weight`)."""
    family = config_class.LAYOUT
    cross = cross_attention(family)
    return ArchSpec(
        name=name, role="decoder", config_class=config_class, keymap=family.keymap(), source_rules=source_rules,
        flax_source_rules=flax_source_rules, tied_keys=tied_keys, initializable=family.flax_patterns(cross),
        groups=(("cross-attention", family.module_patterns(cross)),), causal_lm=True,
        flax_class="flax_model.decoder:CausalLM", torch_class="torch_reference.decoder:CausalLM",
        fixtures=f"scripts.fixtures_{name}", layer_stack=("num_hidden_layers", "model/layers/"),
        hf_classes=hf_classes, hf_cross_attention=False, init_rules=((r".*norm/weight\Z", norm_init),))


SPEC = spec("llama", LlamaConfig, ("LlamaForCausalLM", "LlamaModel"))
