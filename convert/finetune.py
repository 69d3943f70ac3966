"""Fine-tune a composed speech encoder-decoder in JAX and write it back in the usual composed format.

    python -m convert.finetune --model DIR --train train.jsonl --eval eval.jsonl --output OUT [options]

Manifests hold one `{"audio": PATH, "text": TRANSCRIPT}` per line (`convert.training_data`). The run follows
transformers' `Seq2SeqTrainer` (labels shifted right into the decoder, mean cross-entropy over real tokens,
`LabelSmoother`, AdamW with linear warmup and decay, global-norm clipping, accumulation normalised over all the
step's tokens) with JAX's means: one compiled step per padded shape, bfloat16 compute over float32 master
weights on request, per-layer rematerialisation on request, dropout / LayerDrop keys and SpecAugment masks drawn
per step from the seed (so a resumed run draws what an uninterrupted one would). Evaluation generates with the
toolkit's generation and scores WER / CER with jiwer. Checkpoints (orbax) go to `OUT.checkpoints/` (or
`--checkpoint-dir`); `--resume` continues from the latest. Ctrl-C saves a checkpoint, then exits 130.
`--mesh data=2,fsdp=4` trains sharded over every device (`flax_model.training.train_step` on a mesh).

At the end OUT holds the fine-tuned model: config.json, flax_model.msgpack and model.safetensors, the generation
config, the tokenizer and preprocessor files of DIR, a model card recording the run (README.md),
`training_report.json`, `train_log.jsonl` and `loss_curve.png`.
"""

from __future__ import annotations  # noqa: I001 - convert.cli is imported first, on purpose

from convert import cli  # first: guards interrupts from here on (see convert.cli)

import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from convert.base.errors import CheckpointError, ConvertError, OutputError, UsageError, bad_argument
from convert.host_cpu import CHOICES as BFLOAT16_PRODUCTS

COMPUTE_DTYPES = ("float32", "bfloat16")
PRODUCT_FORMS = {"native": "bfloat16 operands, float32 sums", "upcast": "operands upcast to float32"}
LORA_EXPORTS = ("merged", "adapter")
ADAPTER_DIR = "adapter"  # where --lora-export adapter puts the PEFT adapter, inside the output
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                "added_tokens.json", "sentencepiece.bpe.model", "preprocessor_config.json", "generation_config.json",
                "ctc_vocab.json")
