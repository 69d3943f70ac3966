"""GPT-2 decoder: config, key table (HF `GPT2LMHeadModel` <-> HF `FlaxGPT2LMHeadModule`), spec.

GPT-2's Conv1D stores its weight (in, out) and HF's Flax GPT-2 kept its kernels (out, in), so every Conv1D
row is a transpose (`T.LINEAR`) just like a `nn.Linear` row. Source checkpoints may be `GPT2LMHeadModel`
(`transformer.h.0...`) or `GPT2Model` without the prefix (the official `gpt2` repository stores `h.0...`,
`wte.weight`); both are accepted. Old transformers versions saved the causal-mask buffers `attn.bias` /
`attn.masked_bias`, which are dropped. GPT-2 checkpoints have no cross-attention: the composer initialises it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from convert.base.configs import HFConfig
from convert.base.keymap import KeyMap, Rule, SourceRules, T
from convert.base.spec import ArchSpec

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class GPT2Config(HFConfig):
    """HF's `GPT2Config` (GPT2LMHeadModel), with cross-attention when composed."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("gpt2",)
    POSITIVE: ClassVar[tuple[str, ...]] = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                                           "cross_attention_hidden_size")
    PROBABILITIES: ClassVar[tuple[str, ...]] = ("resid_pdrop", "embd_pdrop", "attn_pdrop")

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    decoder_start_token_id: int | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    cross_attention_hidden_size: int | None = None

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def num_heads(self) -> int:
        return self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def init_scale(self) -> float:
        return self.initializer_range

    @property
    def max_positions(self) -> int:
        """How many positions the learned position embedding serves."""
        return self.n_positions

    @property
    def has_cross_attention(self) -> bool:
        return self.add_cross_attention

    def as_cross_attending_decoder(self) -> GPT2Config:
        return self.replace(is_decoder=True, add_cross_attention=True)

    def validate(self, where: str) -> None:
        self._check_activation(where, "activation_function")
        if self.n_embd % self.n_head:
            self._refuse(where, "n_head", self.n_head, "does not divide n_embd")
        if self.cross_attention_hidden_size not in (None, self.n_embd):
            # GPT-2's cross-attention projects keys and values from n_embd wide inputs only.
            self._refuse(where, "cross_attention_hidden_size", self.cross_attention_hidden_size,
                         f"is not supported for GPT-2 (must equal n_embd={self.n_embd} or be unset)")


# ----------------------------------------------------------------------------------------------------------
# Key table

_MODEL = ("transformer.", "transformer/")
_BLOCK = ("transformer.h.{i}.", "transformer/h/{i}/")

# (PyTorch parameter, Flax parameter, transform) of each kind of module.
_CONV1D = (("weight", "kernel", T.LINEAR), ("bias", "bias", T.IDENTITY))  # torch [in, out] <-> flax [out, in]
_NORM = (("weight", "scale", T.NORM), ("bias", "bias", T.IDENTITY))
_EMBED = (("weight", "embedding", T.EMBED),)


def _rows(prefix: tuple[str, str], module: str, params: tuple[tuple[str, str, T], ...]) -> tuple[Rule, ...]:
    """Rules for one module; `module` is dotted (`attn.c_attn`), its Flax path `/`-joined."""
    torch_prefix, flax_prefix = prefix
    flax_module = module.replace(".", "/")
    return tuple(Rule(f"{torch_prefix}{module}.{p}", f"{flax_prefix}{flax_module}/{f}", t) for p, f, t in params)


_MODULES = (
    (_MODEL, "wte", _EMBED),  # [V, D]
    (_MODEL, "wpe", _EMBED),  # [n_positions, D]
    (_MODEL, "ln_f", _NORM),
    (_BLOCK, "ln_1", _NORM),
    (_BLOCK, "attn.c_attn", _CONV1D),  # [D, 3D]: queries, keys, values side by side
    (_BLOCK, "attn.c_proj", _CONV1D),
    (_BLOCK, "ln_cross_attn", _NORM),  # add_cross_attention only
    (_BLOCK, "crossattention.q_attn", _CONV1D),  # [D, D]
    (_BLOCK, "crossattention.c_attn", _CONV1D),  # [D, 2D]: keys, values of the encoder output
    (_BLOCK, "crossattention.c_proj", _CONV1D),
    (_BLOCK, "ln_2", _NORM),
    (_BLOCK, "mlp.c_fc", _CONV1D),
    (_BLOCK, "mlp.c_proj", _CONV1D),
)

KEYMAP = KeyMap("gpt2", (
    *(rule for prefix, module, params in _MODULES for rule in _rows(prefix, module, params)),
    Rule("lm_head.weight", "lm_head/kernel", T.LINEAR),  # a plain nn.Linear [V, D]; untied heads only
))

# Flax paths the composer may initialise: GPT-2 checkpoints are pretrained without cross-attention.
INITIALIZABLE: tuple[str, ...] = (
    r"transformer/h/\d+/crossattention/(q_attn|c_attn|c_proj)/(kernel|bias)\Z",
    r"transformer/h/\d+/ln_cross_attn/(scale|bias)\Z",
)

_WTE = "transformer.wte.weight"
_MASK_BUFFERS = r"(transformer\.)?h\.\d+\.(attn|crossattention)\.(bias|masked_bias)\Z"


def source_rules(config: GPT2Config) -> SourceRules:
    """Raw GPT-2 checkpoint names (`GPT2LMHeadModel` or prefix-less `GPT2Model`) -> `GPT2LMHeadModel` names."""
    drops = [(_MASK_BUFFERS, "causal-mask buffer saved by old transformers versions, not a weight")]
    if config.tie_word_embeddings:
        drops.append((r"lm_head\.weight\Z", f"tied to {_WTE}"))
    return SourceRules(
        renames=((r"^(wte|wpe|h|ln_f)\.", r"transformer.\1."),),  # GPT2Model checkpoints carry no prefix
        drops=tuple(drops),
    )


def flax_source_rules(config: GPT2Config) -> SourceRules:
    """Raw Flax msgpack paths (`FlaxGPT2LMHeadModel` or prefix-less `FlaxGPT2Model`) -> our Flax paths."""
    return SourceRules(renames=((r"^(wte|wpe|h|ln_f)/", r"transformer/\1/"),))


def tied_keys(config: GPT2Config) -> dict[str, str]:
    """{"lm_head.weight": the token embedding} when the LM head is tied, else {}."""
    return {"lm_head.weight": _WTE} if config.tie_word_embeddings else {}


SPEC = ArchSpec(
    name="gpt2",
    role="decoder",
    config_class=GPT2Config,
    keymap=KEYMAP,
    source_rules=source_rules,
    flax_source_rules=flax_source_rules,
    tied_keys=tied_keys,
    initializable=INITIALIZABLE,
    groups=(("cross-attention", (r"transformer/h/\d+/(crossattention|ln_cross_attn)/.*",)),),
    causal_lm=True,
    fan_in_fan_out=(r"transformer\.h\.\d+\.(attn|crossattention|mlp)\.\w+\.weight",),  # Conv1D: [in, out]
    flax_class="flax_model.gpt2:GPT2LMHeadModule",
    torch_class="torch_reference.gpt2:GPT2LMHeadModel",
    fixtures="scripts.fixtures_gpt2",
    layer_stack=("n_layer", "transformer/h/"),
    hf_classes=("GPT2LMHeadModel", "GPT2Model"),
)
