"""The options of one `generate` call, checked and completed from the config: shared by the Flax search and
the PyTorch reference so that both decode under exactly the same settings."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """The resolved options of one `generate` call (token ids filled in from the config)."""

    max_new_tokens: int
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    min_new_tokens: int
    decoder_start_token_id: int
    eos_token_id: int | None
    pad_token_id: int | None

    @property
    def static(self) -> tuple:
        """What the compiled function depends on; the rest is passed in traced."""
        return (self.max_new_tokens, self.num_beams, self.early_stopping, self.decoder_start_token_id,
                self.eos_token_id, self.pad_token_id)


def resolve_settings(config: Any, max_new_tokens: int, num_beams: int, length_penalty: float,
                     early_stopping: bool | str, min_new_tokens: int, decoder_start_token_id: int | None,
                     eos_token_id: int | None, pad_token_id: int | None) -> GenerationSettings:
    """Checks the options and fills the token ids from the composed config; pad defaults to eos."""
    start = config.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    pad = eos if pad is None else pad
    if start is None:
        raise ValueError("no decoder_start_token_id in the config; pass decoder_start_token_id")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be at least 1")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens={min_new_tokens} must be between 0 and max_new_tokens={max_new_tokens}")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise ValueError(f"early_stopping={early_stopping!r} must be True, False or 'never'")
    if eos is not None and pad is None:
        raise ValueError("eos_token_id is set but there is no pad_token_id to fill finished rows")
    positions = config.decoder.max_positions
    if max_new_tokens + 1 > positions:
        raise ValueError(f"max_new_tokens={max_new_tokens} needs {max_new_tokens + 1} decoder positions; the decoder "
                         f"has {positions}")
    vocab = config.decoder.vocab_size
    if num_beams > 1 and 2 * num_beams > vocab - 1:
        raise ValueError(f"num_beams={num_beams} is too many for a vocabulary of {vocab}")
    return GenerationSettings(max_new_tokens, num_beams, float(length_penalty), early_stopping, min_new_tokens,
                              int(start), None if eos is None else int(eos), None if pad is None else int(pad))