REPORT_FILE = "training_report.json"
_COMPILED: dict[Any, Any] = {}
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """The knobs of a run; defaults follow transformers' `Seq2SeqTrainingArguments` where it has one.

    Attributes:
        epochs: passes over the training set (ignored when `max_steps` is set).
        max_steps: optimiser steps of the whole run.
        batch_size: utterances per micro-batch.
        grad_accum: micro-batches per optimiser step.
        learning_rate, warmup_steps, weight_decay, max_grad_norm: AdamW and its schedule.
        encoder_learning_rate: the speech encoder's peak rate, when it should differ (None: `learning_rate`).
        label_smoothing: `label_smoothing_factor`.
        dtype: the compute dtype ("float32", or "bfloat16" over float32 master weights).
        bfloat16_products: how a bfloat16 run computes its products: "native" (bfloat16 operands, float32 sums:
            for CPUs with bfloat16 arithmetic and accelerators), "upcast" (the operands cast to float32: for CPUs
            without it, where XLA emulates the native form slower than float32), or "auto" (by the device and the
            CPU's flags, `convert.host_cpu`). The same numbers up to the order of the sums.
        remat: rematerialise every transformer layer (less memory, more compute).
        scan_layers: run the encoder's and the decoder's layer stacks as one `nn.scan` each in the training step
            (one layer compiled per stack: a shorter first step; with `remat`, the least memory). The train state
            (weights, AdamW moments, LoRA factors) and its checkpoints are stacked (a leading layer axis); a
            checkpoint of the other layout is converted on resume; evaluation generates scanned; the output has
            HF's per-layer layout. Dropout draws differ from the unrolled step's. Cross-attention compositions only.
        freeze_feature_encoder: no gradient and no update for the conv feature encoder.
        freeze_encoder: no update for any speech-encoder weight (train the decoder, its cross-attention and the
            projection on fixed encoder outputs; e.g. a first stage that teaches a new decoder to listen).
        spec_augment: draw SpecAugment masks with the encoder config's probabilities (transformers does so in
            training whenever `mask_time_prob` / `mask_feature_prob` > 0).
        dropout: train mode (dropout, LayerDrop); False trains deterministically.
        num_buckets: distinct padded audio lengths (compiled shapes).
        eval_every: evaluate every N steps (0: only before and after training).
        save_every: checkpoint every N steps (0: only at the end or on interrupt).
        eval_batch_size, num_beams, max_new_tokens: generation during evaluation.
        seed: data order, dropout keys and SpecAugment masks.
        train_only: names of the parameter groups that train (`convert.base.composed.train_groups`: `encoder`,
            `decoder`, `projector`, a decoder's `cross-attention`, ...); every other weight is frozen (no gradient,
            no optimiser state). None: everything trains (unless LoRA is on: then only the LoRA factors train).
        lora_rank: LoRA's r on the `lora_targets` layers of the `lora_parts`; None: no LoRA.
        lora_alpha: LoRA's alpha (the update is scaled by alpha / r); None: r (a scale of 1).
        lora_dropout: dropout on the adapted layers' inputs (train mode).
        lora_targets, lora_parts: which linear layers are adapted (module names; "decoder" and/or "encoder").
        lora_export: "merged" (the LoRA update folded into the weights: a plain model) or "adapter" (the base
            weights, and the factors as a PEFT adapter in `adapter/`).
        allow_unk: train on transcripts with words the tokenizer maps to its unknown token (counted in the
            report); by default such a transcript is refused, naming its manifest line and the words.
        ctc_weight: lambda of the hybrid loss lambda CTC + (1 - lambda) cross-entropy (the model's CTC head; 0: the
            cross-entropy alone, and the head is not trained).
        eval_ctc_weight: evaluate with joint CTC/attention beam search of this lambda (None: attention only).
    """

    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 5e-5
    encoder_learning_rate: float | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    dtype: str = "float32"
    bfloat16_products: str = "auto"
    remat: bool = False
    scan_layers: bool = False
    freeze_feature_encoder: bool = False
    freeze_encoder: bool = False
    spec_augment: bool = True
    dropout: bool = True
    num_buckets: int = 4
    eval_every: int = 0
    save_every: int = 0
    eval_batch_size: int = 16
    num_beams: int = 1
    max_new_tokens: int | None = None
    seed: int = 0
    ctc_weight: float = 0.0
    eval_ctc_weight: float | None = None
    train_only: tuple[str, ...] | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_parts: tuple[str, ...] = ("decoder",)
    lora_export: str = "merged"
    allow_unk: bool = False

    @property
    def lora(self) -> Any:
        """The run's `convert.base.lora.LoraSettings`, or None without LoRA."""
        from convert.base.lora import LoraSettings

        if self.lora_rank is None:
            return None
        alpha = float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)
        return LoraSettings(self.lora_rank, alpha, self.lora_dropout, tuple(self.lora_targets),
                            tuple(self.lora_parts))

    def check(self) -> None:
        """Raises UsageError (API names) for values out of range."""
        cli.require_float("epochs", self.epochs, low=0.0, low_inclusive=False)
        if self.max_steps is not None:
            cli.require_int("max_steps", self.max_steps, low=1)
        for name in ("batch_size", "grad_accum", "num_buckets", "eval_batch_size", "num_beams"):
            cli.require_int(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "eval_every", "save_every"):
            cli.require_int(name, getattr(self, name), low=0)
        cli.require_float("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        if self.encoder_learning_rate is not None:
            cli.require_float("encoder_learning_rate", self.encoder_learning_rate, low=0.0, low_inclusive=False)
        cli.require_float("weight_decay", self.weight_decay, low=0.0)
        cli.require_float("max_grad_norm", self.max_grad_norm, low=0.0)
        cli.require_float("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_inclusive=False)
        cli.require_choice("dtype", self.dtype, COMPUTE_DTYPES)
        cli.require_choice("bfloat16_products", self.bfloat16_products, BFLOAT16_PRODUCTS)
        if self.bfloat16_products != "auto" and self.dtype != "bfloat16":
            raise bad_argument("bfloat16_products", self.bfloat16_products,
                               f"goes with dtype bfloat16 (this run computes in {self.dtype})")
        if self.max_new_tokens is not None:
            cli.require_int("max_new_tokens", self.max_new_tokens, low=1)
        cli.require_choice("lora_export", self.lora_export, LORA_EXPORTS)
        if self.lora_rank is None:
            if self.lora_alpha is not None or self.lora_dropout:
                raise UsageError("lora_alpha / lora_dropout: set lora_rank to use LoRA", param="lora_rank")
        else:
            self.lora.check()
        cli.require_float("ctc_weight", self.ctc_weight, low=0.0, high=1.0)
        if self.eval_ctc_weight is not None:
            cli.require_float("eval_ctc_weight", self.eval_ctc_weight, low=0.0, high=1.0)


@dataclasses.dataclass
class FinetuneResult:
    output: Path
    report: dict[str, Any]
    interrupted: bool = False


# ----------------------------------------------------------------------------------------------------------
# The run


class _Run:
    """Everything one fine-tuning run holds: the model, the data, the compiled step, the checkpoints."""

    def __init__(self, model_dir: Path, train: Any, eval_manifest: Any, settings: FinetuneSettings,
                 checkpoint_dir: Path, mesh: Any = None, max_memory: int | None = None,
                 data: tuple[list, list] | None = None):
        import jax
        import jax.numpy as jnp

        from convert.base.audio import feature_extractor_config
        from convert.base.batching import bucket_boundaries, length_batches
        from convert.base.prefix import files_directory, is_prefix_directory
        from convert.base.stacking import layer_stacks
        from convert.host_cpu import bfloat16_products
        from convert.training_data import AudioCache, LabelTokenizer, read_examples, sample_lengths

        self.settings = s = settings
        self.model_dir = model_dir
        self.train_source = train
        # `data`: the examples of `train` and `eval_manifest`, when the caller has read them already.
        self.train, self.eval = data if data is not None else (read_examples(train), read_examples(eval_manifest))
        # A prefix composition (encoder, projector, decoder-only LM) or a cross-attention one.
        self.prefix = is_prefix_directory(model_dir)
        if self.prefix and mesh is not None:
            raise bad_argument("mesh", mesh, "is not supported for a prefix composition (it trains on one device)")
        if self.prefix and s.scan_layers:
            raise bad_argument("scan_layers", True, "is not supported for a prefix composition (its layers run "
                               "unrolled)")
        # With --scan-layers the state is stacked from the start (one leaf per layer-leaf name, a leading layer
        # axis): the step, the optimiser and the checkpoints work on it as it lies; evaluation generates with
        # scanned layers; the export writes HF's per-layer layout.
        self.model = self.model_class().from_pretrained(
            model_dir, **({} if self.prefix else {"mesh": mesh, "scan_layers": s.scan_layers}))
        self.mesh = self.model.mesh  # None on one device
        self.config = config = self.model.config
        self.stacks = None if self.prefix else layer_stacks(config)
        if s.freeze_feature_encoder and config.encoder.input_kind != "waveform":
            raise bad_argument("freeze_feature_encoder", True, f"this encoder reads {config.encoder.input_kind}, "
                               "not audio: it has no conv feature encoder to freeze")
        self.lora = s.lora
        self.lora_layers: tuple = ()
        self.stored_dtype = self._float32_master_weights()
        if self.lora is not None:
            self._add_lora()
        self.features = feature_extractor_config(files_directory(model_dir, "encoder"), config.encoder)
        self.tokenizer = LabelTokenizer.for_model(files_directory(model_dir, "decoder"), self.model,
                                                  allow_unk=s.allow_unk)
        self.audio = AudioCache(self.features.sampling_rate)
        self.train_labels = [self.tokenizer.encode(e.text, e.where) for e in self.train]
        self.train_lengths = sample_lengths(self.train, self.features.sampling_rate)
        self.eval_lengths = sample_lengths(self.eval, self.features.sampling_rate)
        self._check_lengths()
        self.ctc_labels = self._ctc_labels() if s.ctc_weight > 0 else None
        lengths = self.train_lengths + self.eval_lengths
        # Buckets in whole tenths of a second: a few shapes, each a whole number of encoder frames in practice.
        multiple = max(1, self.features.sampling_rate // 10)
        self.boundaries = bucket_boundaries(min(lengths), max(lengths), s.num_buckets, multiple)
        self.label_length = int(math.ceil(max(len(ids) for ids in self.train_labels) / 8) * 8)
        self.ctc_length = 0 if self.ctc_labels is None else int(
            math.ceil(max(1, *(len(ids) for ids in self.ctc_labels)) / 8) * 8)
        self.batches_per_epoch = len(length_batches(self.train_lengths, s.batch_size, self.boundaries))
        steps_per_epoch = max(1, self.batches_per_epoch // s.grad_accum)
        self.total_steps = s.max_steps or max(1, round(s.epochs * steps_per_epoch))
        self.compute_dtype = jnp.bfloat16 if s.dtype == "bfloat16" else jnp.float32
        # How bfloat16 products are computed (None in float32): entered by every step and evaluation, so that the
        # programs they trace have that form.
        self.products = (bfloat16_products(s.bfloat16_products, platform_name=jax.default_backend())
                         if s.dtype == "bfloat16" else None)
        self.checkpoint_dir = checkpoint_dir
        self._epoch_cache: dict[int, list] = {}
        if self.lora is not None:
            self._check_lora_called()
        self._check_memory(max_memory)
        self._build_step()

    def model_class(self) -> Any:
        """The Flax model class of the run's kind of composition."""
        if self.prefix:
            from flax_model.prefix import FlaxSpeechPrefixModel

            return FlaxSpeechPrefixModel
        from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

        return FlaxSpeechEncoderDecoderModel

    def model_of(self, params: Any) -> Any:
        """A model of the run's class over `params` (the run's layout), with its LoRA settings."""
        if self.prefix:
            return self.model_class()(self.config, params, lora=self.lora)
        return self.model_class()(self.config, params, scan_layers=self.settings.scan_layers, lora=self.lora)

    def module(self) -> Any:
        """The linen module whose `loss_sums` the step differentiates."""
        s = self.settings
        if self.prefix:
            from flax_model.prefix import SpeechPrefixModule

            return SpeechPrefixModule(self.config, dtype=self.compute_dtype, remat=s.remat, lora=self.lora)
        from flax_model.speech_encoder_decoder import SpeechEncoderDecoderModule

        return SpeechEncoderDecoderModule(self.config, dtype=self.compute_dtype, remat=s.remat,
                                          scan_layers=s.scan_layers, lora=self.lora)

    def untrained_projector_frozen(self) -> bool:
        """A prefix composition whose projector is as `compose` initialised it (the model directory is no
        fine-tuned one: it has no training report) and which this run freezes."""
        from convert.base.composed import group_predicate, train_groups

        if not self.prefix or (self.model_dir / REPORT_FILE).exists():
            return False
        in_projector = group_predicate(train_groups(self.config), ("projector",))
        projector = [path for path in self.param_shapes() if in_projector(path)]
        frozen = self.frozen(stacked=False)
        return bool(projector) and all(frozen(path) for path in projector)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.prefix:
            from flax_model.prefix import param_shapes
        else:
            from flax_model.speech_encoder_decoder import param_shapes
        return param_shapes(self.config)

    def _float32_master_weights(self) -> Any:
        """Casts the model's floating-point leaves to float32 where its files store another dtype, so that AdamW's
        updates, far below bfloat16's resolution, are not rounded away at every step; returns the dtype every
        floating-point leaf was stored in when it was one other than float32 (the export writes that dtype
        again), else None."""
        import jax.numpy as jnp
        from flax import traverse_util

        flat = traverse_util.flatten_dict(self.model.params, sep="/")
        floating = {k for k, v in flat.items() if jnp.issubdtype(v.dtype, jnp.floating)}
        dtypes = {flat[k].dtype for k in floating}
        if dtypes <= {jnp.dtype(jnp.float32)}:
            return None
        flat = {k: v.astype(jnp.float32) if k in floating else v for k, v in flat.items()}
        generation = self.model.generation_config
        self.model = self.model_of(traverse_util.unflatten_dict(flat, sep="/"))
        self.model.generation_config, self.model.mesh = generation, self.mesh
        return next(iter(dtypes)) if len(dtypes) == 1 else None

    def as_stored(self, flat: dict[str, Any]) -> dict[str, Any]:
        """The floating-point leaves of `flat` in the dtype the model's files stored (`stored_dtype`), if not
        float32."""
        import jax.numpy as jnp

        if self.stored_dtype is None:
            return flat
        return {k: v.astype(self.stored_dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in flat.items()}

    def _add_lora(self) -> None:
        """The LoRA factors, drawn as PEFT draws them (seeded by --seed and the path), added to the params."""
        import jax
        from flax import traverse_util
        from jax.sharding import NamedSharding, PartitionSpec

        from convert.base.composed import keymap_for, stores_in_out
        from convert.base.lora import find_lora_layers, init_lora
        from convert.base.stacking import stack_params

        self.lora_layers = find_lora_layers(keymap_for(self.config), self.param_shapes(), self.lora,
                                            stores_in_out(self.config))
        flat = traverse_util.flatten_dict(self.model.params, sep="/")
        place = (jax.numpy.asarray if self.mesh is None
                 else lambda a: jax.device_put(a, NamedSharding(self.mesh, PartitionSpec())))
        factors = init_lora(self.lora_layers, self.lora.rank, self.settings.seed)
        if self.settings.scan_layers:  # the factors of a stack's layers, stacked as its other leaves are
            factors = stack_params(factors, self.stacks)
        flat.update({k: place(v) for k, v in factors.items()})
        generation = self.model.generation_config
        self.model = self.model_of(traverse_util.unflatten_dict(flat, sep="/"))
        self.model.generation_config, self.model.mesh = generation, self.mesh

    def _check_lora_called(self) -> None:
        """Refuses a LoRA target that the model never calls as a layer (a head whose kernel it reads directly),
        whose factors would train nothing: the loss is traced once (abstractly) and the adapted calls recorded."""
        import jax
        import jax.numpy as jnp

        from convert.base.configs import encoder_input_shape
        from convert.base.stacking import layer_of
        from flax_model.lora import recording_lora_calls

        encoder = self.config.encoder
        steps = 4 * encoder.min_input_length
        while int(self.config.audio_lengths(encoder.output_lengths(steps)) if self.prefix
                  else encoder.output_lengths(steps)) < 1:
            steps *= 2
        inputs = jax.ShapeDtypeStruct(encoder_input_shape(encoder, 1, steps), jnp.float32)
        labels = jax.ShapeDtypeStruct((1, 2), jnp.int32)
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.model.params)
        module = self.module()
        with recording_lora_calls() as seen:
            jax.eval_shape(lambda p, x, y: module.apply({"params": p}, x, None, y, method="loss_sums"), params, inputs,
                           labels)
        # A scanned stack's layers run as one module, recorded at the stacked path.
        called = ((lambda path: (layer_of(path, self.stacks) or (path,))[0]) if self.settings.scan_layers
                  else (lambda path: path))
        missed = [layer.torch_module for layer in self.lora_layers if called(layer.module) not in seen]
        if missed:
            raise bad_argument("lora_targets", ",".join(self.lora.targets), f"{missed[0]} is not called as a layer by "
                               "the model (its weight is read directly, as a head's can be): LoRA cannot adapt it")

    def frozen(self, stacked: bool | None = None) -> Any:
        """Path -> frozen, from the freezing flags, the buffers, --train-only and LoRA (a LoRA run trains only the
        factors unless --train-only names groups too); over the paths of the stacked layout when `stacked` (the
        run's layout by default), each stacked leaf frozen as its layers are."""
        from convert.base.composed import group_predicate, non_trainable_paths, train_groups
        from convert.base.lora import is_lora_leaf
        from convert.base.stacking import stacked_predicate
        from flax_model.training import frozen_predicate

        s = self.settings
        if self.settings.scan_layers if stacked is None else stacked:
            return stacked_predicate(self.frozen(stacked=False), self.stacks)
        non_trainable = non_trainable_paths(self.config, self.param_shapes())  # per layer, as the key table reads
        base = frozen_predicate(s.freeze_feature_encoder, non_trainable, s.freeze_encoder)
        chosen = None if s.train_only is None else group_predicate(train_groups(self.config), s.train_only)
        lora = self.lora is not None

        def frozen(path: str) -> bool:
            if is_lora_leaf(path):
                return False
            if base(path):
                return True
            return not chosen(path) if chosen is not None else lora

        return frozen

    def _check_lengths(self) -> None:
        needed = self.features.min_samples(self.config.encoder)
        for examples, lengths in ((self.train, self.train_lengths), (self.eval, self.eval_lengths)):
            for example, n in zip(examples, lengths):
                if n < needed:
                    raise ConvertError(f"{example.where}: {example.audio} has {n} samples, too short for the encoder "
                                       f"(at least {needed})")
        positions = self.config.decoder.max_positions
        for example, ids, n in zip(self.train, self.train_labels, self.train_lengths):
            # A prefix composition reads the prompt and the audio embeddings first.
            frames = self.config.encoder.output_lengths(self.features.input_length(n))
            prefix = self.config.prompt_length + int(self.config.audio_lengths(frames)) if self.prefix else 0
            if prefix + len(ids) > positions:
                raise ConvertError(f"{example.where}: {len(ids)} label tokens"
                                   + (f" after a prefix of {prefix} (prompt and audio)" if prefix else "")
                                   + f" exceed the decoder's {positions} positions")

    def _check_memory(self, max_memory: int | None) -> None:
        """Refuses, before anything is compiled, a run that cannot fit in memory, naming what is to blame: the
        model (its parameters; its train state: the gradients and AdamW's moments of the trainable leaves), the
        training audio (held decoded for the whole run), or the training step / evaluation batch of the longest
        bucket (`batch_size` when one utterance per batch would fit, else the longest utterance's manifest line)."""
        import jax
        import jax.numpy as jnp

        from convert.base.configs import encoder_input_shape
        from convert.base.generation_settings import model_generation_config, resolve_settings
        from convert.base.resources import memory_budget, refuse_if_too_large, refuse_parameters_beyond
        from flax_model.memory import (Estimate, device_memory, generation_estimate, train_state_bytes,
                                       training_estimate, tree_bytes)

        s, rate = self.settings, self.features.sampling_rate
        device = device_memory()
        budget = memory_budget(max_memory, device * (1 if self.mesh is None else self.mesh.size) if device else None)
        model = f"model={self.model_dir}"
        params = tree_bytes(self.model.params)
        refuse_parameters_beyond(params, budget, model)
        audio = 4 * (sum(self.train_lengths) + sum(self.eval_lengths))
        refuse_if_too_large(params + audio, f"train={self.train_source}: {sum(self.train_lengths) / rate / 3600:.2f} h "
                            f"of training audio and {sum(self.eval_lengths) / rate / 3600:.2f} h of held-out audio, "
                            "held decoded for the whole run,", budget, "train on a smaller manifest", param="train")
        frozen = self.frozen()
        state = train_state_bytes(self.model.params, frozen, s.grad_accum > 1)
        refuse_if_too_large(state + audio, f"{model}: its train state (the parameters, and the gradients and AdamW "
                            "moments of the trainable ones) with the run's audio", budget,
                            "freeze part of it (train_only=..., LoRA)", param="model")
        module = self.module()
        samples = self.boundaries[-1]
        steps = self.features.input_length(samples)  # the encoder's input: samples, or feature frames
        masked = self.features.return_attention_mask

        def training(rows: int) -> Any:
            batch = {"inputs": jax.ShapeDtypeStruct(encoder_input_shape(self.config.encoder, rows, steps), jnp.float32),
                     "attention_mask": jax.ShapeDtypeStruct((rows, steps), jnp.int32) if masked else None,
                     "labels": jax.ShapeDtypeStruct((rows, self.label_length), jnp.int32)}
            estimate = training_estimate(module, self.model.params, batch, not s.dropout, s.freeze_feature_encoder,
                                         s.grad_accum > 1, budget.bytes - audio, frozen)
            return dataclasses.replace(estimate, bytes=estimate.bytes + audio)

        max_new = s.max_new_tokens or self.eval_max_new_tokens()
        settings = resolve_settings(self.config, model_generation_config(self.model), None, num_beams=s.num_beams,
                                    max_new_tokens=max_new)

        def evaluation(rows: int) -> Any:
            if self.prefix:  # generation holds the model and one cache: well below a training step
                return Estimate(tree_bytes(self.model.params) + audio, "the params")
            estimate = generation_estimate(self.model.module, self.model.params, rows, steps, settings, masked,
                                           budget.bytes - audio)
            return dataclasses.replace(estimate, bytes=estimate.bytes + state + audio)  # while training holds its state

        lengths = self.train_lengths + self.eval_lengths
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        example = (self.train + self.eval)[longest]
        for name, rows, estimate_of in (("batch_size", s.batch_size, training),
                                        ("eval_batch_size", s.eval_batch_size, evaluation)):
            # One utterance of the longest bucket first: if even that cannot fit, the audio is to blame.
            what = "a training step" if name == "batch_size" else "an evaluation batch"
            alone = estimate_of(1)
            refuse_if_too_large(alone.bytes, f"{example.where}: {example.audio} holds {lengths[longest] / rate:.1f} s "
                                f"of audio; {what} on it (its largest array: {alone.largest})", budget,
                                "split or leave out long utterances")
            if rows > 1:
                estimate = estimate_of(rows)
                refuse_if_too_large(estimate.bytes, f"{name}={rows}: {what} of {rows} utterances padded to "
                                    f"{samples / rate:.1f} s (its largest array: {estimate.largest})", budget,
                                    f"lower {name}=...", param=name)

    def _ctc_labels(self) -> list[list[int]]:
        """Each training utterance's CTC targets: its label tokens without the special ones (a head over the
        decoder's vocabulary), or its transcript in the head's own vocabulary."""
        from convert.base.ctc import CTCVocabulary, alignment_frames
        from convert.training_data import DataError

        head = self.config.ctc
        if head is None:
            raise bad_argument("ctc_weight", self.settings.ctc_weight, "the model has no CTC head (compose it with "
                               "--ctc-head decoder, or keep a ...ForCTC encoder's)")
        if head.shares_decoder_vocabulary:
            special = self.config.special_token_ids | {self.tokenizer.bos} - {None}
            labels = [[t for t in ids if t not in special] for ids in self.train_labels]
        else:
            vocabulary = CTCVocabulary.read(self.model_dir / head.vocabulary, head)
            try:
                labels = [vocabulary.encode(e.text, e.where) for e in self.train]
            except ConvertError as e:
                raise DataError(str(e)) from None
        if not head.zero_infinity:
            for example, ids, n in zip(self.train, labels, self.train_lengths):
                frames = int(self.config.encoder.output_lengths(self.features.input_length(n)))
                if alignment_frames(ids) > frames:
                    raise DataError(f"{example.where}: its {len(ids)} CTC labels need {alignment_frames(ids)} frames, "
                                    f"the audio makes {frames} (the head's zero_infinity is off: the loss would be "
                                    "infinite)")
        return labels

    def optimizer_for(self, trainable: Any) -> Any:
        """The run's optimiser over `trainable` (the trainable leaves, in either layer layout)."""
        from flax_model.training import leaf_labels, make_optimizer

        return make_optimizer(self.optimizer_settings, leaf_labels(trainable, lambda path: False))

    def _build_step(self) -> None:
        from flax_model.training import (
            OptimizerSettings,
            StepFunctions,
            compiled_add,
            compiled_apply,
            compiled_grad,
            split_trainable,
            state_shardings,
        )

        s = self.settings
        self.optimizer_settings = OptimizerSettings(
            learning_rate=s.learning_rate, total_steps=self.total_steps, warmup_steps=s.warmup_steps,
            weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, encoder_learning_rate=s.encoder_learning_rate)
        # Frozen leaves get no gradient and no optimiser state: the optimiser is made for the trainable ones.
        self.frozen_fn = frozen = self.frozen()
        trainable = split_trainable(self.model.params, frozen)[0]
        if not trainable:
            raise bad_argument("train_only", ",".join(s.train_only or ()), "selects no parameter of this model")
        self.optimizer = self.optimizer_for(trainable)
        # On a mesh: where every leaf of the train state lives (the optimiser state follows its parameters).
        shardings = state_shardings(self.model.params, self.optimizer, frozen)
        # Compiled functions are shared by runs of the same model, settings and mesh in one process (a resumed
        # run, the tests): jax.jit caches per function object.
        with_ctc = s.ctc_weight > 0
        frozen_key = (s.freeze_feature_encoder, s.freeze_encoder, s.train_only, self.lora, self.lora_layers)
        key = (self.config, s.dtype, self.products_form, s.remat, s.scan_layers, s.dropout, self.mesh, frozen_key,
               with_ctc)
        if ("grad", key) not in _COMPILED:
            _COMPILED["grad", key] = compiled_grad(self.module(), deterministic=not s.dropout,
                                                   freeze_feature_encoder=s.freeze_feature_encoder,
                                                   shardings=shardings, frozen=frozen, with_ctc=with_ctc)
        if ("apply", key, self.optimizer_settings) not in _COMPILED:
            _COMPILED["apply", key, self.optimizer_settings] = compiled_apply(self.optimizer, shardings, frozen)
        if ("add", key) not in _COMPILED:  # on a mesh its outputs are placed like the params
            _COMPILED["add", key] = compiled_add(shardings, frozen)
        self.step_fns = StepFunctions(_COMPILED["grad", key], _COMPILED["add", key],
                                      _COMPILED["apply", key, self.optimizer_settings], self.mesh,
                                      self.config.decoder.vocab_size,
                                      self.config.ctc.loss_reduction if with_ctc else None, frozen)
        # One compiled search per shape for the whole run (on a mesh: the model's own cache, which in a
        # multi-process run returns replicated results).
        self.model._compiled = _COMPILED.setdefault(("generate", self.config, self.products_form, self.mesh, self.lora,
                                                     s.scan_layers),
                                                    {} if self.mesh is None else self.model._compiled)
        self.schedule = self.optimizer_settings.schedule()

    # -- data order ------------------------------------------------------------------------------------

    def micro_batch(self, index: int) -> Any:
        """The `index`-th micro-batch of the run: epoch e's order is a pure function of (seed, e)."""
        from convert.base.batching import length_batches

        epoch, position = divmod(index, self.batches_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: length_batches(self.train_lengths, self.settings.batch_size,
                                                       self.boundaries,
                                                       rng=np.random.default_rng([self.settings.seed, epoch]))}
        return self._epoch_cache[epoch][position]

    def arrays(self, step: int, micro: int) -> tuple[dict[str, Any], float]:
        """The host arrays of one micro-batch, with its SpecAugment masks; and its seconds of audio. (The step
        places them: on one device, or split over a mesh's `data` axis.)"""
        from convert.base.spec_augment import spec_augment_masks
        from convert.training_data import make_batch, padded_labels

        batch = self.micro_batch(step * self.settings.grad_accum + micro)
        data = make_batch(batch, self.train, self.train_labels, self.audio, self.features, self.label_length)
        out = {"inputs": data["inputs"], "labels": data["labels"]}
        if self.ctc_labels is not None:
            out["ctc_labels"] = padded_labels(batch, self.ctc_labels, self.ctc_length)
        if data["attention_mask"] is not None:
            out["attention_mask"] = data["attention_mask"]
        if self.settings.spec_augment and self.settings.dropout:
            # The encoder's frames before any adapter, from its input steps (samples, or feature frames).
            frames = int(self.config.encoder.output_lengths(data["inputs"].shape[1], add_adapter=False))
            seed = int(np.random.SeedSequence([self.settings.seed, step, micro]).generate_state(1)[0])
            time_mask, feature_mask = spec_augment_masks(
                self.config.encoder, data["attention_mask"], frames, np.random.RandomState(seed),
                batch_size=batch.batch_size)
            if time_mask is not None:
                out["mask_time_indices"] = time_mask
            if feature_mask is not None:
                out["mask_feature_indices"] = feature_mask
        return out, data["seconds"]

    # -- one step --------------------------------------------------------------------------------------

    @property
    def products_form(self) -> str:
        """The form of bfloat16 products that the run's programs are traced in (`flax_model.layers`)."""
        from flax_model.layers import NATIVE

        return NATIVE if self.products is None else self.products.form

    def step(self, state: Any, step: int) -> tuple[Any, float, float]:
        """One optimiser step (all its micro-batches); returns (state, mean loss, seconds of audio)."""
        from flax_model.layers import bfloat16_products_as
        from flax_model.training import step_key, train_step

        seconds = 0.0

        def micro_batches():
            nonlocal seconds
            for micro in range(self.settings.grad_accum):
                batch, batch_seconds = self.arrays(step, micro)
                seconds += batch_seconds
                yield batch, step_key(self.settings.seed, step, micro) if self.settings.dropout else None

        with bfloat16_products_as(self.products_form):
            state, objective, tokens = train_step(self.step_fns, state, micro_batches(),
                                                  self.settings.label_smoothing, self.settings.ctc_weight)
        return state, objective / max(tokens, 1), seconds

    # -- evaluation ------------------------------------------------------------------------------------

    def eval_max_new_tokens(self) -> int:
        """Twice the training labels' padded length, within the decoder's positions (less the longest prefix of a
        prefix composition)."""
        room = self.config.decoder.max_positions - 1
        if self.prefix:
            frames = self.config.encoder.output_lengths(self.features.input_length(self.boundaries[-1]))
            room = self.config.decoder.max_positions - self.config.prompt_length - int(self.config.audio_lengths(frames))
        return max(1, min(room, 2 * self.label_length))

    def evaluate(self, params: Any) -> dict[str, Any]:
        """WER and CER (jiwer) of generated transcripts on the eval set, with the toolkit's generation."""
        from flax_model.layers import bfloat16_products_as

        with bfloat16_products_as(self.products_form):
            return self._evaluate(params)

    def _evaluate(self, params: Any) -> dict[str, Any]:
        import jiwer

        from convert.base.batching import length_batches
        from convert.training_data import make_batch

        s = self.settings
        model = self.model_of(params)
        model.generation_config = self.model.generation_config  # as the exported directory will generate
        model._compiled = self.model._compiled  # one compiled search per shape for the whole run
        model.mesh = self.mesh  # on a mesh the batch is split over `data`
        max_new = s.max_new_tokens or self.eval_max_new_tokens()
        hypotheses = [""] * len(self.eval)
        started = time.perf_counter()
        for batch in length_batches(self.eval_lengths, s.eval_batch_size, self.boundaries):
            data = make_batch(batch, self.eval, [[]] * len(self.eval), self.audio, self.features, 1)
            joint = {} if s.eval_ctc_weight is None else {"ctc_weight": s.eval_ctc_weight}
            out = model.generate(data["inputs"], data["attention_mask"], num_beams=s.num_beams,
                                 max_new_tokens=max_new, **joint)
            for row, index in enumerate(batch.indices):
                hypotheses[index] = self.tokenizer.decode(_trim(out.sequences[row].tolist(),
                                                                self.config.eos_token_id))
        references = [e.text for e in self.eval]
        return {"wer": float(jiwer.wer(references, hypotheses)), "cer": float(jiwer.cer(references, hypotheses)),
                "examples": [{"reference": r, "hypothesis": h} for r, h in list(zip(references, hypotheses))[:5]],
                "seconds": round(time.perf_counter() - started, 2)}

    # -- checkpoints -----------------------------------------------------------------------------------

    def save(self, manager: Any, state: Any, meta: dict[str, Any]) -> None:
        save_checkpoint(manager, state, meta)

    def restore(self, manager: Any, state: Any) -> tuple[Any, dict[str, Any]]:
        """The latest checkpoint, in the run's layout: a checkpoint of the other layer layout (saved by a run with
        --scan-layers when this one is without, or the other way round) is read in its own layout and converted
        (`flax_model.training.relayout_state`)."""
        try:
            return restore_checkpoint(manager, state, self.checkpoint_dir, verify=False)  # `finetune` verified it
        except CheckpointError as error:
            if self.prefix:
                raise
            other = self.abstract_state(stacked=not self.settings.scan_layers)
            try:
                restored, meta = restore_checkpoint(manager, other, self.checkpoint_dir, verify=False)
            except CheckpointError:
                raise error from None
        import jax

        from flax_model.training import relayout_state

        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        shardings = None if self.mesh is None else jax.tree.map(lambda a: a.sharding, target)
        relayout = jax.jit(lambda tree: relayout_state(tree, target, self.stacks), out_shardings=shardings)
        return relayout(restored), meta

    def abstract_state(self, stacked: bool) -> Any:
        """The run's train state in the stacked or per-layer layout, as shapes, dtypes (and shardings on a mesh)."""
        import jax
        from flax import traverse_util

        from convert.base.stacking import stack_params, unstack_params
        from flax_model.sharding import param_shardings
        from flax_model.training import init_state, split_trainable, state_shardings

        flat = traverse_util.flatten_dict(self.model.params, sep="/")
        flat = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()}
        if stacked != self.settings.scan_layers:
            flat = jax.eval_shape(lambda tree: (stack_params(tree, self.stacks, stack=jax.numpy.stack) if stacked
                                                else unstack_params(tree, self.stacks)), flat)
        params = traverse_util.unflatten_dict(flat, sep="/")
        frozen = self.frozen(stacked)
        optimizer = self.optimizer_for(split_trainable(params, frozen)[0])
        state = jax.eval_shape(lambda p: init_state(p, optimizer, frozen), params)
        if self.mesh is None:
            return state
        placed = param_shardings(self.config, {k: v.shape for k, v in flat.items()}, self.mesh)
        params = traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed[k])
                                               for k, v in flat.items()}, sep="/")
        return jax.tree.map(lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state,
                            state_shardings(params, optimizer, frozen))


