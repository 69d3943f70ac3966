"""The prefix composition in plain PyTorch: the reference `flax_model.prefix` is checked against, written on its own.

`SpeechPrefixModel(config)` has the state-dict keys of `convert.base.prefix.prefix_keymap` (`encoder.<the
encoder's own keys>`, `decoder.<the LM's own keys>`, `projector.linear_1.weight`, ...). The batch layout, the
positions, the loss and the generation are `flax_model.prefix`'s (its module docstring states them); the
searches are `torch_reference.generation`'s, fed one column per step by `PrefixDecoding`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convert.base.checkpoint import numpy_to_torch
from convert.base.errors import UnsupportedConfig
from convert.base.generation_settings import GenerationConfig, model_generation_config, resolve_settings
from convert.base.prefix import (
    SpeechPrefixConfig,
    not_prefix_model_file,
    prefix_generation_config,
    prefix_keymap,
    prefix_tied_keys,
)
from convert.base.prefix_io import load_prefix_params, save_prefix_params
from convert.base.registry import spec_for
from convert.base.outputs import atomic_directory
from torch_reference.generation import GenerateOutput, beam_search, greedy_or_sample
from torch_reference.layers import ACTIVATIONS, frame_mask
from torch_reference.registry import model_for
from torch_reference.training import IGNORE_INDEX, label_loss


def stack_frames(hidden: torch.Tensor, k: int) -> torch.Tensor:
    """[B, S, E] -> [B, S // k, k E]: k consecutive frames concatenated, the last S mod k frames dropped."""
    batch, frames, width = hidden.shape
    return hidden[:, :(frames // k) * k].reshape(batch, frames // k, k * width)


def left_padded_prefix(before: torch.Tensor, audio: torch.Tensor, lengths: torch.Tensor, after: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row: [before, audio[i, :n_i], after], right-aligned in P = Tb + A + Ta columns.

    Args:
        before: [Tb, D], after: [Ta, D] the prompt's embeddings; audio [B, A, D]; lengths [B] (n_i).

    Returns:
        (embeddings [B, P, D], zero in the padding; real columns [B, P] bool).
    """
    batch, slots, width = audio.shape
    total = before.shape[0] + slots + after.shape[0]
    embeds = audio.new_zeros(batch, total, width)
    real = torch.zeros(batch, total, dtype=torch.bool)
    for row in range(batch):
        pieces = torch.cat([before, audio[row, :int(lengths[row])], after])  # [L_i, D]
        embeds[row, total - pieces.shape[0]:] = pieces
        real[row, total - pieces.shape[0]:] = True
    return embeds, real


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool -> [B, T] long: the number of real columns before each column (0 for leading padding)."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


class Projector(nn.Module):
    def __init__(self, config: SpeechPrefixConfig):
        super().__init__()
        self.config = config
        if config.projector_type == "linear":
            self.linear_1 = nn.Linear(config.projector_input_size, config.decoder.hidden_size)
        else:
            self.linear_1 = nn.Linear(config.projector_input_size, config.projector_inner_size)
            self.linear_2 = nn.Linear(config.projector_inner_size, config.decoder.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.projector_type == "linear":
            return self.linear_1(x)
        return self.linear_2(ACTIVATIONS[self.config.projector_activation](self.linear_1(x)))


class SpeechPrefixModel(nn.Module):
    """encoder -> stack K frames -> projector -> the decoder-only LM, reading [prompt, audio, prompt, text]."""

    def __init__(self, config: SpeechPrefixConfig):
        super().__init__()
        self.config = config
        self.generation_config: GenerationConfig | None = None
        self.encoder = model_for(config.encoder, "encoder")
        self.decoder = model_for(config.decoder, "decoder")
        self.projector = Projector(config)

    def audio(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None,
              **masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(audio embeddings [B, A, D], their counts [B])."""
        hidden = self.encoder(inputs, attention_mask, **{k: v for k, v in masks.items() if v is not None})
        if attention_mask is None:
            frames = torch.full((hidden.shape[0],), hidden.shape[1])
        else:
            frames = frame_mask(self.config.encoder, attention_mask, hidden.shape[1]).sum(-1)
        return self.projector(stack_frames(hidden, self.config.stack_frames)), frames // self.config.stack_frames

    def prompt_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return tuple(self.decoder.embed(torch.tensor([list(ids)], dtype=torch.long).reshape(1, -1))[0]
                     for ids in (cfg.prompt_ids_before, cfg.prompt_ids_after))

    def prefix(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None,
               **masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The left-padded prefix: (embeddings [B, P, D], real columns [B, P])."""
        audio, lengths = self.audio(inputs, attention_mask, **masks)
        before, after = self.prompt_embeddings()
        return left_padded_prefix(before, audio, lengths, after)

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None, text_ids: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits of every column [B, P + T, V] and the real columns [B, P + T]."""
        embeds, real = self.prefix(inputs, attention_mask)
        text_mask = torch.ones_like(text_ids, dtype=torch.bool) if text_mask is None else text_mask.bool()
        mask = torch.cat([real, text_mask], dim=1)
        sequence = torch.cat([embeds, self.decoder.embed(text_ids)], dim=1)
        logits, _ = self.decoder(inputs_embeds=sequence, attention_mask=mask, position_ids=positions_of(mask))
        return logits, mask

    def loss(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor, *,
             label_smoothing: float = 0.0, mask_time_indices: torch.Tensor | None = None,
             mask_feature_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over the label tokens: the prefix's last column predicts the first label."""
        embeds, real = self.prefix(inputs, attention_mask, mask_time_indices=mask_time_indices,
                                   mask_feature_indices=mask_feature_indices)
        text = labels[:, :-1]
        text_mask = text != IGNORE_INDEX
        mask = torch.cat([real, text_mask], dim=1)
        text_embeds = self.decoder.embed(text.masked_fill(~text_mask, self.config.pad_token_id))
        logits, _ = self.decoder(inputs_embeds=torch.cat([embeds, text_embeds], dim=1), attention_mask=mask,
                                 position_ids=positions_of(mask))
        return label_loss(logits[:, embeds.shape[1] - 1:], labels, label_smoothing)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config: Any = None, *, generator: torch.Generator | None = None,
                 **kwargs: Any) -> GenerateOutput:
        """Greedy, sampling or beam search (`torch_reference.generation`); `sequences` start with a placeholder."""
        settings = resolve_settings(self.config, prefix_generation_config(model_generation_config(self), self.config),
                                    generation_config, **kwargs)
        inputs = torch.as_tensor(inputs, dtype=torch.float32)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask)
        embeds, real = self.prefix(inputs, mask)
        if settings.num_beams == 1:
            rows = torch.arange(inputs.shape[0]).repeat_interleave(settings.num_return_sequences)
            embeds, real = embeds[rows], real[rows]
        decoding = PrefixDecoding(self, embeds, real, settings.max_new_tokens)
        if settings.num_beams == 1:
            return greedy_or_sample(decoding, decoding.cache, settings, generator)
        return beam_search(decoding, decoding.cache, settings, generator)

    # -- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SpeechPrefixModel:
        """Loads a prefix-composed directory (each part from its own directory, `model.safetensors` preferred),
        in eval mode."""
        from convert.base.checkpoint import WEIGHT_FILES

        config, flat = load_prefix_params(directory, _part_shapes, prefer=WEIGHT_FILES)
        model = cls(config).eval()
        model.load_state_dict(_torch_state(config, flat), strict=False)
        missing = sorted(set(model.state_dict()) - set(_torch_state(config, flat)) - set(prefix_tied_keys(config)))
        if missing:
            raise UnsupportedConfig(f"{directory}: lacks {', '.join(missing[:5])}")
        model.generation_config = prefix_generation_config(
            GenerationConfig.from_directory(Path(directory) / "decoder"), config)
        return model

    def save_pretrained(self, directory: str | Path, params: Mapping[str, Any] | None = None,
                        overwrite: bool = False) -> list[Path]:
        """Writes the prefix layout, atomically; `params` (state-dict keys -> tensors, e.g. gradients) over the
        model's own. `overwrite`: as `flax_model.prefix.FlaxSpeechPrefixModel.save_pretrained`."""
        keymap, tied = prefix_keymap(self.config), set(prefix_tied_keys(self.config))
        state = {k: v.detach() for k, v in self.state_dict().items() if k not in tied}
        state.update(params or {})
        leaves = {}
        for key, tensor in state.items():
            path, transform = keymap.to_flax(key)
            leaves[path] = transform.to_flax(torch.as_tensor(tensor).contiguous().numpy())
        with atomic_directory(directory, overwrite=overwrite, param="directory", keep=not_prefix_model_file) as tmp:
            files = save_prefix_params(tmp, self.config, leaves)
            if self.generation_config is not None:
                files.append(self.generation_config.write(tmp / "decoder"))
        return [Path(directory) / f.relative_to(tmp) for f in files]


class PrefixDecoding:
    """What `torch_reference.generation`'s searches call: `decode(tokens, None, None, cache=...)` feeds each row
    one column (first the prefix's last column, then its generated tokens) at the row's own position."""

    def __init__(self, model: SpeechPrefixModel, embeds: torch.Tensor, real: torch.Tensor, max_new_tokens: int):
        self.model = model
        batch, width = real.shape
        self.batch, self.width = batch, width
        self.last = embeds[:, -1:]
        self.padding = width - real.sum(1)
        max_length = width - 1 + max_new_tokens
        self.mask = torch.cat([real, torch.ones(batch, max_length - width, dtype=torch.bool)], dim=1)
        self.cache = model.decoder.init_cache(batch, max_length)
        if width > 1:
            _, self.cache = model.decoder(inputs_embeds=embeds[:, :-1], attention_mask=self.mask, cache=self.cache,
                                          position_ids=positions_of(real[:, :-1]))

    def decode(self, tokens: torch.Tensor, _hidden: Any, _mask: Any, cache: Any) -> tuple[torch.Tensor, Any]:
        per_row = tokens.shape[0] // self.batch  # beams: row b * K + k is utterance b's
        if cache.index == self.width - 1:
            embeds = self.last.repeat_interleave(per_row, dim=0)
        else:
            embeds = self.model.decoder.embed(tokens)
        positions = cache.index - self.padding.repeat_interleave(per_row)[:, None]
        return self.model.decoder(inputs_embeds=embeds, attention_mask=self.mask.repeat_interleave(per_row, dim=0),
                                  cache=cache, position_ids=positions)


def _part_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The Flax leaves a part's reference model maps to (through its key table; built on the meta device)."""
    spec = spec_for(config)
    with torch.device("meta"):
        model = model_for(config)
    tied = spec.tied_keys(config)
    out = {}
    for key, tensor in model.state_dict().items():
        if key in tied:
            continue
        path, transform = spec.keymap.to_flax(key)
        out[path] = transform.flax_shape(tuple(tensor.shape))
    return out


def _torch_state(config: SpeechPrefixConfig, flat: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    keymap = prefix_keymap(config)
    out = {}
    for path, value in flat.items():
        key, transform = keymap.to_torch(path)
        out[key] = numpy_to_torch(transform.to_torch(np.asarray(value)))  # bfloat16 files too, bit for bit
    return out
