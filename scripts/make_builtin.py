"""Writes the built-in sources shipped in the package (`convert/builtin/{wav2vec2,bart,gpt2}`).

    python scripts/make_builtin.py [OUTDIR]   (default: convert/builtin)

They are tiny random checkpoints in Hugging Face format, with a real byte-level BPE tokenizer for the
decoders and a feature-extractor config for the encoder, so that `python -m convert.compose --encoder
wav2vec2 --decoder bart --output out` and `python -m convert.generate` work offline on a fresh machine.
Seeded: the same command writes the same bytes. Together they stay well under 1 MB.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from convert.base.archs.wav2vec2 import Wav2Vec2Config  # noqa: E402
from scripts import fixtures_bart, fixtures_gpt2, fixtures_wav2vec2  # noqa: E402
from scripts.fixture_io import save_hf_checkpoint  # noqa: E402

VOCAB_SIZE = 320
# A small public-domain-style corpus of our own, enough for the BPE merges of a 320-token vocabulary.
CORPUS = """\
the quick brown fox jumps over the lazy dog
speech recognition turns spoken words into written text
a speech encoder listens and a text decoder writes
she sells sea shells by the sea shore
the weather today is cold and windy with some rain
please call me back when you hear this message
numbers one two three four five six seven eight nine ten
we compose an encoder and a decoder into one model
the cat sat on the mat and looked at the hat
good morning and welcome to the meeting
it is a truth that every model must be tested
open the window and let the fresh air in
""".splitlines()

FEATURE_EXTRACTOR = {
    "do_normalize": True,
    "feature_extractor_type": "Wav2Vec2FeatureExtractor",
    "feature_size": 1,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": False,
    "sampling_rate": 16000,
}

CARD = """---
license: apache-2.0
tags:
- speech-encoder-decoder-toolkit
- tiny-random
---
# Tiny random {name} ({what})

A built-in source of the speech encoder-decoder toolkit: {what} with random weights, in Hugging Face's
format, for trying `python -m convert.compose` offline. It has learned nothing; its outputs are noise.
Written by `scripts/make_builtin.py` (seeded).
"""


def train_tokenizer(special: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2/BART style) whose first ids are the `special` tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def write_tokenizer(directory: Path, tokenizer: Tokenizer, config: dict) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def wav2vec2(directory: Path) -> None:
    """wav2vec2-base's layout (group norm, post-norm layers, 7 convs with 20 ms frames), 48 wide."""
    fields = dict(fixtures_wav2vec2.GROUP, hidden_size=48, intermediate_size=96, output_hidden_size=48,
                  conv_dim=[32] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                  num_feat_extract_layers=7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                  architectures=["Wav2Vec2Model"])
    config = fixtures_wav2vec2.hf_config(**fields)
    Wav2Vec2Config.from_hf_dict(config)
    _, state = fixtures_wav2vec2.build_model(config, seed=11)
    save_hf_checkpoint(directory, state, config)
    (directory / "preprocessor_config.json").write_text(json.dumps(FEATURE_EXTRACTOR, indent=2) + "\n")
    (directory / "README.md").write_text(CARD.format(name="wav2vec2", what="a speech encoder"))


def bart(directory: Path) -> None:
    """A BART decoder (BartForCausalLM layout), 32 wide: composing it with the builtin encoder needs a projection."""
    tokenizer = train_tokenizer(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    config = fixtures_bart.hf_config(vocab_size=VOCAB_SIZE, max_position_embeddings=128,
                                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    decoder = fixtures_bart.build_decoder(config, seed=12)
    save_hf_checkpoint(directory, decoder.state_dict(), config, omit=["lm_head.weight"])
    write_tokenizer(directory, tokenizer, {"tokenizer_class": "BartTokenizerFast", "bos_token": "<s>",
                                           "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    (directory / "README.md").write_text(CARD.format(name="BART", what="a text decoder"))


def gpt2(directory: Path) -> None:
    """A GPT-2 LM head model without cross-attention (like the real gpt2), 32 wide."""
    tokenizer = train_tokenizer(["<|endoftext|>"])
    config = fixtures_gpt2.hf_config(vocab_size=VOCAB_SIZE, n_positions=128, n_ctx=128,
                                     bos_token_id=0, eos_token_id=0)
    model = fixtures_gpt2.build_model(config, seed=13)
    save_hf_checkpoint(directory, model.state_dict(), config, omit=["lm_head.weight"])
    write_tokenizer(directory, tokenizer, {"tokenizer_class": "GPT2TokenizerFast", "bos_token": "<|endoftext|>",
                                           "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    (directory / "README.md").write_text(CARD.format(name="GPT-2", what="a text decoder"))


BUILTINS = {"wav2vec2": wav2vec2, "bart": bart, "gpt2": gpt2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", type=Path, default=Path(__file__).resolve().parent.parent / "convert"
                        / "builtin")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for name, build in BUILTINS.items():
        directory = args.outdir / name
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            old.unlink()
        build(directory)
        size = sum(p.stat().st_size for p in directory.iterdir())
        print(f"{directory}: {size / 1000:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