def save_checkpoint(manager: Any, state: Any, meta: dict[str, Any]) -> None:
    """Saves the train state and the run's history at `state.step` (unless that step is saved already), waits for
    it, and records the sha256 of every file it wrote (`convert.base.integrity`), checked when it is restored. A
    sharded state is saved as it lies: each process writes the shards its devices hold.

    Raises:
        OutputError: the checkpoint could not be written (a full disk, a write error): one line naming the step's
            directory and why; what orbax had started is removed, and the message says which earlier checkpoint
            is kept. Orbax's own logging of the failure is kept off stderr.
    """
    import orbax.checkpoint as ocp

    from convert.base.integrity import write_manifest
    from flax_model.sharding import is_writer, sync_processes

    step = int(state.step)
    if manager.latest_step() == step:
        return
    directory = Path(manager.directory)
    try:
        # Made here, before orbax starts its writer threads: when orbax itself fails to make it, the threads wait
        # for a signal that never comes and hold the process at exit for orbax's 5-minute timeout.
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_orbax():
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)))
            manager.wait_until_finished()
        sync_processes("checkpoint saved")
        if is_writer():
            write_manifest(directory / str(step))
        sync_processes("checkpoint manifest written")
    except KeyboardInterrupt:
        _settle(manager)
        _remove_partial_step(directory, step)
        raise
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise ValueError, OSError, RuntimeError...
        _settle(manager)
        _remove_partial_step(directory, step)
        raise OutputError(f"{directory / str(step)}: the checkpoint of step {step} could not be written "
                          f"({_write_failure(e)}); what was written of it was removed; "
                          f"{_kept_checkpoint(directory, step)}") from None


