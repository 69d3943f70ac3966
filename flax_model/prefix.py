"""The prefix composition in Flax (SLAM-ASR style): speech encoder -> frame stacking -> projector -> the embeddings
of a decoder-only LM, placed where the prompt's `{audio}` stands (`convert.base.prefix` has the config and layout).

Batch layout (`PADDING_SIDE = "left"`): row i's prefix is [prompt before][its n_i audio embeddings][prompt
after], L_i = Tb + n_i + Ta columns, padded on the left to P = Tb + A + Ta (A the batch's most audio
embeddings), so that every row's text starts at column P; the transcript is padded on the right. Padded columns
are masked out of attention, and positions count each row's real columns only (position = its number of real
columns before it), so that a row's logits are those of the utterance alone.

    columns     0 .. P-L_i-1 | P-L_i .. P-1                     | P .. P+T-1
    row i       padding      | before, audio_i, after           | transcript tokens (right-padded)
    positions   (masked)     | 0 .. L_i - 1                     | L_i .. L_i + T - 1

Training (`loss_sums`): the decoder reads the prefix and the labels shifted right (the last prefix column
predicts the first label); the loss covers the label tokens only, never the prompt or the audio. Generation:
the prefix but its last column is prefilled into the cache; each step feeds one column (first the prefix's
last, then the generated tokens), with the row's own position; the search is `flax_model.generation`'s (greedy,
sampling, beam search, the processors), whose sequences start with a placeholder (the generation config's start
token, never fed to the model) followed by the transcript.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from convert.base.errors import UnsupportedConfig
from convert.base.generation_settings import (
    GenerationConfig,
    GenerationConfigError,
    GenerationSettings,
    model_generation_config,
    resolve_settings,
)
from convert.base.hub import resolve_source
from convert.base.lora import LoraSettings
from convert.base.stacking import layer_stacks
from convert.base.prefix import SpeechPrefixConfig, not_prefix_model_file, prefix_generation_config, projector_shapes
from convert.base.prefix_io import load_prefix_params, save_prefix_params
from convert.base.outputs import atomic_directory
from flax_model.cache import DecoderCache
from flax_model.generation import GenerateOutput, beam_search, greedy_or_sample, search_output, traced_values
from flax_model.layers import ACTIVATIONS, Dense, frame_mask
from flax_model.lora import lora_updates
from flax_model.registry import module_for
from flax_model.speech_encoder_decoder import check_generate_inputs, init_tree
from flax_model.layer_calls import layer_pattern, pure_layers
from flax_model.training import IGNORE_INDEX, LossSums, loss_sums

# ----------------------------------------------------------------------------------------------------------
# Pieces


def stack_frames(hidden: jax.Array, k: int) -> jax.Array:
    """[B, S, E] -> [B, S // k, k E]: k consecutive frames side by side (frame t's features first), the last
    S mod k frames dropped (SLAM-LLM's `EncoderProjectorConcat`)."""
    batch, frames, width = hidden.shape
    kept = (frames // k) * k
    return hidden[:, :kept].reshape(batch, frames // k, k * width)


def prefix_layout(audio_lengths: jax.Array, audio_slots: int, before: int, after: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Where each column of the left-padded prefix comes from.

    Args:
        audio_lengths: [B] real audio embeddings of each row (n_i <= audio_slots).
        audio_slots: A, the batch's audio embeddings (padded).
        before, after: Tb, Ta, the prompt's ids before and after the audio.

    Returns:
        (index [B, P] into the concatenation [prompt before (Tb), audio (A), prompt after (Ta)], real [B, P]
        bool), P = Tb + A + Ta.
    """
    width = before + audio_slots + after
    length = before + audio_lengths + after  # [B]
    offset = jnp.arange(width)[None, :] - (width - length)[:, None]  # [B, P]: column within the row's prefix
    real = offset >= 0
    n = audio_lengths[:, None]
    index = jnp.where(offset < before + n, offset, offset - n + audio_slots)  # prompt after sits past all slots
    return jnp.where(real, index, 0), real


def positions_of(mask: jax.Array) -> jax.Array:
    """[B, T] bool -> [B, T] int32: each column's number of real columns before it (0 for leading padding)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


class Projector(nn.Module):
    """linear: Linear(K E -> D); mlp: Linear(K E -> inner), activation, Linear(inner -> D). Params `linear_1`,
    `linear_2` (kernels [in, out])."""

    config: SpeechPrefixConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(cfg.decoder.init_scale)
        if cfg.projector_type == "linear":
            return Dense(cfg.decoder.hidden_size, dtype=self.dtype, kernel_init=init, name="linear_1")(x)
        x = Dense(cfg.projector_inner_size, dtype=self.dtype, kernel_init=init, name="linear_1")(x)
        x = ACTIVATIONS[cfg.projector_activation](x)
        return Dense(cfg.decoder.hidden_size, dtype=self.dtype, kernel_init=init, name="linear_2")(x)


def _with_lora(method: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a method of `SpeechPrefixModule` with the LoRA updates of its adapted layers (`flax_model.lora`)."""

    @functools.wraps(method)
    def run(self: SpeechPrefixModule, *args: Any, **kwargs: Any) -> Any:
        with lora_updates(self.lora):
            return method(self, *args, **kwargs)

    return run


class SpeechPrefixModule(nn.Module):
    """Param tree: `encoder/...` and `decoder/...` (each part's own Flax layout), `projector/...`."""

    config: SpeechPrefixConfig
    dtype: Any = jnp.float32
    # Rematerialise every encoder and decoder layer in `loss_sums` (training: memory for compute).
    remat: bool = False
    lora: LoraSettings | None = None

    def setup(self) -> None:
        cfg = self.config
        self.encoder = module_for(cfg.encoder, "encoder", dtype=self.dtype)
        self.decoder = module_for(cfg.decoder, "decoder", dtype=self.dtype)
        self.projector = Projector(cfg, self.dtype)

    @_with_lora
    def audio(self, inputs: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True,
              freeze_feature_encoder: bool = False, mask_time_indices: jax.Array | None = None,
              mask_feature_indices: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Waveforms [B, N] -> (audio embeddings [B, A, D], their counts [B] int32)."""
        cfg = self.config
        masks = {name: value for name, value in (("mask_time_indices", mask_time_indices),
                                                 ("mask_feature_indices", mask_feature_indices)) if value is not None}
        hidden = self.encoder(inputs, attention_mask, deterministic=deterministic,
                              freeze_feature_encoder=freeze_feature_encoder, **masks)  # [B, S, E]
        if attention_mask is None:
            frames = jnp.full((hidden.shape[0],), hidden.shape[1], jnp.int32)
        else:
            frames = frame_mask(cfg.encoder, attention_mask, hidden.shape[1]).sum(-1).astype(jnp.int32)
        audio = self.projector(stack_frames(hidden, cfg.stack_frames))  # [B, S // K, D]
        return audio, cfg.audio_lengths(frames)

    @_with_lora
    def prefix(self, inputs: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True,
               freeze_feature_encoder: bool = False, mask_time_indices: jax.Array | None = None,
               mask_feature_indices: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The left-padded prefix: (embeddings [B, P, D], real columns [B, P] bool)."""
        cfg = self.config
        audio, lengths = self.audio(inputs, attention_mask, deterministic, freeze_feature_encoder,
                                    mask_time_indices, mask_feature_indices)
        batch, slots = audio.shape[:2]
        pieces = [self.decoder.embed(jnp.asarray(ids, jnp.int32)[None]) for ids in
                  (cfg.prompt_ids_before, cfg.prompt_ids_after)]  # [1, Tb, D], [1, Ta, D]
        source = jnp.concatenate([jnp.broadcast_to(pieces[0], (batch, *pieces[0].shape[1:])).astype(audio.dtype),
                                  audio,
                                  jnp.broadcast_to(pieces[1], (batch, *pieces[1].shape[1:])).astype(audio.dtype)],
                                 axis=1)  # [B, Tb + A + Ta, D]
        index, real = prefix_layout(lengths, slots, len(cfg.prompt_ids_before), len(cfg.prompt_ids_after))
        embeds = jnp.take_along_axis(source, index[..., None], axis=1)
        return jnp.where(real[..., None], embeds, 0).astype(audio.dtype), real

    @_with_lora
    def decode_embeds(self, inputs_embeds: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                      cache: DecoderCache | None = None, deterministic: bool = True, head_from: int = 0
                      ) -> tuple[jax.Array, DecoderCache | None]:
        """The decoder on embeddings [B, T, D] with per-row positions [B, T]; logits [B, T - head_from, V] of the
        columns from `head_from` on (the head runs only where logits are needed). `attention_mask` is [B, T]
        without a cache, [B, L] (every cache slot) with one."""
        hidden, cache = self.decoder.hidden_states(None, attention_mask, None, None, cache, deterministic,
                                                   inputs_embeds, position_ids=position_ids)
        return self.decoder.logits(hidden[:, head_from:]), cache

    @_with_lora
    def __call__(self, inputs: jax.Array, attention_mask: jax.Array | None, text_ids: jax.Array,
                 text_mask: jax.Array | None = None, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced logits of every column, [B, P + T, V], and the real columns [B, P + T] (text_ids [B, T]
        right-padded; `text_mask` [B, T], None: all real)."""
        embeds, real = self.prefix(inputs, attention_mask, deterministic)
        text_mask = jnp.ones(text_ids.shape, bool) if text_mask is None else text_mask.astype(bool)
        mask = jnp.concatenate([real, text_mask], axis=1)
        sequence = jnp.concatenate([embeds, self.decoder.embed(text_ids).astype(embeds.dtype)], axis=1)
        logits, _ = self.decode_embeds(sequence, mask, positions_of(mask), deterministic=deterministic)
        return logits, mask

    @_with_lora
    def loss_sums(self, inputs: jax.Array, attention_mask: jax.Array | None, labels: jax.Array,
                  deterministic: bool = True, freeze_feature_encoder: bool = False,
                  mask_time_indices: jax.Array | None = None, mask_feature_indices: jax.Array | None = None,
                  decoder_attention_mask: jax.Array | None = None, ctc_labels: jax.Array | None = None,
                  with_ctc: bool = False) -> LossSums:
        """Loss terms over the label tokens ([B, T], -100 for padding; a transcript's ids then eos): the prefix's
        last column predicts the first label, each label the next. The signature is the composed model's
        (`flax_model.training` calls either); the prefix composition has no CTC head and takes no decoder mask
        (padding is the labels' -100)."""
        if with_ctc or decoder_attention_mask is not None:
            raise ValueError("a prefix composition has no CTC head, and its decoder mask comes from the labels")
        with pure_layers(layer_pattern(list(layer_stacks(self.config))), remat=self.remat):
            return self._loss_sums(inputs, attention_mask, labels, deterministic, freeze_feature_encoder,
                                   mask_time_indices, mask_feature_indices)

    def _loss_sums(self, inputs, attention_mask, labels, deterministic, freeze_feature_encoder, mask_time_indices,
                   mask_feature_indices) -> LossSums:
        cfg = self.config
        embeds, real = self.prefix(inputs, attention_mask, deterministic, freeze_feature_encoder, mask_time_indices,
                                   mask_feature_indices)
        text = labels[:, :-1]
        text_mask = text != IGNORE_INDEX
        mask = jnp.concatenate([real, text_mask], axis=1)
        text_embeds = self.decoder.embed(jnp.where(text_mask, text, cfg.pad_token_id)).astype(embeds.dtype)
        sequence = jnp.concatenate([embeds, text_embeds], axis=1)
        logits, _ = self.decode_embeds(sequence, mask, positions_of(mask), deterministic=deterministic,
                                       head_from=embeds.shape[1] - 1)  # [B, T, V]
        return loss_sums(logits, labels)

    def init_cache(self, batch_size: int, max_length: int) -> DecoderCache:
        return self.decoder.init_cache(batch_size, max_length)


# ----------------------------------------------------------------------------------------------------------
# Generation


def search_function(module: SpeechPrefixModule, settings: GenerationSettings) -> Callable:
    """The function to jit: (params, prefix [B, P, D], real [B, P], traced settings, PRNG key) -> the search's
    dict (`flax_model.generation.greedy_or_sample` / `beam_search`)."""

    def run(params, embeds, real, traced, key):
        variables = {"params": params}
        if settings.num_beams == 1 and settings.num_return_sequences > 1:
            embeds = jnp.repeat(embeds, settings.num_return_sequences, axis=0)
            real = jnp.repeat(real, settings.num_return_sequences, axis=0)
        batch, width = real.shape
        max_length = width - 1 + settings.max_new_tokens  # the prefix but its last column, then one per step
        mask = jnp.concatenate([real, jnp.ones((batch, max_length - width), bool)], axis=1)  # [B, L]
        padding = width - real.sum(1).astype(jnp.int32)  # [B] left padding: position = slot - padding
        cache = module.apply(variables, batch, max_length, method="init_cache")
        if width > 1:
            _, cache = module.apply(variables, embeds[:, :-1], mask, positions_of(real[:, :-1]), cache,
                                    method="decode_embeds", head_from=width - 2)
        last = embeds[:, -1:]  # [B, 1, D]: fed at the first step

        def decode(tokens: jax.Array, cache: DecoderCache) -> tuple[jax.Array, DecoderCache]:
            per_row = tokens.shape[0] // batch  # beams: row b * K + k is utterance b's
            spread = lambda a: jnp.repeat(a, per_row, axis=0)  # noqa: E731
            first = cache.index == width - 1
            step_embeds = module.apply(variables, tokens, method=lambda m, t: m.decoder.embed(t))
            step_embeds = jnp.where(first, spread(last), step_embeds.astype(last.dtype))
            positions = (cache.index - spread(padding))[:, None]  # [N, 1]
            logits, cache = module.apply(variables, step_embeds, spread(mask), positions, cache,
                                         method="decode_embeds")
            return logits[:, -1].astype(jnp.float32), cache

        if settings.num_beams == 1:
            return greedy_or_sample(decode, cache, settings, traced, key)
        return beam_search(decode, cache, settings, traced, key)

    return run


# ----------------------------------------------------------------------------------------------------------
# The model users load


@dataclasses.dataclass
class PrefixOutput:
    embeddings: jax.Array  # [B, P, D] the left-padded prefix
    mask: jax.Array  # [B, P] bool, its real columns


def param_shapes(config: SpeechPrefixConfig) -> dict[str, tuple[int, ...]]:
    """Every Flax leaf of the prefix model, `/`-joined, with its shape (nothing is allocated)."""
    out = {}
    for part in ("encoder", "decoder"):
        tree = traverse_util.flatten_dict(init_tree(getattr(config, part)), sep="/")
        out.update({f"{part}/{k}": tuple(v.shape) for k, v in tree.items()})
    return {**out, **projector_shapes(config)}


def _part_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(init_tree(config), sep="/").items()}


class FlaxSpeechPrefixModel:
    """A prefix-composed model with its params: `from_pretrained`, `save_pretrained`, `__call__`, `encode`,
    `loss`, `generate`, each compiled once per input shape.

    Args:
        config: the prefix config.
        params: nested dict `encoder`, `decoder`, `projector` (each part in its own Flax layout); with `lora`,
            LoRA factors beside the adapted kernels (`convert.base.lora`).
        dtype: the computation dtype.
        lora: LoRA settings when `params` hold LoRA factors.
    """

    mesh: Any = None

    def __init__(self, config: SpeechPrefixConfig, params: dict, dtype: Any = jnp.float32,
                 lora: LoraSettings | None = None):
        self.config = config
        self.params = params
        self.dtype = dtype
        self.lora = lora
        self.module = SpeechPrefixModule(config, dtype=dtype, lora=lora)
        self._compiled: dict[Any, Any] = {}
        self.generation_config: GenerationConfig | None = None

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, revision: str | None = None,
                        dtype: Any = jnp.float32) -> FlaxSpeechPrefixModel:
        """Loads a prefix-composed directory (or Hub repo id): each part from its own directory
        (`flax_model.msgpack` preferred), the projector from `projector.safetensors`; the generation config from
        `decoder/`."""
        from convert.base.checkpoint import FLAX_FIRST

        directory = resolve_source(str(path_or_repo), revision, what="model").path
        config, flat = load_prefix_params(directory, _part_shapes, prefer=FLAX_FIRST)
        params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
        model = cls(config, params, dtype=dtype)
        model.generation_config = prefix_generation_config(
            GenerationConfig.from_directory(Path(directory) / "decoder"), config)
        return model

    def save_pretrained(self, directory: str | Path, params: dict | None = None, overwrite: bool = False
                        ) -> list[Path]:
        """Writes the prefix layout (`convert.base.prefix`), atomically; `params` (any tree of the model's shape,
        e.g. trained params or gradients) instead of `self.params`. LoRA factors must be merged or split off
        first (`convert.base.lora.merge_lora`). `overwrite`: replace a directory this toolkit wrote, keeping its
        other top-level files (the part directories are written anew).

        Raises:
            UnsupportedConfig: `params` lacks a leaf of the model, has one it does not, or a wrong shape.
        """
        flat = traverse_util.flatten_dict(dict(self.params if params is None else params), sep="/")
        expected = param_shapes(self.config)
        problems = sorted(set(flat) ^ set(expected)) + sorted(
            k for k in set(flat) & set(expected) if tuple(np.shape(flat[k])) != tuple(expected[k]))
        if problems:
            raise UnsupportedConfig(f"params: {problems[0]}: not a leaf of this model, missing, or misshapen"
                                    + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        with atomic_directory(directory, overwrite=overwrite, param="directory", keep=not_prefix_model_file) as tmp:
            files = save_prefix_params(tmp, self.config, {k: np.asarray(v) for k, v in flat.items()})
            if self.generation_config is not None:
                files.append(self.generation_config.write(tmp / "decoder"))
        return [Path(directory) / f.relative_to(tmp) for f in files]

    def _fn(self, method: str, static_argnames: tuple[str, ...] = ()) -> Any:
        if method not in self._compiled:
            bound = getattr(SpeechPrefixModule, method)

            def run(params, *args, **kwargs):
                return self.module.apply({"params": params}, *args, method=bound, **kwargs)

            self._compiled[method] = jax.jit(run, static_argnames=static_argnames)
        return self._compiled[method]

    def encode(self, inputs: Any, attention_mask: Any = None, params: dict | None = None) -> PrefixOutput:
        """The left-padded prefix of a batch of waveforms."""
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        embeds, real = self._fn("prefix")(self.params if params is None else params,
                                          jnp.asarray(inputs, jnp.float32), mask)
        return PrefixOutput(embeds, real)

    def __call__(self, inputs: Any, attention_mask: Any = None, text_ids: Any = None, text_mask: Any = None,
                 params: dict | None = None) -> tuple[jax.Array, jax.Array]:
        """Teacher-forced logits of every column [B, P + T, V] and the real columns [B, P + T] (see the module
        docstring); `text_ids` [B, T] right-padded (`text_mask` marks the real ones)."""
        if text_ids is None:
            raise ValueError("text_ids is required (it may have 0 columns)")
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        tmask = None if text_mask is None else jnp.asarray(text_mask, jnp.int32)
        return self._fn("__call__")(self.params if params is None else params, jnp.asarray(inputs, jnp.float32),
                                    mask, jnp.asarray(text_ids, jnp.int32), tmask)

    def loss(self, inputs: Any, attention_mask: Any, labels: Any, params: dict | None = None, *,
             label_smoothing: float = 0.0, dropout_rng: jax.Array | None = None,
             freeze_feature_encoder: bool = False, mask_time_indices: Any = None,
             mask_feature_indices: Any = None) -> jax.Array:
        """The mean cross-entropy over the label tokens (-100 elsewhere), a pure function of `params`."""
        params = self.params if params is None else params
        deterministic = dropout_rng is None
        key = ("loss", deterministic, bool(freeze_feature_encoder))
        if key not in self._compiled:
            def run(params, inputs, mask, labels, smoothing, rng, time_mask, feature_mask):
                sums = self.module.apply({"params": params}, inputs, mask, labels, deterministic,
                                         freeze_feature_encoder, time_mask, feature_mask,
                                         method=SpeechPrefixModule.loss_sums,
                                         rngs=None if deterministic else {"dropout": rng})
                return sums.mean(smoothing)

            self._compiled[key] = jax.jit(run)
        as_array = lambda x, dtype: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
        return self._compiled[key](params, jnp.asarray(inputs, jnp.float32), as_array(attention_mask, jnp.int32),
                                   jnp.asarray(labels, jnp.int32), jnp.float32(label_smoothing), dropout_rng,
                                   as_array(mask_time_indices, bool), as_array(mask_feature_indices, bool))

    def generate(self, inputs: Any, attention_mask: Any = None, generation_config: Any = None, *,
                 prng_key: jax.Array | None = None, params: dict | None = None, **kwargs: Any) -> GenerateOutput:
        """Transcribes a batch (greedy, sampling, beam search; the model's generation config, then
        `generation_config`, then keyword arguments). `sequences` [N, 1 + n]: a placeholder start token, then the
        transcript."""
        config = self.config
        check_generate_inputs(config.encoder, inputs, attention_mask)
        settings = resolve_settings(config, prefix_generation_config(model_generation_config(self), config),
                                    generation_config, **kwargs)
        if settings.do_sample and prng_key is None:
            raise GenerationConfigError("generate: do_sample=True needs an explicit prng_key (jax.random.PRNGKey(seed))")
        prefix = self.encode(inputs, attention_mask, params=params)
        width = prefix.mask.shape[1]
        positions = config.decoder.max_positions
        if width - 1 + settings.max_new_tokens > positions:
            raise GenerationConfigError(f"generate: a prefix of {width} columns and max_new_tokens="
                                        f"{settings.max_new_tokens} exceed the decoder's {positions} positions")
        key = ("generate", settings.static)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(search_function(self.module, settings))
        return search_output(self._compiled[key](self.params if params is None else params, prefix.embeddings,
                                                 prefix.mask, traced_values(settings),
                                                 jax.random.PRNGKey(0) if prng_key is None else prng_key))
