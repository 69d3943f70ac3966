"""The composed speech encoder-decoder in plain PyTorch, with HF's `SpeechEncoderDecoderModel` state-dict keys."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from convert.checkpoint import Checkpoint, numpy_to_torch
from convert.composed import SpeechEncoderDecoderConfig, composed_keymap, composed_tied_keys
from convert.errors import UnsupportedConfig
from convert.params import load_params, params_to_torch_state
from convert.writing import atomic_directory
from torch_reference.generation import generate as _generate
from torch_reference.layers import frame_mask
from torch_reference.loading import LoadReport, load_checkpoint_into
from torch_reference.registry import model_for


@dataclasses.dataclass
class Seq2SeqLMOutput:
    logits: torch.Tensor  # [B, T, V]
    encoder_last_hidden_state: torch.Tensor | None = None  # [B, S, D], in the decoder's width
    encoder_attention_mask: torch.Tensor | None = None  # [B, S] bool


class SpeechEncoderDecoderModel(nn.Module):
    """encoder -> optional `enc_to_dec_proj` -> decoder with cross-attention over the encoder output."""

    def __init__(self, config: SpeechEncoderDecoderConfig):
        super().__init__()
        self.config = config
        self.encoder = model_for(config.encoder, "encoder")
        self.decoder = model_for(config.decoder, "decoder")
        if config.has_projection:
            self.enc_to_dec_proj = nn.Linear(config.encoder.encoder_output_size, config.decoder.hidden_size)

    def encode(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the encoder output in the decoder's width [B, S, D] and its padding mask [B, S] (bool)."""
        hidden = self.encoder(inputs, attention_mask)
        if attention_mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
        else:
            mask = frame_mask(self.config.encoder, attention_mask, hidden.shape[1])
        if self.config.has_projection:
            hidden = self.enc_to_dec_proj(hidden)
        return hidden, mask

    def decode(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
               decoder_attention_mask=None, cache=None):
        """Returns (logits [B, T, V], cache)."""
        return self.decoder(decoder_input_ids, decoder_attention_mask, encoder_hidden_states,
                            encoder_attention_mask, cache=cache)

    def init_cache(self, batch_size: int, max_length: int, encoder_hidden_states, encoder_attention_mask):
        return self.decoder.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput:
        """Teacher-forced logits [B, T, V] (in `.logits`)."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required")
        hidden, mask = self.encode(inputs, attention_mask)
        logits, _ = self.decode(decoder_input_ids, hidden, mask, decoder_attention_mask)
        return Seq2SeqLMOutput(logits, hidden, mask)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SpeechEncoderDecoderModel:
        """Loads a composed checkpoint directory (see the module function `from_pretrained`), in eval mode;
        what the load did is in `.load_report`."""
        model, report = from_pretrained(directory)
        model.load_report = report
        return model

    def save_pretrained(self, directory: str | Path) -> list[Path]:
        """Writes config.json and model.safetensors as HF's `save_pretrained` does (tied weights left out),
        atomically.

        Returns:
            The files written.
        """
        from safetensors.torch import save_file

        tied = set(composed_tied_keys(self.config))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in tied}
        with atomic_directory(directory, overwrite=True, param="directory") as tmp:
            (tmp / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return [Path(directory) / "config.json", Path(directory) / "model.safetensors"]

    def generate(self, inputs, attention_mask=None, **kwargs):
        """Greedy or beam-search decoding; see `torch_reference.generation.generate`."""
        return _generate(self, inputs, attention_mask, **kwargs)


def from_pretrained(directory: str | Path) -> tuple[SpeechEncoderDecoderModel, LoadReport]:
    """Loads a composed checkpoint directory (`model.safetensors`, sharded or not, or `pytorch_model.bin`).

    A directory holding only Flax weights is converted through the key table on the fly.
    """
    checkpoint = Checkpoint(directory)
    if checkpoint.config.get("model_type") != "speech-encoder-decoder":
        raise UnsupportedConfig(f"{checkpoint.directory / 'config.json'}: not a composed speech-encoder-decoder model")
    config = SpeechEncoderDecoderConfig.from_hf_dict(checkpoint.config, str(checkpoint.directory / "config.json"))
    model = SpeechEncoderDecoderModel(config).eval()
    if checkpoint.format == "flax":
        state = params_to_torch_state(config, load_params(directory, _flax_shapes_of(model)).params)
        missing = model.load_state_dict({k: numpy_to_torch(v) for k, v in state.items()}, strict=False).missing_keys
        lacking = sorted(set(missing) - set(composed_tied_keys(config)))
        if lacking:
            raise UnsupportedConfig(f"{directory}: the Flax weights lack {', '.join(lacking)}")
        return model, LoadReport(loaded=sorted(state), dropped=[], tied=sorted(composed_tied_keys(config).items()))
    report = load_checkpoint_into(model, checkpoint, tied=composed_tied_keys(config))
    return model, report


def _flax_shapes_of(model: SpeechEncoderDecoderModel):
    """The Flax leaves the reference model's parameters map to (no Flax code needed): path -> shape."""

    def shapes_of(config: SpeechEncoderDecoderConfig) -> dict[str, tuple[int, ...]]:
        keymap = composed_keymap(config)
        tied = composed_tied_keys(config)
        out = {}
        for key, tensor in model.state_dict().items():
            if key in tied:
                continue
            path, transform = keymap.to_flax(key)
            out[path] = transform.flax_shape(tuple(tensor.shape))
        return out

    return shapes_of