def restore_checkpoint(manager: Any, state: Any, where: Path, verify: bool = True) -> tuple[Any, dict[str, Any]]:
    """The latest checkpoint's (state, history), restored with the shapes, dtypes and shardings of `state` (a
    state on a mesh comes back on that mesh, each process reading its devices' shards). Its files are checked
    against the sha256 recorded when it was saved first (`verify=False`: already checked).

    Raises:
        CheckpointError: the checkpoint's files differ from what was saved (naming the step directory and the
            file), or the checkpoint does not fit `state` (another model or other settings).
    """
    import jax
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if verify:
        verify_checkpoint(where, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        with quiet_orbax():
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise CheckpointError(f"{where}: the checkpoint at step {step} does not fit this model and these settings "
                              f"({str(e).splitlines()[0][:200]})") from None
    return restored.state, dict(restored.meta)


def verify_checkpoint(directory: Path, step: int) -> None:
    """Refuses the checkpoint of `step` in `directory` unless its files are those saved (sha256 manifest); the
    message names the step directory and says which earlier checkpoint could be resumed from instead."""
    from convert.base.integrity import check_manifest

    try:
        check_manifest(Path(directory) / str(step))
    except CheckpointError as e:
        earlier = sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit() and int(p.name) < step)
        advice = (f"move {Path(directory) / str(step)} away to resume from step {earlier[-1]}, the checkpoint before"
                  if earlier else "no earlier checkpoint is there: start again without resume")
        raise CheckpointError(f"{e}; nothing was resumed ({advice})") from None


