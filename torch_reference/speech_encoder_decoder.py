"""The composed speech encoder-decoder in plain PyTorch, with HF's `SpeechEncoderDecoderModel` state-dict keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convert.base.checkpoint import Checkpoint, numpy_to_torch
from convert.base.composed import SpeechEncoderDecoderConfig, composed_keymap, composed_tied_keys
from convert.base.errors import UnsupportedConfig, UsageError
from convert.base.generation_settings import GenerationConfig
from convert.base.labels import check_label_smoothing, check_labels
from convert.base.params import (
    check_layer_counts,
    load_params,
    params_to_torch_state,
    plan_checkpoint,
    pretrained_directory,
    save_params,
    weight_formats,
)
from torch_reference.generation import generate as _generate
from torch_reference.layers import frame_mask
from torch_reference.loading import LoadReport, load_checkpoint_into
from torch_reference.registry import model_for
from torch_reference.training import freeze_feature_encoder, label_loss, shift_tokens_right, state_with


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
        # What `generate` uses by default (from_pretrained reads it); None: what the config implies.
        self.generation_config: GenerationConfig | None = None
        self.encoder = model_for(config.encoder, "encoder")
        self.decoder = model_for(config.decoder, "decoder")
        if config.has_projection:
            self.enc_to_dec_proj = nn.Linear(config.encoder.encoder_output_size, config.decoder.hidden_size)
        if config.ctc is not None:  # Wav2Vec2ForCTC's dropout and lm_head over the encoder output
            self.ctc_dropout = nn.Dropout(config.ctc.dropout)
            self.ctc_head = nn.Linear(config.encoder.encoder_output_size, config.ctc.vocab_size)

    def encode(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None, mask_feature_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the encoder output in the decoder's width [B, S, D] and its padding mask [B, S] (bool).

        The SpecAugment masks ([B, S] over the feature encoder's frames, [B, C] over channels) are applied when
        given; `.train()` turns on dropout and LayerDrop.
        """
        hidden, mask = self.encode_features(inputs, attention_mask, mask_time_indices, mask_feature_indices)
        return self.project(hidden), mask

    def encode_features(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None,
        mask_time_indices: torch.Tensor | None = None, mask_feature_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The speech encoder's own output [B, S, E] (what the CTC head reads) and its padding mask [B, S]."""
        masks = {name: value for name, value in (("mask_time_indices", mask_time_indices),
                                                 ("mask_feature_indices", mask_feature_indices)) if value is not None}
        hidden = self.encoder(inputs, attention_mask, **masks)
        if attention_mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
        else:
            mask = frame_mask(self.config.encoder, attention_mask, hidden.shape[1])
        return hidden, mask

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.enc_to_dec_proj(hidden) if self.config.has_projection else hidden

    def ctc_logits(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CTC head's logits [B, S, V] and the frame mask [B, S] (`.train()`: dropout before the head)."""
        if self.config.ctc is None:
            raise UnsupportedConfig("this model has no CTC head (config.json has no 'ctc' section)")
        hidden, mask = self.encode_features(inputs, attention_mask)
        return self.ctc_head(self.ctc_dropout(hidden)), mask

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
        mask_time_indices: torch.Tensor | None = None,
        mask_feature_indices: torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput:
        """Teacher-forced logits [B, T, V] (in `.logits`)."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required")
        hidden, mask = self.encode(inputs, attention_mask, mask_time_indices, mask_feature_indices)
        logits, _ = self.decode(decoder_input_ids, hidden, mask, decoder_attention_mask)
        return Seq2SeqLMOutput(logits, hidden, mask)

    def loss(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        *,
        label_smoothing: float = 0.0,
        mask_time_indices: torch.Tensor | None = None,
        mask_feature_indices: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        ctc_weight: float | None = None,
        ctc_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """transformers' training loss: the decoder reads `labels` shifted right (start token first, -100 as
        pad), mean cross-entropy over the labels that are not -100 (`LabelSmoother` when `label_smoothing`).
        With `ctc_weight` lambda: lambda CTC + (1 - lambda) that, the CTC loss computed as transformers'
        `Wav2Vec2ForCTC` does (`ctc_loss` below) over the utterances that have labels, against `ctc_labels`
        (default: the labels without the special tokens). Dropout and LayerDrop apply in `.train()` mode. Labels
        must be integer ids within the vocabulary or -100 (at least one token), `label_smoothing` in [0, 1);
        anything else is a one-line `UsageError`."""
        cfg = self.config
        label_smoothing = check_label_smoothing(label_smoothing)
        if not isinstance(labels, torch.Tensor):
            raise UsageError(f"labels: a {type(labels).__name__}, expected a torch.Tensor of token ids", param="labels")
        check_labels(labels.detach().cpu().numpy(), cfg.decoder.vocab_size, inputs.shape[0])
        if cfg.decoder_start_token_id is None or cfg.pad_token_id is None:
            raise ValueError("the loss needs decoder_start_token_id and pad_token_id in the config")
        decoder_input_ids = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        features, mask = self.encode_features(inputs, attention_mask, mask_time_indices, mask_feature_indices)
        logits, _ = self.decode(decoder_input_ids, self.project(features), mask, decoder_attention_mask)
        attention = label_loss(logits, labels, label_smoothing)
        if ctc_weight is None:
            return attention
        if cfg.ctc is None:
            raise UnsupportedConfig("ctc_weight: this model has no CTC head")
        rows = (labels != -100).any(dim=1)
        if ctc_labels is None:
            special = torch.tensor(sorted(cfg.special_token_ids))
            ctc_labels = [row[(row != -100) & ~torch.isin(row, special)] for row in labels[rows]]
        else:
            ctc_labels = [row[row != -100] for row in ctc_labels[rows]]
        ctc = ctc_loss(self.ctc_head(self.ctc_dropout(features[rows])), mask[rows].sum(-1), ctc_labels, cfg.ctc)
        return (1 - ctc_weight) * attention + ctc_weight * ctc

    def freeze_feature_encoder(self) -> list[str]:
        """The conv feature encoder's parameters stop requiring gradients (transformers' method of that name);
        returns their keys."""
        if hasattr(self.encoder, "freeze_feature_encoder"):
            self.encoder.freeze_feature_encoder()
            return [name for name, p in self.named_parameters() if not p.requires_grad]
        return freeze_feature_encoder(self)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> SpeechEncoderDecoderModel:
        """Loads a composed checkpoint directory (see the module function `from_pretrained`), in eval mode;
        what the load did is in `.load_report`."""
        model, report = from_pretrained(directory)
        model.load_report = report
        return model

    def save_pretrained(self, directory: str | Path, params: Mapping[str, Any] | None = None,
                        formats: tuple[str, ...] = ("safetensors",), overwrite: bool = False) -> list[Path]:
        """Writes config.json and model.safetensors as HF's `save_pretrained` does (HF's keys, tied weights left
        out), and flax_model.msgpack (HF's Flax layout) too when `formats` has "flax"; the generation config;
        atomically (`convert.base.params.pretrained_directory`).

        Args:
            directory: a new (or empty) directory; an existing one only with `overwrite`.
            params: state-dict keys -> tensors written instead of the model's own (e.g. trained weights, or
                each parameter's `.grad` to compare with the Flax gradients); keys left out keep the model's.
            formats: "safetensors" and/or "flax". Updating a directory also rewrites every format it holds, so
                that no weight file of the old model stays beside the new one.
            overwrite: update an existing directory this toolkit wrote (e.g. the one the model came from): its
                config, generation config and weight files are replaced, every other file is kept.

        Returns:
            The files written.

        Raises:
            UnsupportedConfig: a key of `params` the model does not have, or a wrong shape.
        """
        try:
            state = state_with(self, params)
        except KeyError as e:
            raise UnsupportedConfig(f"params: {e.args[0]}: not a parameter of this model") from None
        except ValueError as e:
            raise UnsupportedConfig(f"params: {e}") from None
        keymap = composed_keymap(self.config)
        leaves = {}
        for key, tensor in state.items():
            path, transform = keymap.to_flax(key)
            leaves[path] = transform.to_flax(tensor.contiguous().numpy())
        formats = tuple(dict.fromkeys([*formats, *weight_formats(directory)])) if overwrite is True else formats
        with pretrained_directory(directory, overwrite) as tmp:
            files = save_params(tmp, self.config, leaves, formats=formats)
            if self.generation_config is not None:
                files.append(self.generation_config.write(tmp))
        return [Path(directory) / f.name for f in files]

    def generate(self, inputs, attention_mask=None, **kwargs):
        """Greedy or beam-search decoding; see `torch_reference.generation.generate`."""
        return _generate(self, inputs, attention_mask, **kwargs)


def ctc_loss(logits: torch.Tensor, frames: torch.Tensor, targets: list[torch.Tensor], head: Any) -> torch.Tensor:
    """transformers' `Wav2Vec2ForCTC` loss: log-softmax in float32, `torch.nn.functional.ctc_loss` over the
    concatenated targets with the head's blank, reduction and `zero_infinity`.

    Args:
        logits: [B, S, V]; frames: [B] real frames of each utterance; targets: B label tensors; head: the
            composed config's `ctc` section.
    """
    log_probs = nn.functional.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    lengths = torch.tensor([len(t) for t in targets])
    flat = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return nn.functional.ctc_loss(log_probs, flat, frames, lengths, blank=head.blank_id,
                                  reduction=head.loss_reduction, zero_infinity=head.zero_infinity)


def non_trainable_paths(config: SpeechEncoderDecoderConfig) -> frozenset[str]:
    """Flax paths of what the reference keeps as buffers (e.g. a logits bias), which transformers never trains.

    The model is built on the meta device: nothing is allocated.
    """
    with torch.device("meta"):
        model = SpeechEncoderDecoderModel(config)
    keymap = composed_keymap(config)
    persistent = set(model.state_dict())
    found = (keymap.to_flax(name) for name, _ in model.named_buffers() if name in persistent)
    return frozenset(f[0] for f in found if f is not None)


def from_pretrained(directory: str | Path) -> tuple[SpeechEncoderDecoderModel, LoadReport]:
    """Loads a composed checkpoint directory (`model.safetensors`, sharded or not, or `pytorch_model.bin`).

    A directory holding only Flax weights is converted through the key table on the fly.
    """
    checkpoint = Checkpoint(directory)
    if checkpoint.config.get("model_type") != "speech-encoder-decoder":
        raise UnsupportedConfig(f"{checkpoint.directory / 'config.json'}: not a composed speech-encoder-decoder model")
    config = SpeechEncoderDecoderConfig.from_hf_dict(checkpoint.config, str(checkpoint.directory / "config.json"))
    # The config's layer counts and sizes are checked against the weights' names and shapes on a model built on
    # the meta device (nothing allocated): a config that asks for more than the weights hold is refused before
    # a model of its size is made.
    check_layer_counts(checkpoint, config)
    with torch.device("meta"):
        plan_checkpoint(checkpoint, _flax_shapes_of(SpeechEncoderDecoderModel(config)))
    model = SpeechEncoderDecoderModel(config).eval()
    model.generation_config = GenerationConfig.from_directory(directory)  # generation_config.json, else config.json
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
