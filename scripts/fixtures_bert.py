"""Tiny seeded BERT checkpoints in Hugging Face format, built from `torch_reference.decoder`.

Cases:
    bert_lm             BertLMHeadModel (is_decoder), tied head, safetensors as transformers 5 writes them
                        (the tied `cls.predictions.decoder.{weight,bias}` left out), no cross-attention.
    bert_mlm_bin        BertForMaskedLM (bidirectional), pytorch_model.bin as transformers 4 wrote it: every tied
                        copy stored, and the `bert.embeddings.position_ids` buffer. Same weights as bert_lm.
    bert_pretraining    BertForPreTraining, safetensors: the pooler, the next-sentence head and the original
                        checkpoints' LayerNorm `gamma` / `beta` spelling. Same weights as bert_lm.
    bert_xattn_untied   BertLMHeadModel with cross-attention and an untied head (its own decoder weight and bias,
                        and the unused `cls.predictions.bias`), gelu_new.

`bert_model` (a `BertModel` file: no prefix, a pooler, no prediction head) is built by `bert_model()` but is not
a case: only the composer accepts it (it starts the missing head as transformers would), so the per-case tests,
which load every case on its own, would refuse it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convert.base.archs.bert import BertConfig
from scripts.fixture_io import save_hf_checkpoint
from torch_reference.decoder import CausalLM

SEED = 20240613
# Embeddings (and so a tied head) and the head's bias drawn wide, so that the logits' argmax moves along a
# sequence and greedy generations are not one token repeated.
EMBED_STD = 0.5

_TINY = dict(vocab_size=112, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, type_vocab_size=2)


def hf_config(architecture: str = "BertLMHeadModel", version: str = "5.0.0", **overrides: Any) -> dict[str, Any]:
    """A full HF-style config.json dict for a tiny BERT (the fields of a real BERT config)."""
    config = dict(
        _TINY,
        model_type="bert",
        architectures=[architecture],
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.02,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        bos_token_id=2,  # plays [CLS]: the decoder start token when composed
        eos_token_id=3,  # plays [SEP]
        classifier_dropout=None,
        is_decoder=architecture == "BertLMHeadModel",
        add_cross_attention=False,
        tie_word_embeddings=True,
        use_cache=True,
        transformers_version=version,
    )
    if version.startswith("4"):
        config.update(position_embedding_type="absolute", torch_dtype="float32")
    else:
        config.update(dtype="float32")
    config.update(overrides)
    return config


def randomise_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Draws every parameter (LayerNorm scales and biases, positions, the head's biases) from `generator`."""
    seen: set[int] = set()

    def draw(p: torch.Tensor, scale: float, shift: float = 0.0) -> None:
        if id(p) not in seen:  # tied parameters are drawn once
            seen.add(id(p))
            p.copy_(shift + scale * torch.randn(p.shape, generator=generator))

    vocab = model.config.vocab_size
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            if name.endswith(("LayerNorm.weight", "layer_norm.weight")):
                draw(p, 0.2, shift=1.0)
            elif p.ndim == 2 and (name.endswith("embeddings.weight") or p.shape[0] == vocab):
                draw(p, EMBED_STD)  # embeddings, an untied decoder [V, D]
            elif p.ndim == 2:
                draw(p, 1.0 / math.sqrt(p.shape[1]))  # nn.Linear [out, in]
            elif p.shape[0] == vocab:
                draw(p, EMBED_STD)  # the head's biases
            else:
                draw(p, 0.1)  # other biases
    return model


def build_model(config: dict[str, Any], seed: int = SEED) -> CausalLM:
    """The reference model of `config`, every parameter drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return randomise_(CausalLM(BertConfig.from_hf_dict(config)), generator).eval()


def extra_tensors(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for keys a causal LM drops (poolers, other heads)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=generator) for k, s in shapes.items()}


def position_ids_buffer(config: dict[str, Any]) -> torch.Tensor:
    """The `embeddings.position_ids` buffer transformers < 4.31 saved as persistent state."""
    return torch.arange(config["max_position_embeddings"]).expand((1, -1)).contiguous()


_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def bert_lm(directory: Path) -> None:
    config = hf_config()
    save_hf_checkpoint(directory, build_model(config).state_dict(), config, omit=_TIED)


def bert_mlm_bin(directory: Path) -> None:
    config = hf_config("BertForMaskedLM", version="4.46.0")
    state = dict(build_model(config).state_dict())
    state["bert.embeddings.position_ids"] = position_ids_buffer(config)
    save_hf_checkpoint(directory, state, config, fmt="bin")


def bert_pretraining(directory: Path) -> None:
    config = hf_config("BertForPreTraining", version="4.46.0")
    state = {k: v for k, v in build_model(config).state_dict().items() if k != "cls.predictions.decoder.bias"}
    d = config["hidden_size"]
    state.update(extra_tensors({"bert.pooler.dense.weight": (d, d), "bert.pooler.dense.bias": (d,),
                                "cls.seq_relationship.weight": (2, d), "cls.seq_relationship.bias": (2,)}, SEED + 10))
    old_spelling = {k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                    for k in state if "LayerNorm." in k}
    save_hf_checkpoint(directory, state, config, rename=old_spelling)


def bert_xattn_untied(directory: Path) -> None:
    # Cross-attention weights in the source (drawn like the rest, not at the composer's small init scale), so
    # the encoder output steers generation.
    config = hf_config(add_cross_attention=True, tie_word_embeddings=False, hidden_act="gelu_new")
    save_hf_checkpoint(directory, build_model(config, SEED + 1).state_dict(), config)


def bert_model(directory: Path) -> None:
    """A `BertModel` checkpoint (no `bert.` prefix, a pooler, no prediction head); same weights as bert_lm."""
    config = hf_config("BertModel", version="4.46.0")
    state = {k[len("bert."):]: v for k, v in build_model(config).state_dict().items() if k.startswith("bert.")}
    d = config["hidden_size"]
    state.update(extra_tensors({"pooler.dense.weight": (d, d), "pooler.dense.bias": (d,)}, SEED + 11))
    save_hf_checkpoint(directory, state, config, fmt="bin")


CASES: dict[str, Callable[[Path], object]] = {
    "bert_lm": bert_lm,
    "bert_mlm_bin": bert_mlm_bin,
    "bert_pretraining": bert_pretraining,
    "bert_xattn_untied": bert_xattn_untied,
}