def checkpoint_manager(directory: Path) -> Any:
    """An orbax manager of the run's checkpoints (the two latest kept). The directory is made by the first save,
    not before: a run refused or failing before it saves leaves nothing behind."""
    import orbax.checkpoint as ocp

    with quiet_orbax():
        return ocp.CheckpointManager(directory.resolve(),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=2, create=False))


class quiet_orbax:  # noqa: N801 - a context manager, named as one reads it
    """Keeps orbax's logging (absl: warnings about slow saves, a traceback per failed thread) off stderr while it
    works: the toolkit reports a failure itself, in one line."""

    def __enter__(self) -> None:
        import logging

        self._logger = logging.getLogger("absl")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL + 1)

    def __exit__(self, *exc: Any) -> None:
        self._logger.setLevel(self._level)


def _write_failure(error: BaseException) -> str:
    """Why a checkpoint write failed, in a few words: the OS's reason when orbax or tensorstore gives its code."""
    import errno
    import os
    import re

    if isinstance(error, OSError):
        return cli.describe_os_error(error).split(": ", 1)[-1]
    text = " ".join(str(error).split())
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        number = int(code.group(1))
        full = " (the disk is full)" if number in (errno.ENOSPC, errno.EDQUOT) else ""
        return os.strerror(number) + full
    return f"{type(error).__name__}: {text[:160]}"


def _settle(manager: Any) -> None:
    """Waits for orbax's background writers after a failed save, so that nothing writes once the partial step is
    removed (their own failure was reported already)."""
    try:
        with quiet_orbax():
            manager.wait_until_finished()
    except Exception:  # noqa: BLE001, S110 - the save's failure is the one to report
        pass


def _remove_partial_step(directory: Path, step: int) -> None:
    """Removes what a failed or interrupted save of `step` left: orbax's temporary directory, and a step
    directory without the manifest that marks it complete. Nothing else is touched."""
    from convert.base.integrity import MANIFEST

    if not directory.is_dir():
        return
    for path in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(path, ignore_errors=True)
    final = directory / str(step)
    if final.is_dir() and not (final / MANIFEST).is_file():
        shutil.rmtree(final, ignore_errors=True)


def _kept_checkpoint(directory: Path, failed: int) -> str:
    from convert.base.integrity import MANIFEST

    steps = sorted(int(p.name) for p in (directory.iterdir() if directory.is_dir() else ())
                   if p.name.isdigit() and int(p.name) != failed and (p / MANIFEST).is_file())
    if steps:
        return f"the last good checkpoint, step {steps[-1]}, is kept in {directory} (continue with resume=True)"
    return "there is no earlier checkpoint"


