"""The prefix-composition cases that `parity_tests/test_prefix_model.py` runs and `scripts/make_prefix_goldens.py`
records: the pairs, how they are composed, the decoder's tokenizer and the seeded batch.

Pairs: every encoder with the first decoder-only LM family, and the first encoder with every other decoder-only
LM family (the families whose spec says `causal_lm`), each by its first fixture case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.registry import specs
from scripts.make_fixtures import cases_by_arch

# How the test fixtures are composed; 0.1 s of audio, short enough for the fixtures' 64 positions with K = 4.
COMPOSE = {"projector": "mlp", "stack_frames": 4, "prompt": "w5 w6 {audio} w7", "seed": 0}
SECONDS = 0.1
TEXT_TOKENS = 4


def _first_case(spec: Any) -> str:
    return next(iter(cases_by_arch()[spec.name]))


ENCODERS = [_first_case(s) for s in specs("encoder")]
LMS = [_first_case(s) for s in specs("decoder") if s.causal_lm]
PAIRS = [(e, LMS[0]) for e in ENCODERS] + [(ENCODERS[0], d) for d in LMS[1:]]


def lm_with_tokenizer(fixture: Path, target: Path) -> Path:
    """A copy of a decoder fixture with a word-level tokenizer (`w0` ... `w{V-1}`: the prefix mode tokenises the
    prompt with the decoder's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if not (target / "tokenizer.json").exists():
        shutil.copytree(fixture, target, dirs_exist_ok=True)
        vocab = json.loads((target / "config.json").read_text())["vocab_size"]
        tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer.save(str(target / "tokenizer.json"))
    return target


def prefix_batch(config: Any, seed: int = 0) -> dict[str, np.ndarray]:
    """Two utterances (the second 5/8 as long, right-padded: samples [2, N], or feature frames [2, S, F] for an
    encoder that reads features), text ids [2, TEXT_TOKENS] and labels [2, 5] (the second's last two -100)."""
    from convert.base.configs import encoder_input_shape

    rng = np.random.default_rng(seed)
    encoder = config.encoder
    n = max(round(encoder.inputs_per_second * SECONDS), 4 * encoder.min_input_length)
    while int(config.audio_lengths(encoder.output_lengths(n * 5 // 8))) < 2:  # two audio embeddings in each row
        n += max(1, n // 4)
    inputs = rng.standard_normal(encoder_input_shape(encoder, 2, n)).astype(np.float32)
    mask = np.ones((2, n), np.int64)
    inputs[1, n * 5 // 8:], mask[1, n * 5 // 8:] = 0.0, 0
    ids = rng.integers(0, config.decoder.vocab_size, (2, TEXT_TOKENS))
    labels = rng.integers(0, config.decoder.vocab_size, (2, TEXT_TOKENS + 1))
    labels[1, 3:] = -100
    return {"inputs": inputs, "attention_mask": mask, "text_ids": ids, "labels": labels}
