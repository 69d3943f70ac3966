"""Tiny seeded BART / mBART checkpoints in Hugging Face format, built from `torch_reference.bart`.

Cases:
    bart_causal  BartForCausalLM keys, safetensors, tied head (the LM head omitted, as HF's safe serialization does).
    bart_cg      BartForConditionalGeneration, pytorch_model.bin: model.shared, a text encoder, model.decoder.*,
                 lm_head.weight and an all-zero final_logits_bias. Same decoder as bart_causal.
    bart_cg_tf5  The same model as transformers 5 (and 4's safetensors) store it: only model.shared.weight
                 holds the tied embeddings. Same decoder as bart_causal.
    bart_bias    BartForConditionalGeneration with a non-zero final_logits_bias (safetensors, shared only).
    bart_untied  BartForCausalLM with tie_word_embeddings=false and its own lm_head.weight (relu).
    mbart        MBartForCausalLM: pre-norm layers, final layer_norm, scale_embedding, two safetensors shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convert.base.archs.bart import BartConfig
from scripts.fixture_io import save_hf_checkpoint
from torch_reference.bart import BartForCausalLM

SEED = 20240611
# Embeddings (and so a tied LM head) drawn wide, so that the logits' argmax changes along a sequence.
EMBED_STD = 0.5

_TINY = dict(
    vocab_size=96,
    max_position_embeddings=64,
    d_model=32,
    decoder_layers=2,
    decoder_attention_heads=4,
    decoder_ffn_dim=64,
    encoder_layers=1,
    encoder_attention_heads=4,
    encoder_ffn_dim=64,
)


def hf_config(model_type: str = "bart", architecture: str = "BartForCausalLM", **overrides: Any) -> dict[str, Any]:
    """A full HF-style config.json dict for a tiny BART / mBART."""
    causal = architecture.endswith("ForCausalLM")
    config = dict(
        _TINY,
        model_type=model_type,
        architectures=[architecture],
        activation_dropout=0.0,
        activation_function="gelu",
        attention_dropout=0.0,
        dropout=0.1,
        classifier_dropout=0.0,
        decoder_layerdrop=0.0,
        encoder_layerdrop=0.0,
        init_std=0.02,
        scale_embedding=model_type == "mbart",
        tie_word_embeddings=True,
        is_encoder_decoder=not causal,
        is_decoder=causal,
        add_cross_attention=causal,
        num_hidden_layers=_TINY["encoder_layers"],
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        use_cache=True,
        torch_dtype="float32",
        transformers_version="4.46.0",
    )
    if model_type == "bart":
        config.update(add_bias_logits=False, add_final_layer_norm=False, normalize_before=False, forced_bos_token_id=0)
    config.update(overrides)
    return config


def randomise_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Draws every parameter (LayerNorm scales and biases and positions included) from `generator`."""
    seen: set[int] = set()

    def draw(p: torch.Tensor, scale: float, shift: float = 0.0) -> None:
        if id(p) not in seen:  # a tied LM head shares the embedding's Parameter
            seen.add(id(p))
            p.copy_(shift + scale * torch.randn(p.shape, generator=generator))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                draw(module.weight, 0.2, shift=1.0)
                draw(module.bias, 0.1)
            elif isinstance(module, nn.Embedding):
                draw(module.weight, EMBED_STD)
            elif isinstance(module, nn.Linear):
                draw(module.weight, EMBED_STD if module.out_features == model.config.vocab_size
                     else 1.0 / math.sqrt(module.in_features))
                if module.bias is not None:
                    draw(module.bias, 0.1)
    return model


def build_decoder(config: dict[str, Any], seed: int = SEED, bias_std: float = 0.0) -> BartForCausalLM:
    """The reference decoder of `config`, every parameter drawn from `seed`; a non-zero `bias_std` draws
    a final_logits_bias too."""
    cfg = BartConfig.from_hf_dict(config).replace(lm_head_bias=bias_std > 0)
    generator = torch.Generator().manual_seed(seed)
    model = randomise_(BartForCausalLM(cfg), generator)
    if bias_std > 0:
        with torch.no_grad():
            model.final_logits_bias.copy_(bias_std * torch.randn(model.final_logits_bias.shape, generator=generator))
    return model.eval()


