"""What a fine-tuning run is asked to do (`FinetuneSettings`) and what it returns (`FinetuneResult`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from convert import cli
from convert.base.errors import bad_argument
from convert.host_cpu import CHOICES as BFLOAT16_PRODUCTS

COMPUTE_DTYPES = ("float32", "bfloat16")
PRODUCT_FORMS = {"native": "bfloat16 operands, float32 sums", "upcast": "operands upcast to float32"}
LORA_EXPORTS = ("merged", "adapter")


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
        from convert.sources import MAX_SEED  # compose's and generate's limit (numpy's seeds are 32-bit)

        cli.require_int("seed", self.seed, 0, MAX_SEED)
        cli.require_choice("lora_export", self.lora_export, LORA_EXPORTS)
        if self.lora_rank is None:
            for name, unset in (("lora_alpha", None), ("lora_dropout", 0.0)):
                if getattr(self, name) != unset:
                    raise bad_argument(name, getattr(self, name), "applies to LoRA: set lora_rank=... to use it")
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
