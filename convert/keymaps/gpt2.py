"""GPT-2 key table: HF `GPT2LMHeadModel` (PyTorch) <-> HF `FlaxGPT2LMHeadModule`.

GPT-2's Conv1D stores its weight (in, out) and HF's Flax GPT-2 kept its kernels (out, in), so every Conv1D
row is a transpose (`T.LINEAR`) just like a `nn.Linear` row. Source checkpoints may be `GPT2LMHeadModel`
(`transformer.h.0...`) or `GPT2Model` without the prefix (the official `gpt2` repository stores `h.0...`,
`wte.weight`); both are accepted. Old transformers versions saved the causal-mask buffers `attn.bias` /
`attn.masked_bias`, which are dropped. GPT-2 checkpoints have no cross-attention: the composer initialises it.
"""

from __future__ import annotations

from convert.checkpoint import Checkpoint
from convert.configs import GPT2Config
from convert.keymap import KeyMap, Rule, SourceRules, T

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


def adapt_config(config: GPT2Config, checkpoint: Checkpoint) -> GPT2Config:
    """GPT-2 needs no data-dependent config fix: the config is returned unchanged."""
    return config
