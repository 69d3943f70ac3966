"""BART / mBART decoder key table: HF `BartForCausalLM` (PyTorch) <-> HF `FlaxBartForCausalLMModule`.

Source checkpoints may also be `BartForConditionalGeneration` or `BartModel` (with or without the `model.`
prefix) and their mBART twins: the text encoder is dropped, `model.shared.weight` stands in for the decoder's
token embedding (transformers 5 stores only it when embeddings are tied), and a non-zero `final_logits_bias`
becomes the LM head's bias.
"""

from __future__ import annotations

import numpy as np

from convert.checkpoint import Checkpoint
from convert.configs import BartConfig
from convert.keymap import KeyMap, Rule, SourceRules, T

_DECODER = ("model.decoder.", "model/decoder/")
_LAYER = ("model.decoder.layers.{i}.", "model/decoder/layers/{i}/")

# (PyTorch parameter, Flax parameter, transform) of each kind of module.
_LINEAR = (("weight", "kernel", T.LINEAR), ("bias", "bias", T.IDENTITY))
_NORM = (("weight", "scale", T.NORM), ("bias", "bias", T.IDENTITY))
_EMBED = (("weight", "embedding", T.EMBED),)


def _rows(prefix: tuple[str, str], module: str, params: tuple[tuple[str, str, T], ...]) -> tuple[Rule, ...]:
    """Rules for one module; `module` is dotted (`self_attn.q_proj`), its Flax path `/`-joined."""
    torch_prefix, flax_prefix = prefix
    flax_module = module.replace(".", "/")
    return tuple(Rule(f"{torch_prefix}{module}.{p}", f"{flax_prefix}{flax_module}/{f}", t) for p, f, t in params)


_MODULES = (
    (_DECODER, "embed_tokens", _EMBED),
    (_DECODER, "embed_positions", _EMBED),  # [max_position_embeddings + 2, D]
    (_DECODER, "layernorm_embedding", _NORM),
    (_DECODER, "layer_norm", _NORM),  # mBART only
    *((_LAYER, f"{attn}.{proj}", _LINEAR)
      for attn in ("self_attn", "encoder_attn") for proj in ("q_proj", "k_proj", "v_proj", "out_proj")),
    (_LAYER, "self_attn_layer_norm", _NORM),
    (_LAYER, "encoder_attn_layer_norm", _NORM),
    (_LAYER, "fc1", _LINEAR),
    (_LAYER, "fc2", _LINEAR),
    (_LAYER, "final_layer_norm", _NORM),
)

KEYMAP = KeyMap("bart", (
    *(rule for prefix, module, params in _MODULES for rule in _rows(prefix, module, params)),
    Rule("lm_head.weight", "lm_head/kernel", T.LINEAR),  # untied heads only
    # BartForConditionalGeneration's [1, V] buffer; kept as the LM head's bias when it is not all zeros.
    Rule("final_logits_bias", "lm_head/bias", T.ROW),
))

INITIALIZABLE: tuple[str, ...] = ()  # every BART decoder layer has cross-attention weights in the checkpoint

_EMBED_TOKENS = "model.decoder.embed_tokens.weight"
_FINAL_LOGITS_BIAS = "final_logits_bias"


def source_rules(config: BartConfig) -> SourceRules:
    """Raw BART / mBART checkpoint names -> `BartForCausalLM` names, for a config passed through `adapt_config`."""
    drops = [(r"(model\.)?encoder\.", "the text encoder is not used (a speech encoder takes its place)")]
    if config.tie_word_embeddings:
        drops.append((r"lm_head\.weight\Z", f"tied to {_EMBED_TOKENS}"))
    if not config.lm_head_bias:
        drops.append((rf"{_FINAL_LOGITS_BIAS}\Z", "all zeros (adds nothing to the logits)"))
    return SourceRules(
        renames=(
            (r"^(decoder|encoder|shared)\.", r"model.\1."),  # BartModel checkpoints carry no `model.` prefix
            (r"^model\.shared\.weight\Z", _EMBED_TOKENS),  # duplicates the decoder embedding, or stands in for it
        ),
        drops=tuple(drops),
    )


def tied_keys(config: BartConfig) -> dict[str, str]:
    """{"lm_head.weight": the decoder embedding} when the LM head is tied, else {}."""
    return {"lm_head.weight": _EMBED_TOKENS} if config.tie_word_embeddings else {}


def adapt_config(config: BartConfig, checkpoint: Checkpoint) -> BartConfig:
    """Sets `lm_head_bias` when the checkpoint has a non-zero `final_logits_bias` (or a Flax `lm_head/bias`)."""
    if config.lm_head_bias:
        return config
    if "lm_head/bias" in checkpoint:
        return config.replace(lm_head_bias=True)
    if _FINAL_LOGITS_BIAS in checkpoint and np.any(checkpoint.get(_FINAL_LOGITS_BIAS)):
        return config.replace(lm_head_bias=True)
    return config
