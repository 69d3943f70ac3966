"""The composed speech encoder-decoder in Flax: encoder -> optional projection -> decoder with cross-attention.

`SpeechEncoderDecoderModule` is the linen module (param tree `encoder/...`, `decoder/...`,
`enc_to_dec_proj/...`, as HF's `FlaxSpeechEncoderDecoderModule`). `FlaxSpeechEncoderDecoderModel` is the
class users load: it holds a config and params and offers `from_pretrained`, `save_pretrained`,
`__call__`, `encode`, `decode`, `init_cache` and `generate`, each compiled once per input shape.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from convert.checkpoint import FLAX_FIRST
from convert.composed import SpeechEncoderDecoderConfig
from convert.configs import HFConfig
from convert.errors import UnsupportedConfig
from convert.hub import resolve_source
from convert.params import load_params, save_params
from convert.registry import spec_for
from convert.writing import atomic_directory, parse_size
from flax_model.cache import DecoderCache
from flax_model.layers import frame_mask
from flax_model.generation import generate as _generate
from flax_model.registry import arch_module, module_for
from flax_model.sharding import generate_on_mesh, load_sharded, on_mesh


class SpeechEncoderDecoderModule(nn.Module):
    """HF's speech encoder-decoder layout over our encoder and decoder modules."""

    config: SpeechEncoderDecoderConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = module_for(cfg.encoder, "encoder", dtype=self.dtype)
        self.decoder = module_for(cfg.decoder, "decoder", dtype=self.dtype)
        if cfg.has_projection:
            self.enc_to_dec_proj = nn.Dense(
                cfg.decoder.hidden_size,
                dtype=self.dtype,
                kernel_init=jax.nn.initializers.normal(cfg.decoder.init_scale),
            )

    def encode(
        self,
        inputs: jax.Array,  # [B, N] raw audio
        attention_mask: jax.Array | None = None,  # [B, N]
        deterministic: bool = True,
        freeze_feature_encoder: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Returns the encoder output in the decoder's width [B, S, D] and its padding mask [B, S] (bool)."""
        hidden = self.encoder(
            inputs, attention_mask, deterministic=deterministic, freeze_feature_encoder=freeze_feature_encoder
        )
        if attention_mask is None:
            mask = jnp.ones(hidden.shape[:2], dtype=bool)
        else:
            mask = frame_mask(self.config.encoder, attention_mask, hidden.shape[1])
        if self.config.has_projection:
            hidden = self.enc_to_dec_proj(hidden)
        return hidden, mask

    def decode(
        self,
        decoder_input_ids: jax.Array,  # [B, T]
        encoder_hidden_states: jax.Array | None,  # [B, S, D]
        encoder_attention_mask: jax.Array | None,  # [B, S]
        decoder_attention_mask: jax.Array | None = None,  # [B, T]
        cache: DecoderCache | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, DecoderCache | None]:
        """Returns logits [B, T, V] and, when a cache is passed, the updated cache."""
        return self.decoder(
            decoder_input_ids,
            decoder_attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            cache=cache,
            deterministic=deterministic,
        )

    def init_cache(
        self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array, encoder_attention_mask: jax.Array
    ) -> DecoderCache:
        """An empty self-attention cache plus the cross-attention keys/values, projected once."""
        return self.decoder.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)

    def __call__(
        self,
        inputs: jax.Array,
        attention_mask: jax.Array | None,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        freeze_feature_encoder: bool = False,
    ) -> jax.Array:
        hidden, mask = self.encode(inputs, attention_mask, deterministic, freeze_feature_encoder)
        logits, _ = self.decode(decoder_input_ids, hidden, mask, decoder_attention_mask, deterministic=deterministic)
        return logits


