"""The composed speech encoder-decoder in Flax: encoder -> optional projection -> decoder with cross-attention.

`SpeechEncoderDecoderModule` is the linen module (param tree `encoder/...`, `decoder/...`,
`enc_to_dec_proj/...`, as HF's `FlaxSpeechEncoderDecoderModule`; with `scan_layers` the encoder's and decoder's
layer stacks run in one `nn.scan` each, their params stacked, see `convert.base.stacking`). `FlaxSpeechEncoderDecoderModel` is the
class users load: it holds a config and params and offers `from_pretrained`, `save_pretrained`,
`__call__`, `encode`, `decode`, `init_cache` and `generate`, each compiled once per input shape.
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

from convert.base import stacking
from convert.base.checkpoint import FLAX_FIRST, Checkpoint
from convert.base.composed import SpeechEncoderDecoderConfig
from convert.base.configs import HFConfig, encoder_input_shape
from convert.base.errors import UnsupportedConfig, UsageError
from convert.base.generation_settings import GenerationArgumentError, GenerationConfig
from convert.base.hub import resolve_source
from convert.base.labels import check_label_smoothing, check_labels
from convert.base.lora import LoraSettings
from convert.base.params import load_params, pretrained_directory, save_flax_msgpack, save_params
from convert.base.registry import spec_for
from convert.base.writing import TensorSpec, parse_size
from flax_model.cache import DecoderCache
from flax_model.generation import generate as _generate
from flax_model.layers import Dense, frame_mask, layer_scan
from flax_model.lora import lora_updates
from flax_model.random_bits import Dropout
from flax_model.registry import arch_module, module_for
from flax_model.sharding import (
    gathered_leaves,
    generate_on_mesh,
    is_writer,
    load_sharded,
    on_mesh,
    param_shardings,
    sync_processes,
)
from flax_model.ctc import ctc_loss_terms, ctc_targets
from flax_model.layer_calls import layer_pattern, pure_layers
from flax_model.training import IGNORE_INDEX, LossSums, shift_tokens_right
from flax_model.training import loss_sums as label_loss_sums


def _under_scan_setting(method: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a method of `SpeechEncoderDecoderModule` with its encoder's and decoder's layer stacks built as
    `scan_layers` says (`flax_model.layers.layer_scan`), and the LoRA updates of its adapted layers when it has
    `lora` settings (`flax_model.lora`)."""

    @functools.wraps(method)
    def run(self: SpeechEncoderDecoderModule, *args: Any, **kwargs: Any) -> Any:
        with layer_scan(self.scan_layers), lora_updates(self.lora):
            return method(self, *args, **kwargs)

    return run