def _trim(ids: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in ids[1:]:
        return ids[:ids.index(eos, 1) + 1]
    return ids


def finetune(
    model: str | Path,
    train: str | Path,
    eval: str | Path,
    output: str | Path,
    settings: FinetuneSettings = FinetuneSettings(),
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
    log: TextIO | None = None,
    command: str | None = None,
    stop: threading.Event | None = None,
    after_step: Callable[[int], None] | None = None,
    mesh: Any = None,
    max_memory: str | int | None = None,
) -> FinetuneResult:
    """Fine-tunes a composed model directory and writes the result to `output`.

    Args:
        model: a composed checkpoint directory (with the decoder's `tokenizer.json`).
        train, eval: JSON-lines manifests, or `convert.datasets_source.DatasetSource`s (🤗 datasets splits).
        output: the directory to write (atomically, at the end).
        settings: the run's knobs.
        checkpoint_dir: where checkpoints go (default: `<output>.checkpoints` beside `output`).
        resume: continue from the latest checkpoint there.
        overwrite: replace an existing `output` written by this toolkit.
        verify: reload the output and compare Flax with the PyTorch reference before publishing it.
        progress: a progress bar on stderr (when it is a terminal); else a log line per eval / 10% of steps.
        log: where log lines go (stdout by default).
        command: the command line, for the model card.
        stop: when set (Ctrl-C), the run saves a checkpoint after the current step and returns `interrupted`.
        after_step: called with the step number after each step (tests).
        mesh: train sharded: a `jax.sharding.Mesh` (axes among data, fsdp, model) or its text, e.g.
            "data=2,fsdp=4" (over every device; the product of the sizes is the device count). Parameters and
            optimiser state are split as the architectures' partition rules say, each micro-batch's rows over
            `data` (`flax_model.training.train_step`); checkpoints hold the sharded state (each process writes
            its shards) and the export gathers it leaf by leaf.
        max_memory: the memory the run may use ("64GB", or bytes) instead of what the machine has: a training step,
            evaluation batch or data set estimated to need more (`flax_model.memory`) is refused before anything is
            compiled.

    Returns:
        The output directory and the run's report; when interrupted, `interrupted=True`, nothing is written to
        `output`, and the report says which step the checkpoint holds.

    Raises:
        ConvertError / UsageError: one line naming the file, field or option that is wrong.
    """
    from convert.base.outputs import check_output_location, claimed, input_sources
    from convert.base.resources import parse_memory
    from convert.training_data import read_examples

    log = log or sys.stdout
    cli.set_interrupt_note("nothing was trained or written")
    settings.check()
    max_memory = parse_memory(max_memory)
    for name, value in (("resume", resume), ("overwrite", overwrite), ("verify", verify)):
        if not isinstance(value, bool):
            raise bad_argument(name, value, "is not True or False")
    if isinstance(mesh, str):
        from flax_model.sharding import mesh_from_flag

        mesh = mesh_from_flag(mesh)
    output = Path(output)
    model_dir = Path(model)
    check_output_location(output, overwrite=overwrite, sources=(("the model", model_dir),), param="output")
    if not (model_dir / "config.json").is_file():
        raise bad_argument("model", model, "not a composed model directory (no config.json)")
    given = checkpoint_dir is not None
    checkpoint_dir = Path(checkpoint_dir) if given else output.with_name(output.name + ".checkpoints")
    # What the run reads is never written, replaced or removed by it: the model, the manifests, their audio.
    from convert.datasets_source import DatasetSource

    data = (read_examples(train), read_examples(eval))  # manifests, or dataset splits (read once)
    manifests = [m for m in (train, eval) if not isinstance(m, DatasetSource)]
    local = [Path(d.name) for d in (train, eval) if isinstance(d, DatasetSource) and Path(d.name).exists()]
    sources = [("the model", model_dir), *input_sources("a manifest being read", manifests),
               *input_sources("a dataset being read", local),
               *input_sources("an audio file being read",
                              sorted({e.audio for e in data[0] + data[1] if isinstance(e.audio, Path)}))]
    check_output_location(output, overwrite=overwrite, param="output",
                          sources=[*sources, ("the checkpoint directory", checkpoint_dir)])
    check_checkpoint_directory(checkpoint_dir, sources=[*sources, ("the output", output)], resume=resume,
                               param="checkpoint_dir" if given else None)
    from flax_model.sharding import is_writer

    with contextlib.ExitStack() as claims:
        if is_writer():  # one run at a time per output and per checkpoint directory (the others fail at once)
            claims.enter_context(claimed(output, "output"))
            claims.enter_context(claimed(checkpoint_dir, "checkpoint_dir" if given else None))
        return _train_and_export(model_dir, train, eval, output, settings, checkpoint_dir, resume=resume,
                                 overwrite=overwrite, verify=verify, progress=progress, log=log, command=command,
                                 stop=stop, after_step=after_step, mesh=mesh, max_memory=max_memory,
                                 sources=sources, data=data)


# Orbax's temporary names for a checkpoint being written (`3.orbax-checkpoint-tmp-1712345678`).
_ORBAX_TMP = re.compile(r".*\.orbax-checkpoint-tmp.*")


def check_checkpoint_directory(directory: Path, *, sources: Sequence[tuple[str, Any]], resume: bool,
                               param: str | None) -> None:
    """Refuses, before any work, a checkpoint directory that could mix with or lose what is not a checkpoint.

    Refused (UsageError): the current or home directory (or one containing either), a directory that is,
    contains or lies inside what the run reads or its output (`sources`), something that is not a directory, a
    directory holding anything but this toolkit's checkpoints (step directories), and, without `resume`, one
    holding checkpoints of an earlier run. `param` names the option when the directory was given (None: the
    default, named by its path alone).
    """
    from convert.base.outputs import check_work_directory

    check_work_directory(directory, sources=sources, param=param)
    if not directory.is_dir():
        return
    where = f"{param}={directory}" if param else str(directory)
    entries = sorted(os.scandir(directory), key=lambda e: e.name)
    foreign = [e.name for e in entries if not (e.is_dir(follow_symlinks=False) and e.name.isdigit())
               and not _ORBAX_TMP.fullmatch(e.name)]
    if foreign:
        raise UsageError(f"{where}: holds {foreign[0]}, which is not a checkpoint of this toolkit; name a new or empty "
                         "directory for the checkpoints", param=param)
    steps = [int(e.name) for e in entries if e.name.isdigit()]
    if steps and not resume:
        raise UsageError(f"{where}: holds checkpoints of an earlier run (up to step {max(steps)}); pass resume=True "
                         "to continue it, or remove the directory", param=param)


def _train_and_export(model_dir: Path, train: str | Path, eval: str | Path, output: Path, settings: FinetuneSettings,
                      checkpoint_dir: Path, *, resume: bool, overwrite: bool, verify: bool, progress: bool,
                      log: TextIO, command: str | None, stop: threading.Event | None,
                      after_step: Callable[[int], None] | None, mesh: Any, max_memory: int | None,
                      sources: list, data: tuple[list, list] | None = None) -> FinetuneResult:
    """The run proper, once its inputs and outputs are checked (see `finetune`).

    Interrupts (with `stop`, as the command passes it): before the first step ends, nothing is worth saving and a
    signal ends the run at once; from then on, while training or saving a checkpoint, the first signal sets `stop`
    (the run saves a checkpoint after the current step and returns `interrupted`) and a second ends it at once;
    after the last checkpoint is saved (the final evaluation, the export, the verification), a signal ends the
    run at once, the temporary output removed and the checkpoint kept.
    """
    import jax

    from convert.base.outputs import atomic_directory, register_cleanup
    from flax_model.training import init_state

    started = time.perf_counter()
    saved: list[int] = []  # steps saved by this run (or resumed from)
    existed = checkpoint_dir.exists()

    def kept() -> str:
        return (f"the checkpoint at step {saved[-1]} in {checkpoint_dir} is kept" if saved
                else "no checkpoint was saved")

    def at_once(note: str) -> None:
        """From here a signal ends the run at once, the interrupt line saying `note`."""
        if stop is not None:
            cli.defer_interrupts(None)
        cli.set_interrupt_note(note)

    def deferred() -> None:
        """From here the first signal sets `stop` (the run saves, then stops); a second ends it at once."""
        if stop is not None and not stop.is_set():
            cli.defer_interrupts(stop.set)
        cli.set_interrupt_note(f"stopped without saving (a second interrupt); {kept()}")

    def remove_if_unused() -> None:
        """The checkpoint directory goes when this run made it and saved nothing in it."""
        if not existed and not saved:
            with contextlib.suppress(OSError):
                checkpoint_dir.rmdir()

    try:
        at_once("nothing was trained or written")
        manager = checkpoint_manager(checkpoint_dir)
        if resume and manager.latest_step() is not None:
            verify_checkpoint(checkpoint_dir, manager.latest_step())  # before the model and the data are read
        run = _Run(model_dir, train, eval, settings, checkpoint_dir, mesh, max_memory, data)
        state = init_state(run.model.params, run.optimizer, run.frozen_fn)
        memory = training_memory(state, run.frozen_fn)
        print(f"training {memory['trainable_parameters']:,} of {memory['parameters']:,} parameters "
              f"({memory['optimizer_state_bytes'] / 2**20:.1f} MiB of optimiser state)", file=log, flush=True)
        if run.untrained_projector_frozen():
            print("note: the projector is as composing initialised it and stays frozen in this run (add "
                  "--train-only projector to train it)", file=log, flush=True)
        if run.products is not None:
            print(f"bfloat16 products: {PRODUCT_FORMS[run.products.form]} ({run.products.reason})", file=log,
                  flush=True)
        history: dict[str, Any] = {"loss": [], "eval": [], "audio_seconds": 0.0, "train_seconds": 0.0}
        if resume and manager.latest_step() is not None:
            state, history = run.restore(manager, state)
            saved.append(int(state.step))
            at_once(kept())
            print(f"resumed from {checkpoint_dir} at step {int(state.step)}", file=log, flush=True)
        else:
            if resume:
                print(f"no checkpoint in {checkpoint_dir}: starting from step 0", file=log, flush=True)
            history["eval"].append({"step": 0, **run.evaluate(state.params)})
            print(f"step 0: WER {history['eval'][-1]['wer']:.3f}, CER {history['eval'][-1]['cer']:.3f}", file=log,
                  flush=True)

        def save() -> None:
            step = int(state.step)
            if step in saved or step == 0:
                return
            # Killed by a second interrupt while saving: what the save had started goes with the process.
            unregister = register_cleanup(lambda: (_remove_partial_step(checkpoint_dir, step), remove_if_unused()))
            try:
                run.save(manager, state, history)
            finally:
                unregister()
            saved.append(step)

        bar = None
        if cli.show_progress(progress):
            from tqdm import tqdm

            bar = tqdm(total=run.total_steps, initial=int(state.step), desc="fine-tuning", file=sys.stderr,
                       dynamic_ncols=True)
        interrupted = False
        every = max(1, run.total_steps // 10)
        try:
            while int(state.step) < run.total_steps:
                step = int(state.step)
                tick = time.perf_counter()
                state, loss, seconds = run.step(state, step)
                jax.block_until_ready(state.params)
                deferred()  # a step is done that no checkpoint holds yet
                elapsed = time.perf_counter() - tick
                history["loss"].append([step + 1, loss])
                history["audio_seconds"] += seconds
                history["train_seconds"] += elapsed
                lr = float(run.schedule(step))
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", audio_s_per_s=f"{seconds / elapsed:.1f}")
                    bar.update(1)
                elif (step + 1) % every == 0:
                    print(f"step {step + 1}/{run.total_steps}: loss {loss:.4f}, lr {lr:.2e}, "
                          f"{seconds / elapsed:.1f} audio-s/s", file=log, flush=True)
                if settings.eval_every and (step + 1) % settings.eval_every == 0 and step + 1 < run.total_steps:
                    history["eval"].append({"step": step + 1, **run.evaluate(state.params)})
                    print(f"step {step + 1}: WER {history['eval'][-1]['wer']:.3f}, "
                          f"CER {history['eval'][-1]['cer']:.3f}", file=log, flush=True)
                if settings.save_every and (step + 1) % settings.save_every == 0:
                    save()
                if after_step is not None:
                    after_step(step + 1)
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
        save()  # the last step (also when interrupted: the first signal is deferred until this is done)
        if interrupted or (stop is not None and stop.is_set()):
            at_once(kept())
            report = {"interrupted_at_step": int(state.step), "checkpoint_dir": str(checkpoint_dir),
                      "checkpoint_step": saved[-1] if saved else None}
            return FinetuneResult(output, report, interrupted=True)
        at_once(f"{kept()} (run again with --resume to evaluate and export it)")
        if not history["eval"] or history["eval"][-1]["step"] != run.total_steps:
            history["eval"].append({"step": run.total_steps, **run.evaluate(state.params)})
        final = history["eval"][-1]
        print(f"step {run.total_steps}: WER {final['wer']:.3f}, CER {final['cer']:.3f}", file=log, flush=True)
        report = _report(run, history, model_dir, train, eval, command, time.perf_counter() - started)
        report["memory"] = {**memory, "peak_rss_bytes": peak_rss_bytes()}

        from flax_model.sharding import gathered_leaves, is_writer, sync_processes

        leaves, factors = export_leaves(run, state.params)
        if not is_writer():  # a multi-process run: contribute each leaf's shards to process 0's export, then wait
            for tree in (factors, leaves):  # the writer's order
                for _ in gathered_leaves(tree, sorted(tree)):
                    pass
            sync_processes("finetune export")
            return FinetuneResult(output, report)
        with atomic_directory(output, overwrite=overwrite, sources=[*sources, ("the checkpoint directory",
                                                                               checkpoint_dir)], param="output") as tmp:
            _write_output(tmp, run, leaves, factors, history, report)
            if verify:
                if run.prefix:
                    from convert.verify_prefix import verify_prefix_directory as verify_directory
                else:
                    from convert.verify import verify_directory

                report["verification"] = verify_directory(tmp, seed=settings.seed)
                (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
                if not report["verification"].get("passed", False):
                    raise ConvertError(f"verification failed: Flax and the PyTorch reference disagree on the "
                                       f"fine-tuned model; nothing was written to {output}; {kept()}")
        cli.set_interrupt_note(f"{output} was written completely")
        sync_processes("finetune export")
        print(f"wrote {output}: WER {history['eval'][0]['wer']:.3f} -> {final['wer']:.3f} on {len(run.eval)} "
              f"held-out utterances, {run.total_steps} step{'s' * (run.total_steps != 1)} in "
              f"{report['wall_seconds']:.0f} s", file=log, flush=True)
        return FinetuneResult(output, report)
    except BaseException:
        remove_if_unused()
        raise
    finally:
        if stop is not None:
            cli.defer_interrupts(None)


def _report(run: _Run, history: dict[str, Any], model_dir: Path, train: Any, eval_manifest: Any,
            command: str | None, wall: float) -> dict[str, Any]:
    s = run.settings
    losses = [loss for _, loss in history["loss"]]
    return {
        "base_model": str(model_dir),
        "train_manifest": str(train),
        "eval_manifest": str(eval_manifest),
        "train_examples": len(run.train),
        "train_audio_hours": round(sum(run.train_lengths) / run.features.sampling_rate / 3600, 4),
        "eval_examples": len(run.eval),
        "settings": dataclasses.asdict(s),
        "bfloat16_products": None if run.products is None else run.products.form,
        "mesh": None if run.mesh is None else {str(k): int(v) for k, v in run.mesh.shape.items()},
        "steps": run.total_steps,
        "optimizer": dataclasses.asdict(run.optimizer_settings),
        "padded_audio_lengths": list(run.boundaries),
        "label_length": run.label_length,
        "unknown_words": _unknown_words(run.tokenizer.unknown),
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-10:])) if losses else None,
        "eval": [{k: v for k, v in e.items() if k != "examples"} for e in history["eval"]],
        "final_examples": history["eval"][-1].get("examples", []),
        "audio_seconds_per_second": round(history["audio_seconds"] / max(history["train_seconds"], 1e-9), 2),
        "train_seconds": round(history["train_seconds"], 1),
        "wall_seconds": round(wall, 1),
        "command": command,
        "train_only": list(s.train_only) if s.train_only else None,
        "lora": None if run.lora is None else {**dataclasses.asdict(run.lora), "layers": len(run.lora_layers),
                                               "export": s.lora_export},
    }