def init_shapes(config: SpeechEncoderDecoderConfig, trace_every_layer: bool = False) -> dict:
    """The abstract param tree (jax.ShapeDtypeStruct leaves); nothing is allocated.

    The transformer layers of a stack are identical in shape, so the model is traced with one layer per
    stack and that layer's subtree is repeated (tracing all 36 layers of wav2vec2-large + BART-large takes
    most of a second, a third of composing it in bfloat16). `trace_every_layer` traces the whole model.
    """
    stacks = [(part, spec_for(getattr(config, part), role=part).layer_stack) for part in ("encoder", "decoder")]
    traced = config
    if not trace_every_layer:
        traced = dataclasses.replace(config, **{
            part: getattr(config, part).replace(**{field: min(1, getattr(getattr(config, part), field))})
            for part, (field, _) in stacks})
    module = SpeechEncoderDecoderModule(traced)
    inputs = jnp.zeros((1, config.encoder.min_input_length), jnp.float32)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), inputs, None, ids))["params"]
    if trace_every_layer:
        return params
    flat = traverse_util.flatten_dict(params, sep="/")
    for part, (field, stack) in stacks:
        prefix = f"{part}/{stack}0/"
        layer = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        flat = {k: v for k, v in flat.items() if not k.startswith(prefix)}
        for i in range(getattr(getattr(config, part), field)):
            flat.update({f"{part}/{stack}{i}/{k}": v for k, v in layer.items()})
    return traverse_util.unflatten_dict(flat, sep="/")


def init_tree(config: HFConfig) -> dict[str, Any]:
    """The abstract param tree (nested dict of jax.ShapeDtypeStruct) of a composed or single-architecture model."""
    if isinstance(config, SpeechEncoderDecoderConfig):
        return init_shapes(config)
    return arch_module(spec_for(config)).init_shapes(config)


def param_shapes(config: HFConfig) -> dict[str, tuple[int, ...]]:
    """Every Flax leaf of the model `config` describes, `/`-joined, with its shape (nothing is allocated)."""
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(init_tree(config), sep="/").items()}


@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: jax.Array  # [B, S, D] in the decoder's width (after enc_to_dec_proj)
    attention_mask: jax.Array  # [B, S] bool


@dataclasses.dataclass
class Seq2SeqLMOutput:
    logits: jax.Array  # [B, T, V]
    encoder_last_hidden_state: jax.Array | None = None
    encoder_attention_mask: jax.Array | None = None