class SpeechEncoderDecoderModule(nn.Module):
    """HF's speech encoder-decoder layout over our encoder and decoder modules."""

    config: SpeechEncoderDecoderConfig
    dtype: Any = jnp.float32
    # Rematerialise every encoder and decoder layer in `loss_sums` (training: memory for compute).
    remat: bool = False
    # Run each layer stack in one `nn.scan` (params stacked with a leading layer axis: `convert.base.stacking`).
    scan_layers: bool = False
    # LoRA: the params hold `lora_A` / `lora_B` beside the adapted kernels (`convert.base.lora`); None: no LoRA.
    lora: LoraSettings | None = None

    def setup(self) -> None:
        cfg = self.config
        self.encoder = module_for(cfg.encoder, "encoder", dtype=self.dtype)
        self.decoder = module_for(cfg.decoder, "decoder", dtype=self.dtype)
        if cfg.has_projection:
            self.enc_to_dec_proj = Dense(
                cfg.decoder.hidden_size,
                dtype=self.dtype,
                kernel_init=jax.nn.initializers.normal(cfg.decoder.init_scale),
            )
        if cfg.ctc is not None:  # Wav2Vec2ForCTC's dropout and lm_head, over the encoder output
            self.ctc_dropout = Dropout(cfg.ctc.dropout)
            self.ctc_head = Dense(cfg.ctc.vocab_size, dtype=self.dtype,
                                     kernel_init=jax.nn.initializers.normal(cfg.encoder.init_scale))

    @_under_scan_setting
    def encode(
        self,
        inputs: jax.Array,  # [B, N] samples, or [B, S, F] feature frames (`EncoderConfig.input_kind`)
        attention_mask: jax.Array | None = None,  # [B, N] / [B, S]
        deterministic: bool = True,
        freeze_feature_encoder: bool = False,
        mask_time_indices: jax.Array | None = None,  # [B, S] bool, S the encoder's frames before any adapter
        mask_feature_indices: jax.Array | None = None,  # [B, C] bool
    ) -> tuple[jax.Array, jax.Array]:
        """Returns the encoder output in the decoder's width [B, S, D] and its padding mask [B, S] (bool).

        `deterministic=False` applies dropout and LayerDrop (a "dropout" rng is needed); the SpecAugment masks
        (see `convert.base.spec_augment`) are applied when given; `freeze_feature_encoder` stops gradients at the
        conv feature encoder's output.
        """
        hidden, mask = self.encode_features(inputs, attention_mask, deterministic, freeze_feature_encoder,
                                            mask_time_indices, mask_feature_indices)
        return self.project(hidden), mask

    @_under_scan_setting
    def encode_features(
        self,
        inputs: jax.Array,  # [B, N]
        attention_mask: jax.Array | None = None,  # [B, N]
        deterministic: bool = True,
        freeze_feature_encoder: bool = False,
        mask_time_indices: jax.Array | None = None,
        mask_feature_indices: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """The speech encoder's own output [B, S, E] (before `enc_to_dec_proj`: what the CTC head reads) and its
        padding mask [B, S]; the arguments are `encode`'s."""
        masks = {name: value for name, value in (("mask_time_indices", mask_time_indices),
                                                 ("mask_feature_indices", mask_feature_indices)) if value is not None}
        hidden = self.encoder(inputs, attention_mask, deterministic=deterministic,
                              freeze_feature_encoder=freeze_feature_encoder, **masks)
        if attention_mask is None:
            mask = jnp.ones(hidden.shape[:2], dtype=bool)
        else:
            mask = frame_mask(self.config.encoder, attention_mask, hidden.shape[1])
        return hidden, mask

    def project(self, hidden: jax.Array) -> jax.Array:
        """The encoder output in the decoder's width (`enc_to_dec_proj` when the widths differ)."""
        return self.enc_to_dec_proj(hidden) if self.config.has_projection else hidden

    def ctc_logits(self, features: jax.Array, deterministic: bool = True) -> jax.Array:
        """The CTC head's logits [B, S, V] over the encoder's own output [B, S, E] (`encode_features`); dropout
        (`ctc.dropout`, transformers' `final_dropout`) in train mode."""
        if self.config.ctc is None:
            raise ValueError("this model has no CTC head (config.json has no 'ctc' section)")
        return self.ctc_head(self.ctc_dropout(features, deterministic=deterministic))

    @_under_scan_setting
    def encode_with_ctc(self, inputs: jax.Array, attention_mask: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """What joint decoding needs: the encoder output in the decoder's width [B, S, D], its mask [B, S], and
        the CTC head's logits [B, S, V] (float32)."""
        features, mask = self.encode_features(inputs, attention_mask)
        return self.project(features), mask, self.ctc_logits(features).astype(jnp.float32)

    @_under_scan_setting
    def ctc_only(self, inputs: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The CTC head's logits [B, S, V] (float32) and the frame mask [B, S]: CTC decoding without the decoder."""
        features, mask = self.encode_features(inputs, attention_mask)
        return self.ctc_logits(features).astype(jnp.float32), mask

    @_under_scan_setting
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

    @_under_scan_setting
    def init_cache(
        self, batch_size: int, max_length: int, encoder_hidden_states: jax.Array, encoder_attention_mask: jax.Array
    ) -> DecoderCache:
        """An empty self-attention cache plus the cross-attention keys/values, projected once (stacked over the
        layers when `scan_layers`)."""
        return self.decoder.init_cache(batch_size, max_length, encoder_hidden_states, encoder_attention_mask)

    @_under_scan_setting
    def __call__(
        self,
        inputs: jax.Array,
        attention_mask: jax.Array | None,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        freeze_feature_encoder: bool = False,
        mask_time_indices: jax.Array | None = None,
        mask_feature_indices: jax.Array | None = None,
    ) -> jax.Array:
        features, mask = self.encode_features(inputs, attention_mask, deterministic, freeze_feature_encoder,
                                              mask_time_indices, mask_feature_indices)
        if self.config.ctc is not None and self.is_initializing():
            self.ctc_logits(features)  # creates the head's params
        logits, _ = self.decode(decoder_input_ids, self.project(features), mask, decoder_attention_mask,
                                deterministic=deterministic)
        return logits

    def loss_sums(
        self,
        inputs: jax.Array,  # [B, N] or [B, S, F]
        attention_mask: jax.Array | None,  # [B, N] / [B, S]
        labels: jax.Array,  # [B, T], -100 for padding
        deterministic: bool = True,
        freeze_feature_encoder: bool = False,
        mask_time_indices: jax.Array | None = None,
        mask_feature_indices: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
        ctc_labels: jax.Array | None = None,
        with_ctc: bool = False,
    ) -> LossSums:
        """Teacher-forced loss terms: the decoder reads `labels` shifted right (transformers' semantics); with
        `with_ctc` also the CTC head's loss terms (`flax_model.ctc.ctc_loss_terms`) against `ctc_labels` [B, U]
        (-100 padding), by default the labels without the special tokens (a head over the decoder's vocabulary).
        Rows whose labels are all -100 (batch filler) count for nothing in either loss."""
        cfg = self.config
        if cfg.decoder_start_token_id is None or cfg.pad_token_id is None:
            raise ValueError("the loss needs decoder_start_token_id and pad_token_id in the config")
        decoder_input_ids = shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)

        def run() -> LossSums:
            features, mask = self.encode_features(inputs, attention_mask, deterministic, freeze_feature_encoder,
                                                  mask_time_indices, mask_feature_indices)
            logits, _ = self.decode(decoder_input_ids, self.project(features), mask, decoder_attention_mask,
                                    deterministic=deterministic)
            sums = label_loss_sums(logits, labels)
            if not with_ctc:
                return sums
            targets = ctc_labels
            if targets is None:
                if not cfg.ctc.shares_decoder_vocabulary:
                    raise ValueError("this CTC head has its own vocabulary: pass ctc_labels")
                targets = ctc_targets(labels, sorted(cfg.special_token_ids))
            rows = jnp.any(labels != IGNORE_INDEX, axis=1)
            ctc, count = ctc_loss_terms(self.ctc_logits(features, deterministic), mask, targets, rows, cfg.ctc)
            return sums.replace(ctc=ctc, ctc_count=count)

        if self.scan_layers:  # `nn.remat` inside each scan; bfloat16 residuals stacked as bits (written in place)
            with layer_scan(True, remat=self.remat, residual_bits=self.dtype == jnp.bfloat16):
                return run()
        with pure_layers(layer_pattern(layer_stacks(cfg)), remat=self.remat):  # unrolled layers: traced once
            return run()


def layer_stacks(config: SpeechEncoderDecoderConfig) -> list[str]:
    """The module paths of the composed model's layer stacks (`<part>/<stack>`, layer i at `<part>/<stack>i`)."""
    return [f"{part}/{spec_for(getattr(config, part), role=part).layer_stack[1]}" for part in ("encoder", "decoder")]


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
    inputs = jnp.zeros(encoder_input_shape(config.encoder, 1, config.encoder.min_input_length), jnp.float32)
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
    """The abstract param tree (nested dict of jax.ShapeDtypeStruct) of a composed or single-architecture model.

    Tracing a model's init takes a tenth of a second or more and every load, save and shape check asks for it, so
    the tree is kept per config (configs are frozen: equal configs give equal trees); each call gets its own
    copy of the dicts. A config that holds an unhashable value is traced every time."""
    try:
        tree = _cached_init_tree(config)
    except TypeError:  # unhashable field
        tree = _traced_init_tree(config)
    return jax.tree_util.tree_map(lambda leaf: leaf, tree)


def _traced_init_tree(config: HFConfig) -> dict[str, Any]:
    if isinstance(config, SpeechEncoderDecoderConfig):
        return init_shapes(config)
    return arch_module(spec_for(config)).init_shapes(config)


_cached_init_tree = functools.lru_cache(maxsize=64)(_traced_init_tree)


def param_shapes(config: HFConfig) -> dict[str, tuple[int, ...]]:
    """Every Flax leaf of the model `config` describes, `/`-joined, with its shape (nothing is allocated)."""
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(init_tree(config), sep="/").items()}


def stacked_param_shapes(config: HFConfig) -> dict[str, tuple[int, ...]]:
    """`param_shapes` in the stacked layout of scanned layers (`convert.base.stacking`)."""
    return stacking.stacked_shapes(param_shapes(config), stacking.layer_stacks(config))


def stack_params(config: HFConfig, params: dict) -> dict:
    """A nested param tree in HF's per-layer layout -> the stacked layout of scanned layers (bit-exact)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    stack = jnp.stack if any(isinstance(v, jax.Array) for v in flat.values()) else np.stack
    return traverse_util.unflatten_dict(stacking.stack_params(flat, stacking.layer_stacks(config), stack), sep="/")


def unstack_params(config: HFConfig, params: dict) -> dict:
    """A nested param tree in the stacked layout -> HF's per-layer layout (bit-exact; numpy leaves are views)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return traverse_util.unflatten_dict(stacking.unstack_params(flat, stacking.layer_stacks(config)), sep="/")


def _params_in_layout(config: HFConfig, params: dict, stacked: bool) -> dict:
    """`params` (either layout) in the stacked layout or HF's per-layer one."""
    paths = traverse_util.flatten_dict(dict(params), sep="/")
    if stacking.is_stacked(paths, stacking.layer_stacks(config)) == stacked:
        return params
    return stack_params(config, params) if stacked else unstack_params(config, params)


def relayout_on_mesh(config: HFConfig, params: dict, mesh: Any, stacked: bool) -> dict:
    """Params placed on a mesh, converted to the stacked or per-layer layout on the mesh itself (each new leaf
    placed as `flax_model.sharding.param_shardings` says; no host copy)."""
    shapes = stacked_param_shapes(config) if stacked else param_shapes(config)
    shardings = traverse_util.unflatten_dict(param_shardings(config, shapes, mesh), sep="/")
    return jax.jit(lambda tree: _params_in_layout(config, tree, stacked), out_shardings=shardings)(params)


def _checkpoint_shapes(directory: Path) -> Callable[[HFConfig], dict[str, tuple[int, ...]]]:
    """`param_shapes` for loading `directory`: stacked when its preferred weight file is a Flax msgpack written
    in the stacked layout (`save_pretrained(stacked=True)`)."""
    checkpoint = Checkpoint(directory, prefer=FLAX_FIRST)

    def shapes_of(config: HFConfig) -> dict[str, tuple[int, ...]]:
        if (checkpoint.format == "flax" and isinstance(config, SpeechEncoderDecoderConfig)
                and stacking.is_stacked(checkpoint.keys(), stacking.layer_stacks(config))):
            return stacked_param_shapes(config)
        return param_shapes(config)

    return shapes_of


def _check_tree(flat: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuses a parameter tree that is not shaped like the model's, naming the first few differences."""
    problems = [f"{k}: not a parameter of this model" for k in sorted(set(flat) - set(expected))]
    problems += [f"{k}: missing" for k in sorted(set(expected) - set(flat))]
    problems += [f"{k}: shape {list(flat[k].shape)}, expected {list(expected[k])}"
                 for k in sorted(set(flat) & set(expected)) if tuple(flat[k].shape) != tuple(expected[k])]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise UnsupportedConfig("params: " + "; ".join(problems[:5]) + more)


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
        params: nested dict in HF's Flax layout (`encoder`, `decoder`, `enc_to_dec_proj`), or in the stacked layout
            of scanned layers; converted to the layout `scan_layers` asks for.
        dtype: the computation dtype (params are kept as given).
        scan_layers: run the encoder's and the decoder's layers in one `nn.scan` each (compiles one layer per
            stack instead of every layer); `params` then hold each stack's leaves stacked with a leading layer
            axis (`encoder/encoder/layers/attention/q_proj/kernel` [layers, D, D]), not `.../layers/3/...`.
        lora: LoRA settings when `params` hold LoRA factors beside the adapted kernels (`convert.base.lora`);
            `save_pretrained` then needs them merged (`merge_lora`) or split off first.
    """

    mesh: Any = None  # the jax.sharding.Mesh the params are placed on (from_pretrained(mesh=...))

    def __init__(self, config: SpeechEncoderDecoderConfig, params: dict, dtype: Any = jnp.float32,
                 scan_layers: bool = False, lora: LoraSettings | None = None):
        self.config = config
        self.params = _params_in_layout(config, params, scan_layers)
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.lora = lora
        self.module = SpeechEncoderDecoderModule(config, dtype=dtype, scan_layers=scan_layers, lora=lora)
        self._compiled: dict[str, Any] = {}
        # What `generate` uses by default (from_pretrained reads it); None: what the config implies.
        self.generation_config: GenerationConfig | None = None

    # -- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path_or_repo: str | Path, revision: str | None = None, dtype: Any = jnp.float32, mesh: Any = None,
        scan_layers: bool = False,
    ) -> FlaxSpeechEncoderDecoderModel:
        """Loads a composed checkpoint from a directory or a Hub repo id (`flax_model.msgpack` or safetensors).

        Args:
            path_or_repo: a local directory, or a Hub repo id resolved through huggingface_hub's cache.
            revision: the Hub revision (branch, tag or commit), for repo ids.
            dtype: the computation dtype.
            mesh: a `jax.sharding.Mesh` (axes among `data`, `fsdp`, `model`) to place every parameter on as
                a sharded `jax.Array`, each process reading only its devices' shards (`flax_model.sharding`).
            scan_layers: scanned layers (see the class); the files may be in either layout (a stacked
                `flax_model.msgpack` from `save_pretrained(stacked=True)`, or HF's per-layer one).
        """
        directory = resolve_source(str(path_or_repo), revision, what="model").path
        shapes_of = _checkpoint_shapes(directory)
        if mesh is not None:
            loaded = load_sharded(directory, mesh, shapes_of, prefer=FLAX_FIRST)
        else:
            loaded = load_params(directory, shapes_of, prefer=FLAX_FIRST)
        if not isinstance(loaded.config, SpeechEncoderDecoderConfig):
            raise UnsupportedConfig(f"{directory}/config.json: not a composed speech-encoder-decoder model")
        generation = GenerationConfig.from_directory(directory)  # generation_config.json, else config.json
        if mesh is not None:
            params = loaded.params
            if stacking.is_stacked(traverse_util.flatten_dict(params, sep="/"),
                                   stacking.layer_stacks(loaded.config)) != scan_layers:
                params = relayout_on_mesh(loaded.config, params, mesh, scan_layers)
            model = on_mesh(cls(loaded.config, params, dtype=dtype, scan_layers=scan_layers), mesh)
        else:
            config, params = loaded.config, traverse_util.flatten_dict(loaded.params, sep="/")
            del loaded  # `params` now holds the only reference to each numpy leaf: it goes once copied to JAX
            stacks = stacking.layer_stacks(config)
            if stacking.is_stacked(params, stacks) != scan_layers:
                # Layers are stacked leaf by leaf, each layer's arrays freed once stacked (unstacking makes views).
                params = (stacking.stack_params(params, stacks, consume=True) if scan_layers
                          else stacking.unstack_params(params, stacks))
            for path in params:
                params[path] = jnp.asarray(params[path])
            model = cls(config, traverse_util.unflatten_dict(params, sep="/"), dtype=dtype, scan_layers=scan_layers)
        model.generation_config = generation
        return model

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str | None = None,
                        params: dict | None = None, stacked: bool = False, overwrite: bool = False) -> list[Path]:
        """Writes config.json, flax_model.msgpack, model.safetensors (HF layouts, transformers' names) and
        generation_config.json, atomically (`convert.base.params.pretrained_directory`).

        Args:
            directory: a new (or empty) directory; an existing one only with `overwrite`.
            max_shard_size: e.g. "2GB": shard both weight files above this size.
            params: any tree shaped like the model's params (trained params, or gradients to compare with the
                reference's), in either layout; `self.params` by default.
            stacked: write `flax_model.msgpack` in the stacked layout of scanned layers (which
                `from_pretrained` reads back; transformers cannot). `model.safetensors` is always per layer.
            overwrite: update an existing directory this toolkit wrote (e.g. the one the model came from): its
                config, generation config and weight files are replaced, every other file (tokenizer,
                preprocessor, model card, reports) is kept.

        Returns:
            The files written.

        Raises:
            UnsupportedConfig: `params` lacks a leaf of the model, has one it does not, or a wrong shape.
        """
        tree = self.params if params is None else params
        tree = _params_in_layout(self.config, tree, stacked=False)
        flat = traverse_util.flatten_dict(dict(tree), sep="/")
        _check_tree(flat, param_shapes(self.config))
        shard_size = parse_size(max_shard_size)
        # Leaf by leaf, each gathered whole only when written (sharded params: every process contributes its
        # shards, process 0 writes; no whole-model host copy unless `stacked`).
        order = sorted(flat)
        specs = [TensorSpec(k, np.dtype(flat[k].dtype), tuple(np.shape(flat[k]))) for k in order]
        if not is_writer():
            for _ in gathered_leaves(flat, order):
                pass
            sync_processes("save_pretrained")
            return []
        with pretrained_directory(directory, overwrite) as tmp:
            if not stacked:
                files = save_params(tmp, self.config, lambda: gathered_leaves(flat, order), specs=specs,
                                    max_shard_size=shard_size)
            else:
                flat = dict(gathered_leaves(flat, order))
                files = save_params(tmp, self.config, flat, max_shard_size=shard_size, formats=("safetensors",))
                files += save_flax_msgpack(tmp, stacking.stack_params(flat, stacking.layer_stacks(self.config)),
                                              shard_size)
            if self.generation_config is not None:
                files.append(self.generation_config.write(tmp))
        sync_processes("save_pretrained")
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

    def loss(
        self,
        inputs: Any,
        attention_mask: Any,
        labels: Any,
        params: dict | None = None,
        *,
        label_smoothing: float = 0.0,
        dropout_rng: jax.Array | None = None,
        freeze_feature_encoder: bool = False,
        mask_time_indices: Any = None,
        mask_feature_indices: Any = None,
        decoder_attention_mask: Any = None,
        ctc_weight: float | None = None,
        ctc_labels: Any = None,
    ) -> jax.Array:
        """The training loss, a pure function of `params` (so `jax.grad` applies), compiled once per shape.

        transformers' semantics: the decoder reads `labels` shifted right (`decoder_start_token_id` first, -100
        as `pad_token_id`); the loss is the mean cross-entropy over the label tokens that are not -100, with
        `LabelSmoother`'s smoothing when `label_smoothing` > 0. With `ctc_weight` (lambda; the model needs a CTC
        head) it is lambda CTC + (1 - lambda) that, the CTC loss as transformers' `Wav2Vec2ForCTC` computes it
        (`torch.nn.functional.ctc_loss` over the head's log-softmax, blank `ctc.blank_id`, reduction
        `ctc.loss_reduction`, `ctc.zero_infinity`) over the utterances that have labels.

        Args:
            inputs: [B, N] float waveforms, or [B, S, F] feature frames for an encoder that reads features.
            attention_mask: [B, N] / [B, S], 1 for real samples (frames); None when nothing is padded.
            labels: [B, T] integer token ids within the vocabulary, -100 for padding (at least one token).
            params: differentiate with respect to these; `self.params` by default.
            label_smoothing: transformers' `label_smoothing_factor`, in [0, 1) (inside a caller's `jax.jit`, a
                traced float scalar, whose value cannot be checked).
            dropout_rng: a PRNG key turns on train mode (dropout, LayerDrop); None is deterministic.
            freeze_feature_encoder: no gradient reaches the conv feature encoder.
            mask_time_indices: [B, S] bool SpecAugment time mask over the encoder's frames (before any adapter).
            mask_feature_indices: [B, C] bool SpecAugment channel mask.
            decoder_attention_mask: [B, T]; transformers' training passes none (causal masking suffices).
            ctc_weight: lambda in [0, 1] of the hybrid CTC/attention loss; None: no CTC term.
            ctc_labels: [B, U] the CTC targets (-100 padding); by default the labels without the special tokens
                (a head over the decoder's vocabulary; a head with its own vocabulary needs them).

        Returns:
            The scalar loss (float32).

        Raises:
            UsageError: labels that are not integers, ids outside the vocabulary other than -100, labels without a
                token, or a smoothing factor outside [0, 1); one line naming the first bad id and its position.
        """
        params = self.params if params is None else params
        if isinstance(label_smoothing, jax.core.Tracer):  # inside a caller's jit, as labels below
            if label_smoothing.shape != () or not jnp.issubdtype(label_smoothing.dtype, jnp.floating):
                raise UsageError(f"label_smoothing: {label_smoothing.dtype}{list(label_smoothing.shape)}, expected "
                                 "a float scalar", param="label_smoothing")
        else:
            label_smoothing = check_label_smoothing(label_smoothing)
        if isinstance(labels, jax.core.Tracer):  # inside a caller's jit: only what the type says can be checked
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                raise UsageError(f"labels: dtype {labels.dtype}, expected integer token ids (-100 for padding)",
                                 param="labels")
        else:
            check_labels(labels, self.config.decoder.vocab_size, np.shape(inputs)[0])
        deterministic = dropout_rng is None
        with_ctc = ctc_weight is not None
        if with_ctc and self.config.ctc is None:
            raise UnsupportedConfig("ctc_weight: this model has no CTC head (compose it with --ctc-head)")
        key = ("loss", deterministic, bool(freeze_feature_encoder), with_ctc)
        if key not in self._compiled:
            def run(params, inputs, mask, labels, smoothing, rng, time_mask, feature_mask, decoder_mask, weight,
                    targets):
                sums = self.module.apply(
                    {"params": params}, inputs, mask, labels, deterministic, freeze_feature_encoder, time_mask,
                    feature_mask, decoder_mask, targets, with_ctc, method=SpeechEncoderDecoderModule.loss_sums,
                    rngs=None if deterministic else {"dropout": rng})
                return sums.mean(smoothing, weight)

            self._compiled[key] = jax.jit(run)
        as_array = lambda x, dtype: None if x is None else jnp.asarray(x, dtype)
        return self._compiled[key](
            params, jnp.asarray(inputs, jnp.float32), as_array(attention_mask, jnp.int32),
            jnp.asarray(labels, jnp.int32), jnp.float32(label_smoothing), dropout_rng,
            as_array(mask_time_indices, bool), as_array(mask_feature_indices, bool),
            as_array(decoder_attention_mask, jnp.int32), jnp.float32(0.0 if ctc_weight is None else ctc_weight),
            as_array(ctc_labels, jnp.int32))

    def ctc_logits(self, inputs: Any, attention_mask: Any = None, params: dict | None = None
                   ) -> tuple[jax.Array, jax.Array]:
        """The CTC head's logits [B, S, V] (float32) over the encoder output, and its frame mask [B, S] (bool)."""
        if self.config.ctc is None:
            raise UnsupportedConfig("this model has no CTC head (config.json has no 'ctc' section)")
        params = self.params if params is None else params
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return self._fn("ctc_only")(params, jnp.asarray(inputs, jnp.float32), mask)

    def generate(self, inputs: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        """Greedy or beam-search transcription; see `flax_model.generation.generate`. On a mesh the batch is
        split over its `data` axis (`flax_model.sharding.generate_on_mesh`); the tokens are the same."""
        check_generate_inputs(self.config.encoder, inputs, attention_mask)
        if self.mesh is not None:
            return generate_on_mesh(self, _generate, inputs, attention_mask, **kwargs)
        return _generate(self, inputs, attention_mask, **kwargs)


def check_generate_inputs(encoder_config: Any, inputs: Any, attention_mask: Any) -> None:
    """Refuses encoder inputs or a mask `generate` cannot read, on the host before anything is traced: a waveform
    encoder reads inputs [B, samples], a feature encoder [B, frames, width] (`encoder_input_shape`); the mask is
    [B, samples] or [B, frames] and holds only 0 and 1 (integers, booleans, or floats that are 0.0 or 1.0).

    Raises:
        GenerationArgumentError: one line naming `inputs` or `attention_mask`, the shape given and the one expected.
    """
    waveform = encoder_config.input_kind == "waveform"
    shape = tuple(int(n) for n in np.shape(inputs))
    steps = "samples" if waveform else "frames"
    expected = encoder_input_shape(encoder_config, "B", steps)
    shown = lambda dims: "[" + ", ".join(map(str, dims)) + "]"  # noqa: E731
    reads = "waveforms" if waveform else f"feature frames of width {encoder_config.input_feature_size}"
    if len(shape) != len(expected) or (not waveform and shape[2] != expected[2]) or 0 in shape:
        raise GenerationArgumentError(f"inputs: shape {shown(shape)} is not {shown(expected)} with B and {steps} at "
                                      f"least 1 (this model's encoder reads {reads})", param="inputs")
    if attention_mask is None:
        return
    mask_shape = tuple(int(n) for n in np.shape(attention_mask))
    if mask_shape != shape[:2]:
        raise GenerationArgumentError(f"attention_mask: shape {shown(mask_shape)} is not [B, {steps}] = "
                                      f"{shown(shape[:2])}, the batch and length of inputs {shown(shape)}",
                                      param="attention_mask")
    if isinstance(attention_mask, jax.Array) and not attention_mask.is_fully_addressable:
        return  # a global array spread over hosts: its values are not all on this one (its shape is checked)
    mask = np.asarray(attention_mask)
    if mask.dtype.kind not in "biuf":
        raise GenerationArgumentError(f"attention_mask: dtype {mask.dtype} is not a mask's (integers or booleans, 1 "
                                      "for a real step, 0 for padding)", param="attention_mask")
    if mask.dtype.kind != "b" and not ((mask == 0) | (mask == 1)).all():
        value = mask[(mask != 0) & (mask != 1)].reshape(-1)[0]
        raise GenerationArgumentError(f"attention_mask: holds {value.item()!r}; a mask holds only 0 and 1 (1 for a "
                                      "real step, 0 for padding)", param="attention_mask")