def _unknown_words(unknown: dict[str, Any]) -> dict[str, Any]:
    """How many training transcripts held words the tokenizer does not know (trained as its unknown token with
    allow_unk=True), and the most frequent such words."""
    words = sorted(unknown["words"].items(), key=lambda item: (-item[1], item[0]))
    return {"utterances": unknown["utterances"], "tokens": unknown["tokens"], "distinct_words": len(words),
            "most_frequent": [{"word": w, "utterances": n} for w, n in words[:20]]}


def training_memory(state: Any, frozen: Callable[[str], bool]) -> dict[str, int]:
    """Parameter counts and the bytes training holds besides the model: the gradients (of the trainable leaves
    only) and the optimiser state (AdamW's two moments of each trainable leaf)."""
    import jax
    from flax import traverse_util

    flat = traverse_util.flatten_dict(state.params, sep="/")
    trainable = [v for k, v in flat.items() if not frozen(k)]
    return {
        "parameters": int(sum(v.size for v in flat.values())),
        "trainable_parameters": int(sum(v.size for v in trainable)),
        "parameter_bytes": int(sum(v.nbytes for v in flat.values())),
        "gradient_bytes": int(sum(v.nbytes for v in trainable)),
        "optimizer_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state.opt_state))),
    }


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def export_leaves(run: _Run, params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's leaves to write, the LoRA factors to write as a PEFT adapter) by `/`-joined Flax path. Without
    LoRA: the params and nothing; with `lora_export="merged"` the adapted kernels plus the LoRA update and
    nothing; with `"adapter"` the base leaves as they are and the factors."""
    from flax import traverse_util

    from convert.base.lora import merge_lora, split_lora
    from convert.base.stacking import unstack_params

    flat = traverse_util.flatten_dict(params, sep="/")
    if run.settings.scan_layers:  # HF's per-layer layout; on one device each layer's leaf is a view of the host copy
        flat = unstack_params(flat if run.mesh is not None else {k: np.asarray(v) for k, v in flat.items()},
                              run.stacks)
    if run.lora is None:
        return run.as_stored(flat), {}
    if run.settings.lora_export == "merged":
        return run.as_stored(merge_lora(flat, run.lora_layers, run.lora.scaling)), {}
    base, factors = split_lora(flat)
    return run.as_stored(base), factors


def _write_output(tmp: Path, run: _Run, flat: dict[str, Any], factors: dict[str, Any], history: dict[str, Any],
                  report: dict[str, Any]) -> None:
    from convert.base.params import save_params
    from convert.base.writing import TensorSpec
    from flax_model.sharding import gathered_leaves

    if factors:
        _write_adapter(tmp / ADAPTER_DIR, run, dict(gathered_leaves(factors, sorted(factors))))
    if run.prefix:  # each part in its own directory, with its own files; the projector beside them
        from convert.base.prefix_io import save_prefix_params

        save_prefix_params(tmp, run.config, dict(gathered_leaves(flat, sorted(flat))))
        for part in ("encoder", "decoder"):
            for name in COPIED_FILES:
                if (run.model_dir / part / name).is_file():
                    shutil.copyfile(run.model_dir / part / name, tmp / part / name)
    else:  # leaf by leaf: a sharded state is gathered one leaf at a time, never whole on the host
        order = sorted(flat)
        specs = [TensorSpec(k, np.dtype(flat[k].dtype), tuple(flat[k].shape)) for k in order]
        save_params(tmp, run.config, lambda: gathered_leaves(flat, order), specs=specs)
        for name in COPIED_FILES:
            if (run.model_dir / name).is_file():
                shutil.copyfile(run.model_dir / name, tmp / name)
    if not run.prefix and not (tmp / "generation_config.json").is_file():
        c = run.config
        generation = {"decoder_start_token_id": c.decoder_start_token_id, "eos_token_id": c.eos_token_id,
                      "pad_token_id": c.pad_token_id, "max_length": c.decoder.max_positions}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    with (tmp / LOG_FILE).open("w") as f:
        for step, loss in history["loss"]:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        for e in history["eval"]:
            f.write(json.dumps({"step": e["step"], "wer": e["wer"], "cer": e["cer"]}) + "\n")
    plot_loss_curve(history, tmp / CURVE_FILE)
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "README.md").write_text(render_card(run.model_dir, report))


def _write_adapter(directory: Path, run: _Run, factors: dict[str, np.ndarray]) -> None:
    """The LoRA factors as a PEFT adapter: of the composed model (`SpeechEncoderDecoderModel`'s module names) in
    the cross-attention mode; of each adapted part on its own (`adapter/decoder`: the LM's `...ForCausalLM` names,
    `adapter/encoder`) in the prefix mode, whose parts are models of their own."""
    from convert.base.composed import keymap_for, stores_in_out
    from convert.base.lora import linear_modules, write_part_adapters, write_peft_adapter

    candidates = linear_modules(keymap_for(run.config), run.param_shapes(), stores_in_out(run.config))
    if run.prefix:
        write_part_adapters(directory, run.lora, run.lora_layers, factors, candidates)
    else:
        directory.mkdir()
        write_peft_adapter(directory, run.lora, run.lora_layers, factors, candidates)


def plot_loss_curve(history: dict[str, Any], path: Path) -> None:
    """Training loss per step, and the held-out WER at each evaluation (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [s for s, _ in history["loss"]]
    ax.plot(steps, [v for _, v in history["loss"]], lw=0.8, color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy)")
    if history["eval"]:
        wer = ax.twinx()
        wer.plot([e["step"] for e in history["eval"]], [100 * e["wer"] for e in history["eval"]], "o-",
                 color="tab:red", label="held-out WER")
        wer.set_ylabel("WER (%)")
        wer.legend(loc="upper right")
    ax.legend(loc="upper center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_card(model_dir: Path, report: dict[str, Any]) -> str:
    """The fine-tuned model's card: the composed model's metadata (when it has a compose report) and the run."""
    import yaml

    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "automatic-speech-recognition",
                            "tags": ["speech-encoder-decoder", "automatic-speech-recognition", "jax", "flax",
                                     "fine-tuned"]}
    compose_report = model_dir / "compose_report.json"
    if compose_report.is_file():
        try:
            from convert.model_card import card_info_from_report, card_metadata

            base = card_metadata(card_info_from_report(json.loads(compose_report.read_text())))
            meta = {**base, "tags": list(dict.fromkeys([*base.get("tags", []), "fine-tuned"]))}
        except (ValueError, KeyError, TypeError, ConvertError):
            pass  # an old or foreign report: the card goes without the sources' metadata
    s, first, last = report["settings"], report["eval"][0], report["eval"][-1]
    rows = [("base model", f"`{report['base_model']}`"),
            ("training data", (f"`{report['train_manifest']}`: {report['train_examples']} utterances, "
                               f"{report['train_audio_hours'] * 60:.1f} min")),
            ("held-out data", f"`{report['eval_manifest']}`: {report['eval_examples']} utterances"),
            ("steps", f"{report['steps']} (batch {s['batch_size']} x {s['grad_accum']} accumulated)"),
            ("optimiser", (f"AdamW, peak lr {s['learning_rate']:g}"
                           + (f" (encoder {s['encoder_learning_rate']:g})" if s.get("encoder_learning_rate") else "")
                           + f", warmup {s['warmup_steps']}, linear decay, "
                           f"weight decay {s['weight_decay']:g}, clip {s['max_grad_norm']:g}")),
            ("label smoothing", f"{s['label_smoothing']:g}"),
            *([("hybrid CTC/attention", f"loss {s['ctc_weight']:g} CTC + {1 - s['ctc_weight']:g} cross-entropy"
                + (f"; evaluated with joint decoding, CTC weight {s['eval_ctc_weight']:g}"
                   if s.get("eval_ctc_weight") is not None else ""))] if s.get("ctc_weight") else []),
            ("compute dtype", s["dtype"] + (" (float32 master weights)" if s["dtype"] != "float32" else "")
             + (f"; products: {PRODUCT_FORMS[report['bfloat16_products']]}"
                if report.get("bfloat16_products") in PRODUCT_FORMS else "")),
            ("train mode", ("dropout and LayerDrop" if s["dropout"] else "deterministic")
             + (", SpecAugment" if s["spec_augment"] and s["dropout"] else "")
             + (", frozen feature encoder" if s["freeze_feature_encoder"] else "")
             + (", frozen encoder" if s.get("freeze_encoder") else "")
             + (", rematerialised layers" if s["remat"] else "")
             + (", scanned layers" if s.get("scan_layers") else "")),
            ("loss", f"{report['first_loss']:.3f} -> {report['final_loss']:.3f}"),
            ("held-out WER", f"{100 * first['wer']:.1f}% -> {100 * last['wer']:.1f}%"),
            ("held-out CER", f"{100 * first['cer']:.1f}% -> {100 * last['cer']:.1f}%"),
            ("time", f"{report['wall_seconds']:.0f} s wall, {report['audio_seconds_per_second']} audio-s/s")]
    body = ["# Fine-tuned speech encoder-decoder\n",
            ("Fine-tuned with `convert.finetune` (JAX/Flax) from the composed model below; the weights are in "
             "transformers' format (`SpeechEncoderDecoderModel`) and this toolkit's Flax layout.\n"),
            "## Training run\n", "| | |\n| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
            f"![loss curve]({CURVE_FILE})\n", "## How to load\n",
            ("```python\nfrom flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel\n\n"
             'model = FlaxSpeechEncoderDecoderModel.from_pretrained("path/to/this/directory")\n```\n'),
            ("```python\nfrom transformers import SpeechEncoderDecoderModel\n\n"
             'model = SpeechEncoderDecoderModel.from_pretrained("path/to/this/directory")\n```\n'),
            "## How it was made\n",
            f"```bash\n{report['command'] or 'python -m convert.finetune ...'}\n```\n"]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{header}---\n\n" + "\n".join(body)


# ----------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> cli.ArgumentParser:
    d = FinetuneSettings()
    p = cli.ArgumentParser(
        prog="python -m convert.finetune",
        description="Fine-tune a composed speech encoder-decoder in JAX (AdamW, bucketed batches, checkpoints, "
        "WER/CER evaluation) and write it back in the composed format (Flax msgpack + safetensors).",
        epilog="Manifests: one JSON object per line, {\"audio\": PATH, \"text\": TRANSCRIPT} (relative paths are "
        "relative to the manifest). Ctrl-C saves a checkpoint and exits 130; --resume continues from it. "
        "Example: python -m convert.finetune --model asr --train train.jsonl --eval eval.jsonl --output asr-ft "
        "--max-steps 2000 --learning-rate 3e-4 --warmup-steps 200",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="composed model directory (with tokenizer.json)")
    p.add_argument("--train", metavar="JSONL", help="training manifest (or --dataset)")
    p.add_argument("--eval", metavar="JSONL", help="held-out manifest (WER / CER; or --dataset)")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write the fine-tuned model to")
    p.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training set")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimiser steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N", help="utterances per micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="N",
                   help="micro-batches accumulated per optimiser step")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, metavar="LR", help="peak learning rate")
    p.add_argument("--encoder-learning-rate", type=float, metavar="LR",
                   help="the speech encoder's peak learning rate (default: --learning-rate)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, metavar="N", help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="global-norm clipping (0: none)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="label smoothing factor")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=d.dtype,
                   help="compute dtype; bfloat16 keeps float32 master weights")
    p.add_argument("--bfloat16-products", choices=BFLOAT16_PRODUCTS, default=d.bfloat16_products,
                   help="with --dtype bfloat16: native (bfloat16 operands, float32 sums), upcast (float32 operands: "
                   "for a CPU without bfloat16 arithmetic, where it is faster) or auto (by the device and the CPU's "
                   "flags)")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer (less memory, ~30%% more time)")
    p.add_argument("--scan-layers", action="store_true",
                   help="run each layer stack as one scan in the step: one layer compiled per stack (a shorter "
                   "first step; with --remat, the least memory); the output keeps the per-layer layout")
    p.add_argument("--freeze-feature-encoder", action="store_true", help="do not train the conv feature encoder")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="do not train the speech encoder at all (the decoder, cross-attention and projection train)")
    p.add_argument("--no-spec-augment", dest="spec_augment", action="store_false",
                   help="no SpecAugment masks (by default drawn with the encoder config's probabilities)")
    p.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="train deterministically: no dropout, LayerDrop or SpecAugment")
    p.add_argument("--num-buckets", type=int, default=d.num_buckets, metavar="N",
                   help="distinct padded audio lengths (compiled shapes)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                   help="evaluate every N steps (0: before and after training only)")
    p.add_argument("--save-every", type=int, default=d.save_every, metavar="N",
                   help="checkpoint every N steps (0: at the end and on Ctrl-C only)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, metavar="N")
    p.add_argument("--num-beams", type=int, default=d.num_beams, metavar="N", help="beam width for evaluation")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens generated in evaluation")
    p.add_argument("--seed", type=int, default=d.seed, help="data order, dropout and SpecAugment")
    p.add_argument("--allow-unk", action="store_true",
                   help="train on transcripts with words the tokenizer maps to its unknown token (counted in "
                   "training_report.json); by default they are refused, naming the manifest line and the words")
    p.add_argument("--ctc-weight", type=float, default=d.ctc_weight, metavar="X",
                   help="hybrid CTC/attention: loss X CTC + (1 - X) cross-entropy (the model's CTC head; 0: off)")
    p.add_argument("--eval-ctc-weight", type=float, metavar="X",
                   help="evaluate with joint CTC/attention beam search of CTC weight X (default: attention only)")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="train sharded over every device, e.g. data=2,fsdp=4 (axes data, fsdp, model; the product "
                   "of the sizes is the device count): params and optimiser state split over fsdp/model, batches "
                   "over data")
    names = lambda text: tuple(n.strip() for n in text.split(",") if n.strip())  # noqa: E731
    p.add_argument("--train-only", type=names, metavar="GROUP[,GROUP]",
                   help="train only these parameter groups (encoder, decoder, projector, cross-attention, ...; "
                   "an unknown name lists the model's groups); the rest is frozen, with no gradient or optimiser "
                   "state. Default: everything (with LoRA: only the LoRA factors)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="LoRA on the --lora-targets layers with rank R")
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha; the update is scaled by A/R "
                   "(default: R)")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", type=names, default=",".join(d.lora_targets), metavar="NAME[,NAME]",
                   help="module names of the linear layers LoRA adapts (the last part of their PyTorch names, e.g. "
                   "q_proj,v_proj or c_attn; an unknown name lists them) (default: %(default)s)")
    p.add_argument("--lora-parts", type=names, default=",".join(d.lora_parts), metavar="PART[,PART]",
                   help="where LoRA applies: decoder, encoder or both (default: %(default)s)")
    p.add_argument("--lora-export", choices=LORA_EXPORTS, default=d.lora_export,
                   help="merged: the LoRA update folded into the weights (a plain model); adapter: the base "
                   "weights plus a PEFT adapter in OUTPUT/adapter")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="memory the run may use, e.g. 64GB (default: what the machine has); a step, evaluation batch "
                   "or data set estimated to need more is refused before any work")
    from convert.datasets_source import add_arguments

    add_arguments(p.add_argument_group("data from 🤗 datasets (instead of --train / --eval)"),
                  (("--train-split", "train", "the training split"), ("--eval-split", "validation", "the held-out split")),
                  "the transcript")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="where checkpoints go (default: OUTPUT.checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if this toolkit wrote it")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip comparing the output's Flax and PyTorch logits")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="JAX's persistent compilation cache: a later run with the same model, settings and batch "
                        "shapes reads its compiled step from DIR (default: $JAX_COMPILATION_CACHE_DIR, else "
                        "~/.cache/speech-encdec-flax/xla/<machine>)")
    p.add_argument("--no-compile-cache", action="store_true", help="compile every program afresh")
    return p