class FlaxSpeechEncoderDecoderModel:
    """A composed speech encoder-decoder with its params, ready to run, save and generate.

    Args:
        config: the composed config.
        params: nested dict in HF's Flax layout (`encoder`, `decoder`, `enc_to_dec_proj`).
        dtype: the computation dtype (params are kept as given).
    """

    mesh: Any = None  # the jax.sharding.Mesh the params are placed on (from_pretrained(mesh=...))

    def __init__(self, config: SpeechEncoderDecoderConfig, params: dict, dtype: Any = jnp.float32):
        self.config = config
        self.params = params
        self.dtype = dtype
        self.module = SpeechEncoderDecoderModule(config, dtype=dtype)
        self._compiled: dict[str, Any] = {}

    # -- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | Path, revision: str | None = None, dtype: Any = jnp.float32, mesh: Any = None
    ) -> FlaxSpeechEncoderDecoderModel:
        """Loads a composed checkpoint from a directory or a Hub repo id (`flax_model.msgpack` or safetensors).

        Args:
            path_or_repo: a local directory, or a Hub repo id resolved through huggingface_hub's cache.
            revision: the Hub revision (branch, tag or commit), for repo ids.
            dtype: the computation dtype.
            mesh: a `jax.sharding.Mesh` (axes among `data`, `fsdp`, `model`) to place every parameter on as
                a sharded `jax.Array`, each process reading only its devices' shards (`flax_model.sharding`).
        """
        directory = resolve_source(str(path_or_repo), revision, what="model").path
        if mesh is not None:
            loaded = load_sharded(directory, mesh, param_shapes, prefer=FLAX_FIRST)
        else:
            loaded = load_params(directory, param_shapes, prefer=FLAX_FIRST)
        if not isinstance(loaded.config, SpeechEncoderDecoderConfig):
            raise UnsupportedConfig(f"{directory}/config.json: not a composed speech-encoder-decoder model")
        if mesh is not None:
            return on_mesh(cls(loaded.config, loaded.params, dtype=dtype), mesh)
        config, params = loaded.config, traverse_util.flatten_dict(loaded.params, sep="/")
        del loaded  # `params` now holds the only reference to each numpy leaf: it goes once copied to JAX
        for path in params:
            params[path] = jnp.asarray(params[path])
        return cls(config, traverse_util.unflatten_dict(params, sep="/"), dtype=dtype)

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str | None = None) -> list[Path]:
        """Writes config.json, flax_model.msgpack and model.safetensors (HF layouts), atomically.

        Returns:
            The files written.
        """
        flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(self.params, sep="/").items()}
        with atomic_directory(directory, overwrite=True, param="directory") as tmp:
            files = save_params(tmp, self.config, flat, max_shard_size=parse_size(max_shard_size))
        return [Path(directory) / f.name for f in files]

    # -- running ---------------------------------------------------------------------------------------

    def _fn(self, method: str, static_argnames: tuple[str, ...] = ()) -> Any:
        """`module.apply(..., method=method)` compiled once (jax.jit caches per input shape)."""
        if method not in self._compiled:
            bound = getattr(SpeechEncoderDecoderModule, method)

            def run(params, *args, **kwargs):
                return self.module.apply({"params": params}, *args, method=bound, **kwargs)

            self._compiled[method] = jax.jit(run, static_argnames=static_argnames)
        return self._compiled[method]

    def __call__(
        self,
        inputs: Any,
        attention_mask: Any = None,
        decoder_input_ids: Any = None,
        decoder_attention_mask: Any = None,
        params: dict | None = None,
    ) -> Seq2SeqLMOutput:
        """Runs encoder and decoder (teacher forcing) and returns the logits [B, T, V]."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required")
        params = self.params if params is None else params
        encoded = self.encode(inputs, attention_mask, params=params)
        logits, _ = self.decode(decoder_input_ids, encoded, decoder_attention_mask, params=params)
        return Seq2SeqLMOutput(logits, encoded.last_hidden_state, encoded.attention_mask)

    def encode(self, inputs: Any, attention_mask: Any = None, params: dict | None = None) -> EncoderOutput:
        params = self.params if params is None else params
        inputs = jnp.asarray(inputs, jnp.float32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        hidden, out_mask = self._fn("encode")(params, inputs, mask)
        return EncoderOutput(hidden, out_mask)

    def decode(
        self,
        decoder_input_ids: Any,
        encoder_outputs: EncoderOutput | None,
        decoder_attention_mask: Any = None,
        cache: DecoderCache | None = None,
        params: dict | None = None,
    ) -> tuple[jax.Array, DecoderCache | None]:
        """Decoder logits for `decoder_input_ids`; with a cache (from `init_cache`) the encoder output is not
        needed again and the returned cache holds the new positions."""
        params = self.params if params is None else params
        ids = jnp.asarray(decoder_input_ids, jnp.int32)
        dmask = None if decoder_attention_mask is None else jnp.asarray(decoder_attention_mask, jnp.int32)
        hidden = None if encoder_outputs is None or cache is not None else encoder_outputs.last_hidden_state
        emask = None if encoder_outputs is None or cache is not None else encoder_outputs.attention_mask
        return self._fn("decode")(params, ids, hidden, emask, dmask, cache)

    def init_cache(
        self, batch_size: int, max_length: int, encoder_outputs: EncoderOutput, params: dict | None = None
    ) -> DecoderCache:
        params = self.params if params is None else params
        fn = self._fn("init_cache", ("batch_size", "max_length"))
        return fn(
            params,
            batch_size=batch_size,
            max_length=max_length,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=encoder_outputs.attention_mask,
        )

    def generate(self, inputs: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        """Greedy or beam-search transcription; see `flax_model.generation.generate`. On a mesh the batch is
        split over its `data` axis (`flax_model.sharding.generate_on_mesh`); the tokens are the same."""
        if self.mesh is not None:
            return generate_on_mesh(self, _generate, inputs, attention_mask, **kwargs)
        return _generate(self, inputs, attention_mask, **kwargs)

