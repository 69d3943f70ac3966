"""Writes the untrained sources of the spoken-digits demonstration: a small wav2vec2 encoder and a small BART
decoder with a word-level digit tokenizer, both initialised as transformers initialises a new model.

    python scripts/make_demo_model.py OUTDIR [--seed 0]
    python -m convert.compose --encoder OUTDIR/encoder --decoder OUTDIR/decoder --output digits-base

No pretrained checkpoint can be downloaded on the machines this project is developed on, so the demonstration
(README, "Fine-tuning") trains a model from scratch. The tiny built-in sources are random test fixtures (wide,
randomised norms), not trainable starting points; these are: transformers' `_init_weights` (normal(0, 0.02)
linear and embedding weights, zero biases, unit norms, He-normal convolutions, the positional conv's own rule),
the stable (pre-norm) wav2vec2 layout with layer-norm feature convolutions, which trains from scratch more
reliably than the post-norm one, and a vocabulary of the ten digit words plus BART's four special tokens.
Seeded: the same command writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn

from scripts import fixtures_bart, fixtures_wav2vec2
from scripts.fixture_io import save_hf_checkpoint
from torch_reference.bart import BartForCausalLM
from torch_reference.wav2vec2 import Wav2Vec2Model

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
INIT_STD = 0.02

ENCODER = {
    "hidden_size": 144, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384,
    "conv_dim": [96] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "num_feat_extract_layers": 7, "conv_bias": True, "feat_extract_norm": "layer", "do_stable_layer_norm": True,
    "num_conv_pos_embeddings": 32, "num_conv_pos_embedding_groups": 8,
    "hidden_dropout": 0.05, "attention_dropout": 0.05, "activation_dropout": 0.0, "feat_proj_dropout": 0.0,
    "layerdrop": 0.0, "mask_time_prob": 0.05, "mask_time_length": 5, "mask_feature_prob": 0.0,
    "add_adapter": False, "output_hidden_size": 144, "architectures": ["Wav2Vec2Model"],
}
DECODER = {
    "vocab_size": len(SPECIALS) + len(DIGITS), "max_position_embeddings": 32, "d_model": 144, "decoder_layers": 2,
    # transformers sizes a causal BART's KV cache by num_hidden_layers (= encoder_layers): keep it = decoder_layers.
    "encoder_layers": 2, "num_hidden_layers": 2,
    "decoder_attention_heads": 4, "decoder_ffn_dim": 384, "dropout": 0.05, "attention_dropout": 0.0,
    "activation_dropout": 0.0, "init_std": INIT_STD, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    "decoder_start_token_id": 2, "forced_eos_token_id": 2,
}
FEATURE_EXTRACTOR = {
    "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
    "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "sampling_rate": 16000,
}


def init_like_transformers(model: nn.Module) -> nn.Module:
    """transformers' `_init_weights` for wav2vec2 and BART, applied module by module."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, INIT_STD)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, INIT_STD)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Conv1d) and "pos_conv_embed" in name:
                # wav2vec2's positional conv: normal(0, sqrt(4 / (kernel * in_channels))), weight norm on top.
                std = math.sqrt(4.0 / (module.kernel_size[0] * module.in_channels))
                weight = module.parametrizations.weight
                weight.original1.normal_(0.0, std)
                weight.original0.copy_(torch.linalg.vector_norm(weight.original1, dim=(0, 1), keepdim=True))
                module.bias.zero_()
            elif isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    bound = 1.0 / math.sqrt(module.in_channels * module.kernel_size[0])
                    module.bias.uniform_(-bound, bound)
    return model


def encoder(directory: Path, seed: int) -> None:
    config = fixtures_wav2vec2.hf_config(**ENCODER)
    torch.manual_seed(seed)
    model = init_like_transformers(Wav2Vec2Model(fixtures_wav2vec2.Wav2Vec2Config.from_hf_dict(config)))
    save_hf_checkpoint(directory, model.state_dict(), config)
    (directory / "preprocessor_config.json").write_text(json.dumps(FEATURE_EXTRACTOR, indent=2) + "\n")


def decoder(directory: Path, seed: int) -> None:
    config = fixtures_bart.hf_config(**DECODER)
    torch.manual_seed(seed + 1)
    model = init_like_transformers(BartForCausalLM(fixtures_bart.BartConfig.from_hf_dict(config)))
    save_hf_checkpoint(directory, model.state_dict(), config, omit=["lm_head.weight"])
    vocab = {token: i for i, token in enumerate(SPECIALS + DIGITS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.add_special_tokens(list(SPECIALS))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, build in (("encoder", encoder), ("decoder", decoder)):
        directory = args.outdir / name
        directory.mkdir(parents=True, exist_ok=True)
        build(directory, args.seed)
        size = sum(p.stat().st_size for p in directory.iterdir())
        print(f"{directory}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