def text_encoder_state(config: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors with the names and shapes of HF's BART / mBART text encoder (`model.encoder.*`)."""
    d, ffn, vocab = config["d_model"], config["encoder_ffn_dim"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (vocab, d),
        "embed_positions.weight": (config["max_position_embeddings"] + 2, d),
    }
    for i in range(config["encoder_layers"]):
        layer = f"layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes.update({f"{layer}self_attn.{proj}.weight": (d, d), f"{layer}self_attn.{proj}.bias": (d,)})
        shapes.update({
            f"{layer}self_attn_layer_norm.weight": (d,), f"{layer}self_attn_layer_norm.bias": (d,),
            f"{layer}fc1.weight": (ffn, d), f"{layer}fc1.bias": (ffn,),
            f"{layer}fc2.weight": (d, ffn), f"{layer}fc2.bias": (d,),
            f"{layer}final_layer_norm.weight": (d,), f"{layer}final_layer_norm.bias": (d,),
        })
    shapes.update({"layernorm_embedding.weight": (d,), "layernorm_embedding.bias": (d,)})
    if config["model_type"] == "mbart":
        shapes.update({"layer_norm.weight": (d,), "layer_norm.bias": (d,)})
    return {f"model.encoder.{k}": 0.1 * torch.randn(s, generator=generator) for k, s in shapes.items()}


def conditional_generation_state(config: dict[str, Any], decoder: BartForCausalLM) -> dict[str, torch.Tensor]:
    """`BartForConditionalGeneration` keys in HF's order, every copy of the tied embedding written out."""
    state = decoder.state_dict()
    embed = state["model.decoder.embed_tokens.weight"]
    bias = state.get("final_logits_bias", torch.zeros(1, config["vocab_size"]))
    encoder = text_encoder_state(config, torch.Generator().manual_seed(SEED + 1))
    encoder["model.encoder.embed_tokens.weight"] = embed
    decoder_keys = {k: v for k, v in state.items() if k.startswith("model.decoder.")}
    return {"final_logits_bias": bias, "model.shared.weight": embed, **encoder, **decoder_keys,
            "lm_head.weight": state["lm_head.weight"]}


# The tied copies of model.shared.weight that HF leaves out of safetensors files (and transformers 5 always).
_TIED_COPIES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")


def bart_causal(directory: Path) -> None:
    config = hf_config()
    save_hf_checkpoint(directory, build_decoder(config).state_dict(), config, omit=["lm_head.weight"])


def bart_cg(directory: Path) -> None:
    config = hf_config(architecture="BartForConditionalGeneration")
    state = conditional_generation_state(config, build_decoder(config))
    save_hf_checkpoint(directory, state, config, fmt="bin")


def bart_cg_tf5(directory: Path) -> None:
    config = hf_config(architecture="BartForConditionalGeneration", transformers_version="5.0.0")
    state = conditional_generation_state(config, build_decoder(config))
    save_hf_checkpoint(directory, state, config, omit=_TIED_COPIES)


def bart_bias(directory: Path) -> None:
    config = hf_config(architecture="BartForConditionalGeneration")
    state = conditional_generation_state(config, build_decoder(config, seed=SEED + 2, bias_std=1.0))
    save_hf_checkpoint(directory, state, config, omit=_TIED_COPIES)


def bart_untied(directory: Path) -> None:
    config = hf_config(tie_word_embeddings=False, activation_function="relu")
    save_hf_checkpoint(directory, build_decoder(config, seed=SEED + 3).state_dict(), config)


def mbart(directory: Path) -> None:
    config = hf_config(model_type="mbart", architecture="MBartForCausalLM")
    decoder = build_decoder(config, seed=SEED + 4)
    save_hf_checkpoint(directory, decoder.state_dict(), config, omit=["lm_head.weight"], shards=2)


CASES: dict[str, Callable[[Path], object]] = {
    "bart_causal": bart_causal,
    "bart_cg": bart_cg,
    "bart_cg_tf5": bart_cg_tf5,
    "bart_bias": bart_bias,
    "bart_untied": bart_untied,
    "mbart": mbart,
}