def data_sources(args: Any) -> tuple[Any, Any]:
    """The training and held-out data the flags name: two manifests, or two splits of one dataset."""
    if args.dataset is None:
        for name in ("train", "eval"):
            if getattr(args, name) is None:
                raise UsageError(f"{name}: a manifest is needed (--{name} FILE.jsonl), or --dataset", param=name)
        return args.train, args.eval
    if args.train is not None or args.eval is not None:
        raise bad_argument("dataset", args.dataset, "replaces --train and --eval (pass one or the other)")
    from convert.datasets_source import source_from_arguments

    return source_from_arguments(args, args.train_split), source_from_arguments(args, args.eval_split)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:
        from convert.xla_settings import memory_ordered, order_for_memory

        if memory_ordered(args.scan_layers, args.dtype):
            order_for_memory()  # the command's own process, before JAX starts its backend (XLA reads its flags once)
    names = {f.name for f in dataclasses.fields(FinetuneSettings)}
    settings = FinetuneSettings(**{k: v for k, v in vars(args).items() if k in names})
    command = shlex.join(["python", "-m", "convert.finetune", *(sys.argv[1:] if argv is None else argv)])
    stop = threading.Event()  # set by the first Ctrl-C while a step or a save is under way (see `finetune`)

    def work() -> int:
        from convert.compile_cache import default_directory, persistent_cache, usable_directory

        cli.set_interrupt_note("nothing was trained or written")  # finetune sets it too; the cache comes first
        if args.no_compile_cache and args.compile_cache is not None:
            raise bad_argument("--compile-cache", args.compile_cache, "goes without --no-compile-cache")
        cache = None if args.no_compile_cache else usable_directory(args.compile_cache or default_directory())
        train, eval_data = data_sources(args)
        with persistent_cache(cache):
            result = finetune(args.model, train, eval_data, args.output, settings,
                              checkpoint_dir=args.checkpoint_dir, resume=args.resume, overwrite=args.overwrite,
                              verify=args.verify, progress=args.progress, command=command, stop=stop,
                              mesh=args.mesh, max_memory=args.max_memory)
        if result.interrupted:
            step = result.report["checkpoint_step"]
            sys.stderr.write(f"interrupted: checkpoint saved at step {step} in {result.report['checkpoint_dir']} "
                             "(continue with --resume)\n" if step is not None
                             else "interrupted: nothing was trained or written\n")
            return cli.EXIT_INTERRUPTED
        return cli.EXIT_OK

    try:
        return cli.run_command(work, parser)
    finally:
        cli.defer_interrupts(None)


if __name__ == "__main__":
    from convert.allocator import keep_freed_memory

    keep_freed_memory()  # before JAX starts its backend: each step then reuses its buffers' pages (no faults)
    cli.run(main)
