"""One fine-tuning run's working parts (`Run`): the model in its training layout, the data and its buckets, the
compiled step, evaluation, and the train state's checkpoints."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.errors import CheckpointError, ConvertError, bad_argument
from convert.finetune_output import REPORT_FILE
from convert.finetune_settings import FinetuneSettings
from convert.train_checkpoints import restore_checkpoint, save_checkpoint

_COMPILED: dict[Any, Any] = {}


class Run:
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
        self._check_eval_ctc_weight()
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

    def _check_eval_ctc_weight(self) -> None:
        """Joint CTC/attention evaluation needs a CTC head over the decoder's vocabulary (`flax_model.generation.
        joint_setting`): refused here, before any step, rather than by the first evaluation's generation."""
        value = self.settings.eval_ctc_weight
        if value is None:
            return
        head = self.config.ctc
        if head is None:
            raise bad_argument("eval_ctc_weight", value, "the model has no CTC head for joint decoding (compose it "
                               "with --ctc-head decoder)")
        if not head.shares_decoder_vocabulary:
            raise bad_argument("eval_ctc_weight", value, f"the model's CTC head has its own vocabulary "
                               f"({head.vocabulary}), so its scores cannot join the decoder's in joint decoding "
                               "(compose with --ctc-head decoder)")

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
                    # A dataset row's audio is named after the row already: `DATASET[SPLIT]:ROW (FILE)`.
                    audio = str(example.audio)
                    audio = f"its audio{audio[len(example.where):]}" if audio.startswith(example.where) else audio
                    raise ConvertError(f"{example.where}: {audio} has {n} sample{'s' * (n != 1)}, too short for the "
                                       f"encoder (at least {needed})")
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
        # Targets no alignment can fit: CTC's loss is infinite (zero_infinity off), or 0 (zero_infinity: the
        # utterance trains nothing through the head, silently).
        for example, ids, n in zip(self.train, labels, self.train_lengths):
            frames = int(self.config.encoder.output_lengths(self.features.input_length(n)))
            if alignment_frames(ids) > frames:
                outcome = ("its CTC loss would be 0 (zero_infinity) and train nothing" if head.zero_infinity
                           else "its CTC loss would be infinite (the head's zero_infinity is off)")
                raise DataError(f"{example.where}: its {len(ids)} CTC labels need {alignment_frames(ids)} frames (a "
                                f"blank between repeated labels), the audio makes {frames} encoder frames: {outcome}; "
                                "shorten the transcript or drop the line, or train with ctc_weight=0")
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
            room = (self.config.decoder.max_positions - self.config.prompt_length
                    - int(self.config.audio_lengths(frames)))
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


def _trim(ids: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in ids[1:]:
        return ids[:ids.index(eos, 1) + 1]
    return ids
