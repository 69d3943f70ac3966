"""Tiny seeded RoBERTa checkpoints in Hugging Face format, built from `torch_reference.roberta`.

Cases:
    roberta_causal          RobertaForCausalLM (is_decoder), tied head, safetensors as transformers 5 writes them
                            (the tied `lm_head.decoder.{weight,bias}` left out), no cross-attention.
    roberta_mlm_bin         RobertaForMaskedLM (bidirectional) as transformers 4 wrote it: every tied copy stored and
                            the `roberta.embeddings.position_ids` buffer, in two pytorch_model.bin shards. Same
                            weights as roberta_causal.
    roberta_xattn_untied    RobertaForCausalLM with cross-attention and an untied head, relu in the layers (the
                            head's GELU stays exact).

`roberta_model` (a `RobertaModel` file: no prefix, a pooler, no LM head) is built by `roberta_model()` but is not a
case, for the reason given in `scripts.fixtures_bert`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convert.base.archs.roberta import RobertaConfig
from scripts.fixture_io import save_hf_checkpoint
from scripts.fixtures_bert import extra_tensors, position_ids_buffer, randomise_
from torch_reference.roberta import RobertaForCausalLM

SEED = 20240614
PAD = 1
# 64 decoder positions after RoBERTa's padding offset (rows 0 and 1 are never a real token's).
_TINY = dict(vocab_size=112, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64 + PAD + 1, type_vocab_size=1)


def hf_config(architecture: str = "RobertaForCausalLM", version: str = "5.0.0", **overrides: Any) -> dict[str, Any]:
    """A full HF-style config.json dict for a tiny RoBERTa (the fields of a real RoBERTa config)."""
    config = dict(
        _TINY,
        model_type="roberta",
        architectures=[architecture],
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        pad_token_id=PAD,
        bos_token_id=0,
        eos_token_id=2,
        classifier_dropout=None,
        is_decoder=architecture == "RobertaForCausalLM",
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


def build_model(config: dict[str, Any], seed: int = SEED) -> RobertaForCausalLM:
    """The reference model of `config`, every parameter drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return randomise_(RobertaForCausalLM(RobertaConfig.from_hf_dict(config)), generator).eval()


_TIED = ("lm_head.decoder.weight", "lm_head.decoder.bias")


def roberta_causal(directory: Path) -> None:
    config = hf_config()
    save_hf_checkpoint(directory, build_model(config).state_dict(), config, omit=_TIED)


def roberta_mlm_bin(directory: Path) -> None:
    config = hf_config("RobertaForMaskedLM", version="4.46.0")
    state = dict(build_model(config).state_dict())
    state["roberta.embeddings.position_ids"] = position_ids_buffer(config)
    save_hf_checkpoint(directory, state, config, fmt="bin", shards=2)


def roberta_xattn_untied(directory: Path) -> None:
    # A seed whose composed generations are varied and differ between utterances with every test encoder.
    config = hf_config(add_cross_attention=True, tie_word_embeddings=False, hidden_act="relu")
    save_hf_checkpoint(directory, build_model(config, SEED + 3).state_dict(), config)


def roberta_model(directory: Path) -> None:
    """A `RobertaModel` checkpoint (no `roberta.` prefix, a pooler, no LM head); same weights as roberta_causal."""
    config = hf_config("RobertaModel", version="4.46.0")
    state = {k[len("roberta."):]: v for k, v in build_model(config).state_dict().items() if k.startswith("roberta.")}
    d = config["hidden_size"]
    state.update(extra_tensors({"pooler.dense.weight": (d, d), "pooler.dense.bias": (d,)}, SEED + 11))
    save_hf_checkpoint(directory, state, config)


CASES: dict[str, Callable[[Path], object]] = {
    "roberta_causal": roberta_causal,
    "roberta_mlm_bin": roberta_mlm_bin,
    "roberta_xattn_untied": roberta_xattn_untied,
}
