"""Tiny seeded GPT-2 checkpoints in Hugging Face format, built from `torch_reference.gpt2`.

Cases:
    gpt2_lm         GPT2LMHeadModel keys, safetensors, tied head (lm_head.weight omitted, as HF's safe
                    serialization does), no cross-attention: like a real `gpt2` checkpoint.
    gpt2_model_bin  The same weights as gpt2_lm stored as GPT2Model does (no `transformer.` prefix, no LM head)
                    plus the causal-mask buffers `attn.bias` / `attn.masked_bias` of old transformers versions,
                    in pytorch_model.bin.
    gpt2_xattn      add_cross_attention=true with every cross-attention weight present, safetensors.
    gpt2_untied     tie_word_embeddings=false with its own lm_head.weight, safetensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convert.base.archs.gpt2 import GPT2Config
from scripts.fixture_io import save_hf_checkpoint
from torch_reference.gpt2 import Conv1D, GPT2LMHeadModel

SEED = 20240612
# Embeddings (and so a tied LM head) drawn wide, so that the logits' argmax changes along a sequence.
EMBED_STD = 0.5

_TINY = dict(vocab_size=96, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4)


def hf_config(architecture: str = "GPT2LMHeadModel", **overrides: Any) -> dict[str, Any]:
    """A full HF-style config.json dict for a tiny GPT-2 (the fields of the real `gpt2` config)."""
    config = dict(
        _TINY,
        model_type="gpt2",
        architectures=[architecture],
        activation_function="gelu_new",
        attn_pdrop=0.1,
        embd_pdrop=0.1,
        resid_pdrop=0.1,
        initializer_range=0.02,
        layer_norm_epsilon=1e-5,
        n_inner=None,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        summary_activation=None,
        summary_first_dropout=0.1,
        summary_proj_to_labels=True,
        summary_type="cls_index",
        summary_use_proj=True,
        bos_token_id=_TINY["vocab_size"] - 1,
        eos_token_id=_TINY["vocab_size"] - 1,
        tie_word_embeddings=True,
        use_cache=True,
        torch_dtype="float32",
        transformers_version="4.46.0",
    )
    config.update(overrides)
    return config


def randomise_(model: GPT2LMHeadModel, generator: torch.Generator) -> GPT2LMHeadModel:
    """Draws every parameter (LayerNorm scales and biases and positions included) from `generator`."""
    seen: set[int] = set()

    def draw(p: torch.Tensor, scale: float, shift: float = 0.0) -> None:
        if id(p) not in seen:  # a tied LM head shares the token embedding's Parameter
            seen.add(id(p))
            p.copy_(shift + scale * torch.randn(p.shape, generator=generator))

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                draw(module.weight, 0.2, shift=1.0)
                draw(module.bias, 0.1)
            elif isinstance(module, nn.Embedding):
                draw(module.weight, EMBED_STD if name.endswith("wte") else 0.5)
            elif isinstance(module, Conv1D):
                draw(module.weight, 1.0 / math.sqrt(module.weight.shape[0]))  # [in, out]
                draw(module.bias, 0.1)
            elif isinstance(module, nn.Linear):  # an untied LM head
                draw(module.weight, EMBED_STD)
    return model


def build_model(config: dict[str, Any], seed: int = SEED) -> GPT2LMHeadModel:
    """The reference model of `config`, every parameter drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return randomise_(GPT2LMHeadModel(GPT2Config.from_hf_dict(config)), generator).eval()


def mask_buffers(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The per-layer causal-mask buffers transformers < 4.27 registered as persistent state (GPT2Model names)."""
    n = config["n_positions"]
    causal = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
    out = {}
    for i in range(config["n_layer"]):
        out[f"h.{i}.attn.bias"] = causal.clone()
        out[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return out


def gpt2_lm(directory: Path) -> None:
    config = hf_config()
    model = build_model(config)
    save_hf_checkpoint(directory, model.state_dict(), config, omit=["lm_head.weight"])


def gpt2_model_bin(directory: Path) -> None:
    # Built from gpt2_lm's config and seed, so its weights equal gpt2_lm's.
    model = build_model(hf_config())
    prefix = "transformer."
    state = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    state.update(mask_buffers(hf_config()))
    save_hf_checkpoint(directory, state, hf_config("GPT2Model"), fmt="bin")


def gpt2_xattn(directory: Path) -> None:
    config = hf_config(add_cross_attention=True, is_decoder=True)
    save_hf_checkpoint(directory, build_model(config, SEED + 1).state_dict(), config, omit=["lm_head.weight"])


def gpt2_untied(directory: Path) -> None:
    config = hf_config(tie_word_embeddings=False)
    save_hf_checkpoint(directory, build_model(config, SEED + 2).state_dict(), config)


def gpt2_xattn_untied(directory: Path) -> None:
    # Cross-attention weights in the source (drawn like the rest, not at the composer's small init scale), so
    # the encoder output steers generation, and an untied head whose argmax moves along a sequence.
    config = hf_config(add_cross_attention=True, is_decoder=True, tie_word_embeddings=False)
    save_hf_checkpoint(directory, build_model(config, SEED + 3).state_dict(), config)


CASES: dict[str, Callable[[Path], object]] = {
    "gpt2_lm": gpt2_lm,
    "gpt2_model_bin": gpt2_model_bin,
    "gpt2_xattn": gpt2_xattn,
    "gpt2_untied": gpt2_untied,
    "gpt2_xattn_untied": gpt2_xattn_untied,
}
