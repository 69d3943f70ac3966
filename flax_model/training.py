"""Training the composed model in JAX: the loss, the optimiser and the train step (the layers' calls: `layer_calls`).

Semantics are transformers' (`SpeechEncoderDecoderModel.forward(labels=...)` and `Seq2SeqTrainer`):

* Labels are token ids padded with `IGNORE_INDEX` (-100). The decoder reads them shifted one place right with
  `decoder_start_token_id` in front and -100 replaced by `pad_token_id` (`shift_tokens_right`).
* The loss is the mean cross-entropy over the real (not -100) label tokens. With label smoothing e it is
  transformers' `LabelSmoother`: (1 - e) * mean NLL + e * mean over tokens and vocabulary of -log p.
* Gradient accumulation divides by the real tokens of all micro-batches of the step (transformers'
  `num_items_in_batch`), so that accumulating k micro-batches is the same update as one batch k times as big.
* AdamW (optax) with HF's defaults, global-norm clipping, a linear warmup then linear decay to 0. No weight decay
  on biases and normalisation scales (as transformers' Flax examples). Frozen leaves (the conv feature encoder
  under `freeze_feature_encoder`, and leaves the reference keeps as buffers) get no update at all.

Everything here is a pure function of explicit state: `loss(params, batch, rng)`, `jax.grad`, an optax chain,
and a `TrainState` pytree. Randomness comes from keys split per step (`step_key`), never from Python.

On a mesh (params placed as sharded `jax.Array`s by `from_pretrained(..., mesh=...)`) the same step runs sharded:
the optimiser state follows its parameters' shardings (`state_shardings`), the batch's rows are split over `data`
and `fsdp` (MaxText's convention: fsdp is data parallelism with split weights; `place_batch`), and the compiled
functions say what their results' shardings are
(`step_functions`); XLA's sharding propagation does the rest (the gradient's sum over `data`, the all-gathers of
`fsdp`-split weights). Dropout draws the same bits on any mesh (JAX's partitionable threefry, the default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from convert.base.composed import non_trainable_paths
from convert.base.labels import check_label_smoothing, check_labels
from convert.base.stacking import Stacks, layer_of, layer_path, layer_stacks, stack_params, stack_size
from flax_model.sharding import gathered_in_training, shard_batch, train_batch_rows, train_batch_sharding

IGNORE_INDEX = -100
# The conv feature encoder's module name in every registered speech encoder (HF's Flax and PyTorch wav2vec2
# family all call it `feature_extractor`); `freeze_feature_encoder` freezes the leaves under it.
FEATURE_ENCODER = "feature_extractor"

# ----------------------------------------------------------------------------------------------------------
# Loss


def shift_tokens_right(labels: jax.Array, pad_token_id: int, decoder_start_token_id: int) -> jax.Array:
    """Decoder inputs from labels [B, T]: the start token, then the labels but the last; -100 becomes pad."""
    shifted = jnp.concatenate(
        [jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1)
    return jnp.where(shifted == IGNORE_INDEX, pad_token_id, shifted)


@flax.struct.dataclass
class LossSums:
    """Sums over the real label tokens, from which the mean loss and its gradient follow.

    Attributes:
        nll: sum of -log p(label).
        smooth: sum over tokens of sum over the vocabulary of -log p (label smoothing's term).
        tokens: how many real label tokens.
        vocab_size: V, to average the smoothing term over the vocabulary.
    """

    nll: jax.Array
    smooth: jax.Array
    tokens: jax.Array
    vocab_size: int = flax.struct.field(pytree_node=False, default=1)
    # Hybrid CTC/attention (`flax_model.ctc.ctc_loss_terms`): the CTC loss summed over the utterances (each divided
    # by its target length under the "mean" reduction) and what that sum is averaged over (utterances, or 1).
    ctc: jax.Array | None = None
    ctc_count: jax.Array | None = None

    def objective(self, label_smoothing: float | jax.Array,
                  ctc_scales: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """The loss times the number of tokens: summed over micro-batches, then divided by the total tokens.

        With `ctc_scales` = (1 - lambda, lambda x total tokens / total CTC count) over the whole step
        (`ctc_scales`), it is (1 - lambda) x the cross-entropy objective + that scale x the CTC sum: divided by the
        step's tokens, lambda CTC + (1 - lambda) cross-entropy.
        """
        attention = (1.0 - label_smoothing) * self.nll + label_smoothing * self.smooth / self.vocab_size
        if ctc_scales is None:
            return attention
        return ctc_scales[0] * attention + ctc_scales[1] * self.ctc

    def mean(self, label_smoothing: float | jax.Array, ctc_weight: float | jax.Array = 0.0) -> jax.Array:
        """transformers' loss: `CrossEntropyLoss()` without smoothing, `LabelSmoother(e)` with; with CTC terms,
        ctc_weight x CTC + (1 - ctc_weight) x that."""
        attention = self.objective(label_smoothing) / jnp.maximum(self.tokens, 1)
        if self.ctc is None:
            return attention
        return (1.0 - ctc_weight) * attention + ctc_weight * self.ctc / self.ctc_count


def ctc_scales(ctc_weight: float, tokens: int, ctc_count: float) -> tuple[np.float32, np.float32]:
    """`LossSums.objective`'s weights for a step whose micro-batches hold `tokens` label tokens and a CTC count
    (`LossSums.ctc_count` summed, or 1 under the "sum" reduction) of `ctc_count`."""
    return np.float32(1.0 - ctc_weight), np.float32(ctc_weight * max(tokens, 1) / max(ctc_count, 1e-9))


def loss_sums(logits: jax.Array, labels: jax.Array) -> LossSums:
    """logits [B, T, V] (any float dtype; computed in float32), labels [B, T] with -100 for padding.

    -log p(label) = logsumexp(logits) - logits[label], and the smoothing term sums V * logsumexp - logits over
    the vocabulary: no [B, T, V] log-probabilities are made (their gradient is the softmax, the one [B, T, V]
    array the backward pass needs besides the float32 logits).
    """
    logits = logits.astype(jnp.float32)  # [B, T, V]
    real = labels != IGNORE_INDEX  # [B, T]
    normaliser = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.take_along_axis(logits, jnp.where(real, labels, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.sum(jnp.where(real, normaliser - picked, 0.0))
    vocab_size = logits.shape[-1]
    smooth = jnp.sum(jnp.where(real, vocab_size * normaliser - jnp.sum(logits, axis=-1), 0.0))
    return LossSums(nll, smooth, jnp.sum(real).astype(jnp.int32), vocab_size)


# ----------------------------------------------------------------------------------------------------------
# Which leaves train


def leaf_labels(params: Mapping[str, Any], frozen: Callable[[str], bool]) -> dict:
    """"train" or "frozen" for every leaf (a tree shaped like `params`), by its `/`-joined path."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    return traverse_util.unflatten_dict({k: "frozen" if frozen(k) else "train" for k in flat}, sep="/")


def buffer_paths(config: Any, params: Mapping[str, Any]) -> frozenset[str]:
    """The Flax paths of `params` that transformers keeps as buffers (a logits bias, BatchNorm running
    statistics): loaded and saved like weights, never trained (`convert.base.composed.non_trainable_paths`)."""
    return non_trainable_paths(config, traverse_util.flatten_dict(dict(params), sep="/"))


def frozen_predicate(freeze_feature_encoder: bool, non_trainable: frozenset[str] = frozenset(),
                     freeze_encoder: bool = False) -> Callable[[str], bool]:
    """Path -> frozen: the conv feature encoder's leaves when it is frozen, every speech-encoder leaf under
    `freeze_encoder` (the decoder, its cross-attention and `enc_to_dec_proj` train), and the `non_trainable`
    paths (leaves the PyTorch reference keeps as buffers, which transformers never trains)."""

    def frozen(path: str) -> bool:
        if path in non_trainable or (freeze_encoder and in_speech_encoder(path)):
            return True
        return freeze_feature_encoder and in_feature_encoder(path)

    return frozen


def split_trainable(params: Mapping[str, Any], frozen: Callable[[str], bool]) -> tuple[dict, dict]:
    """(the trainable leaves, the frozen ones) of a param tree, each a nested dict holding only its own leaves.

    Training with a `frozen` predicate differentiates and optimises the first tree only: no gradient is computed
    and no optimiser state is kept for a frozen leaf (what makes training a projector or LoRA factors on a large
    frozen model fit in memory)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    trainable = {k: v for k, v in flat.items() if not frozen(k)}
    rest = {k: v for k, v in flat.items() if frozen(k)}
    return (traverse_util.unflatten_dict(trainable, sep="/") if trainable else {},
            traverse_util.unflatten_dict(rest, sep="/") if rest else {})


def join_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """The whole param tree from `split_trainable`'s two halves."""
    flat = traverse_util.flatten_dict(dict(frozen), sep="/")
    flat.update(traverse_util.flatten_dict(dict(trainable), sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def in_speech_encoder(path: str) -> bool:
    """The leaf at this `/`-joined path belongs to the speech encoder (not the projection or the decoder)."""
    return path.split("/", 1)[0] == "encoder"


def in_feature_encoder(path: str) -> bool:
    """The leaf at this `/`-joined path belongs to the speech encoder's conv feature encoder."""
    return in_speech_encoder(path) and FEATURE_ENCODER in path.split("/")


def decays(path: str) -> bool:
    """Weight decay applies to kernels and embeddings, not to biases or normalisation scales."""
    return path.rsplit("/", 1)[-1] not in ("bias", "scale")


def path_mask(predicate: Callable[[str], bool]) -> Callable[[Any], Any]:
    """An optax mask function: a tree of `predicate(path)` over the `/`-joined paths of the tree it is given."""
    return lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, _: predicate("/".join(str(getattr(k, "key", k)) for k in path)), tree)


# ----------------------------------------------------------------------------------------------------------
# Optimiser and train state


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with warmup and linear decay; the defaults are transformers' `TrainingArguments` ones.

    Attributes:
        learning_rate: the peak learning rate.
        total_steps: optimiser steps of the whole run (the decay reaches 0 there).
        warmup_steps: steps of the linear warmup from 0.
        weight_decay: AdamW's decoupled weight decay (kernels and embeddings only).
        max_grad_norm: clip the global gradient norm to this; None or 0 disables clipping.
        b1, b2, eps: Adam's moments and epsilon.
        encoder_learning_rate: the speech encoder's peak rate (same warmup and decay) when it differs from
            `learning_rate`, e.g. a random decoder over a pretrained encoder, or a from-scratch encoder whose
            fast updates would wash out what the decoder is learning to read; None: `learning_rate`.
    """

    learning_rate: float = 5e-5
    total_steps: int = 1000
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    encoder_learning_rate: float | None = None

    def schedule(self) -> optax.Schedule:
        warmup = max(0, min(self.warmup_steps, self.total_steps))
        decay = max(1, self.total_steps - warmup)
        return optax.join_schedules([optax.linear_schedule(0.0, self.learning_rate, max(1, warmup)),
                                     optax.linear_schedule(self.learning_rate, 0.0, decay)], [warmup])


def make_optimizer(settings: OptimizerSettings, labels: Any) -> optax.GradientTransformation:
    """The optimiser: clipping and AdamW on the "train" leaves, a zero update on the "frozen" ones.

    Args:
        settings: the hyper-parameters.
        labels: `leaf_labels(params, ...)`, a tree of "train" / "frozen".
    """
    parts = [
        optax.clip_by_global_norm(settings.max_grad_norm) if settings.max_grad_norm else optax.identity(),
        optax.adamw(settings.schedule(), b1=settings.b1, b2=settings.b2, eps=settings.eps,
                    weight_decay=settings.weight_decay, mask=path_mask(decays)),
    ]
    if settings.encoder_learning_rate is not None and settings.encoder_learning_rate != settings.learning_rate:
        # AdamW's update (decay included) is proportional to the rate: scaling the encoder's updates by the
        # ratio of the rates is AdamW at the encoder's rate, under the same warmup and decay.
        ratio = settings.encoder_learning_rate / settings.learning_rate
        parts.append(optax.masked(optax.scale(ratio), path_mask(in_speech_encoder)))
    train = optax.chain(*parts)
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and checkpoints).

    Attributes:
        step: optimiser steps taken.
        params: float32 master weights.
        opt_state: the optimiser's state.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def init_state(params: Any, optimizer: optax.GradientTransformation,
               frozen: Callable[[str], bool] | None = None) -> TrainState:
    """Step 0 of a run over `params`. Params on a mesh (sharded `jax.Array`s) give a state on that mesh: each
    optimiser-state leaf is created sharded like its parameter (`state_shardings`), never whole on one device.
    With `frozen`, the optimiser (made for the trainable leaves only) keeps state for those alone."""
    optimised = params if frozen is None else split_trainable(params, frozen)[0]
    shardings = state_shardings(params, optimizer, frozen)
    if shardings is None:
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(optimised))
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(optimised)
    return TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state)


def params_mesh(params: Any) -> Mesh | None:
    """The mesh the params are placed on (their leaves' `NamedSharding`s), or None for params on one device."""
    leaves = jax.tree.leaves(params)
    if not leaves or not all(isinstance(getattr(x, "sharding", None), NamedSharding) for x in leaves):
        return None
    return leaves[0].sharding.mesh


def state_shardings(params: Any, optimizer: optax.GradientTransformation,
                    frozen: Callable[[str], bool] | None = None) -> TrainState | None:
    """The `NamedSharding` of every leaf of the train state over `params` (None when they are not on a mesh).

    A leaf of the optimiser state that is shaped like a parameter (Adam's moments) follows that parameter's
    sharding: optax keeps the params' dict layout below its own nodes, so the leaf's trailing dict keys are the
    parameter's path. Everything else (the step, optax's counts) is replicated.
    """
    mesh = params_mesh(params)
    if mesh is None:
        return None
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    replicated = NamedSharding(mesh, PartitionSpec())

    def follow(path: tuple, leaf: Any) -> NamedSharding:
        param = flat.get(param_keypath(path)[1])
        return param.sharding if param is not None and param.shape == leaf.shape else replicated

    abstract = jax.eval_shape(optimizer.init, params if frozen is None else split_trainable(params, frozen)[0])
    return TrainState(replicated, jax.tree.map(lambda x: x.sharding, params),
                      jax.tree_util.tree_map_with_path(follow, abstract))


def param_keypath(keypath: tuple) -> tuple[str, str]:
    """(optax's part, the parameter's `/`-joined path) of a train-state leaf's key path: optax keeps the params'
    dict layout below its own nodes, so the trailing dict keys are the parameter's path ("" for a leaf that
    belongs to no parameter, such as a step count)."""
    n = len(keypath)
    while n and isinstance(keypath[n - 1], jax.tree_util.DictKey):
        n -= 1
    return jax.tree_util.keystr(tuple(keypath[:n])), "/".join(str(k.key) for k in keypath[n:])


def relayout_state(state: TrainState, target: TrainState, stacks: Stacks) -> TrainState:
    """`state` in the other layer layout (per layer <-> stacked, `convert.base.stacking`), shaped like `target`
    (an abstract state of the same optimiser over the other layout's params): each stacked leaf (a parameter, an
    Adam moment) is the stack of its layers' leaves, each per-layer leaf an index into its stacked leaf; every
    other leaf is carried over. Bit-exact. Jit it with the target's shardings to convert a state on a mesh.

    Raises:
        KeyError: `target` holds a leaf `state` has no counterpart of (another model or optimiser).
    """
    source = {param_keypath(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}

    def build(path: tuple, _: Any) -> jax.Array:
        above, param = param_keypath(path)
        if (above, param) in source:
            return source[above, param]
        layers = stack_size(param, stacks)
        if layers is not None:  # a stacked leaf, from its layers
            return jnp.stack([source[above, layer_path(param, stacks, i)] for i in range(layers)])
        split = layer_of(param, stacks)  # a layer's leaf, from its stacked leaf
        if split is None:
            raise KeyError(f"{above}{param}")
        return source[above, split[0]][split[1]]

    return jax.tree_util.tree_map_with_path(build, target)


def step_key(seed: int, step: int, micro_batch: int = 0) -> jax.Array:
    """The dropout / LayerDrop key of one micro-batch of one step: a pure function of (seed, step, micro-batch),
    so that a resumed run draws what an uninterrupted one would."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), micro_batch)


def add_grads(total: Any, grads: Any) -> Any:
    return grads if total is None else jax.tree.map(jnp.add, total, grads)


def apply_function(optimizer: optax.GradientTransformation, frozen: Callable[[str], bool] | None = None
                   ) -> Callable[[TrainState, Any, jax.Array], TrainState]:
    """(state, summed gradients of `LossSums.objective`, total tokens) -> the next state (to jit). With `frozen`
    the gradients and the optimiser are those of the trainable leaves (`split_trainable`); frozen leaves pass
    through unchanged."""

    def apply(state: TrainState, grads: Any, tokens: jax.Array) -> TrainState:
        scale = 1.0 / jnp.maximum(tokens, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g * scale, grads)
        if frozen is None:
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
        trainable, rest = split_trainable(state.params, frozen)
        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        return TrainState(state.step + 1, join_params(optax.apply_updates(trainable, updates), rest), opt_state)

    return apply


def global_norm(tree: Any) -> float:
    return float(optax.global_norm(tree))


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)


def loss_grad_function(module: nn.Module, *, deterministic: bool, freeze_feature_encoder: bool = False,
                       gathered: Mapping[str, NamedSharding] | None = None,
                       frozen: Callable[[str], bool] | None = None,
                       with_ctc: bool = False) -> Callable[..., tuple[LossSums, Any]]:
    """(params, batch, rng, label_smoothing[, ctc_scales]) -> (LossSums, gradients of `LossSums.objective`), to jit.

    `module` is a `SpeechEncoderDecoderModule` (its `dtype` the compute dtype, `remat` on request); `batch` holds
    "inputs" [B, N], "attention_mask" [B, N] | None, "labels" [B, T] and optionally "mask_time_indices" [B, S],
    "mask_feature_indices" [B, C] and "ctc_labels" [B, U]. The gradients are of the summed objective: divide by
    the step's total tokens (`apply_function` does) for the gradient of the mean loss. `with_ctc` adds the CTC
    head's loss, weighted by `ctc_scales` (`ctc_scales()`, from the whole step's counts).

    `gathered` (on a mesh): `/`-joined paths of split leaves to use whole, each with the (replicated) sharding to
    gather it to (`flax_model.sharding.gathered_in_training`).

    `frozen`: the gradients are those of the trainable leaves alone (`split_trainable`'s first tree); nothing is
    computed for the frozen ones.

    A module with `scan_layers` takes `params` in either layout: stacked (the gradients come back stacked), or
    HF's per-layer layout, whose stacks are then stacked inside the function (`convert.base.stacking`; the
    gradients come back per layer, as `convert.finetune --scan-layers` keeps its state).
    """
    stacks = layer_stacks(module.config) if getattr(module, "scan_layers", False) else None

    def run(params: Any, batch: Mapping[str, Any], rng: jax.Array | None, label_smoothing: jax.Array,
            ctc_scales: tuple[jax.Array, jax.Array] | None = None):
        def objective(p: Any) -> tuple[jax.Array, LossSums]:
            if gathered or freeze_feature_encoder or stacks:
                flat = traverse_util.flatten_dict(dict(p), sep="/")
                for path, sharding in (gathered or {}).items():
                    flat[path] = jax.lax.with_sharding_constraint(flat[path], sharding)
                if freeze_feature_encoder:
                    # A frozen conv feature encoder runs on constants: none of its ops is linearised, so none of
                    # its full-rate activations is kept for the backward pass (its gradients are zeros).
                    flat = {k: jax.lax.stop_gradient(v) if in_feature_encoder(k) else v for k, v in flat.items()}
                if stacks:
                    flat = stack_params(flat, stacks, stack=jnp.stack)
                p = traverse_util.unflatten_dict(flat, sep="/")
            sums = module.apply(
                {"params": p}, batch["inputs"], batch.get("attention_mask"), batch["labels"], deterministic,
                freeze_feature_encoder, batch.get("mask_time_indices"), batch.get("mask_feature_indices"),
                None, batch.get("ctc_labels"), with_ctc,
                method="loss_sums", rngs=None if deterministic else {"dropout": rng})
            return sums.objective(label_smoothing, ctc_scales if with_ctc else None), sums

        if frozen is None:
            (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
            return sums, grads
        trainable, rest = split_trainable(params, frozen)
        (_, sums), grads = jax.value_and_grad(lambda t: objective(join_params(t, rest)), has_aux=True)(trainable)
        return sums, grads

    return run


# ----------------------------------------------------------------------------------------------------------
# The step


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """The compiled pieces of an optimiser step (`step_functions`), run by `train_step`.

    Attributes:
        grad: (params, batch, rng, label_smoothing) -> (LossSums, gradients of the summed objective).
        add: (summed gradients, gradients) -> their sum (the first argument is donated).
        apply: (state, summed gradients, total tokens) -> the next state (the state is donated).
        mesh: the mesh the state lives on; None on one device.
        vocab_size: the decoder's vocabulary: `train_step` refuses label ids outside it (None: not checked
            against it).
        ctc_reduction: the CTC head's reduction when `grad` adds the CTC loss (hybrid CTC/attention); else None.
        frozen: the predicate the step was made with (`step_functions`): the gradients are those of the other
            leaves. `train_step` needs it to compile `apply` ahead (`compile_apply_ahead`).
    """

    grad: Callable[..., tuple[LossSums, Any]]
    add: Callable[[Any, Any], Any]
    apply: Callable[[TrainState, Any, jax.Array], TrainState]
    mesh: Mesh | None = None
    vocab_size: int | None = None
    ctc_reduction: str | None = None
    frozen: Callable[[str], bool] | None = None


def _grad_shardings(shardings: TrainState, frozen: Callable[[str], bool] | None) -> Any:
    # The gradients are placed like the parameters they belong to (the trainable ones only, with `frozen`).
    return shardings.params if frozen is None else split_trainable(shardings.params, frozen)[0]


def compiled_grad(module: nn.Module, *, deterministic: bool, freeze_feature_encoder: bool = False,
                  shardings: TrainState | None = None, frozen: Callable[[str], bool] | None = None,
                  with_ctc: bool = False) -> Callable[..., tuple[LossSums, Any]]:
    """`loss_grad_function` compiled; on a mesh (`shardings`) the gradients come out sharded like the params and
    the loss sums replicated (every process can read them)."""
    if shardings is None:
        return jax.jit(loss_grad_function(module, deterministic=deterministic,
                                          freeze_feature_encoder=freeze_feature_encoder, frozen=frozen,
                                          with_ctc=with_ctc))
    replicated = NamedSharding(shardings.step.mesh, PartitionSpec())
    params = traverse_util.flatten_dict(dict(shardings.params), sep="/")
    gathered = {path: replicated for path in sorted(gathered_in_training(module.config, params))}
    grad = loss_grad_function(module, deterministic=deterministic, freeze_feature_encoder=freeze_feature_encoder,
                              gathered=gathered, frozen=frozen, with_ctc=with_ctc)
    return jax.jit(grad, out_shardings=(replicated, _grad_shardings(shardings, frozen)))


def compiled_add(shardings: TrainState | None = None, frozen: Callable[[str], bool] | None = None
                 ) -> Callable[[Any, Any], Any]:
    """The sum of two gradient trees, compiled (the first argument donated), sharded like the params."""
    if shardings is None:
        return jax.jit(add_grads, donate_argnums=(0,))
    return jax.jit(add_grads, out_shardings=_grad_shardings(shardings, frozen), donate_argnums=(0,))


def compiled_apply(optimizer: optax.GradientTransformation, shardings: TrainState | None = None,
                   frozen: Callable[[str], bool] | None = None) -> Callable[[TrainState, Any, jax.Array], TrainState]:
    """`apply_function` compiled (the state donated); on a mesh the next state is sharded like this one."""
    if shardings is None:
        return jax.jit(apply_function(optimizer, frozen), donate_argnums=(0,))
    return jax.jit(apply_function(optimizer, frozen), out_shardings=shardings, donate_argnums=(0,))


def step_functions(module: nn.Module, optimizer: optax.GradientTransformation, *, deterministic: bool,
                   freeze_feature_encoder: bool = False, shardings: TrainState | None = None,
                   frozen: Callable[[str], bool] | None = None, with_ctc: bool = False) -> StepFunctions:
    """Compiles the step's pieces (`compiled_grad`, `compiled_add`, `compiled_apply`).

    Args:
        module: a `SpeechEncoderDecoderModule`.
        optimizer: from `make_optimizer`.
        deterministic: no dropout, LayerDrop (train mode off).
        freeze_feature_encoder: stop gradients at the conv feature encoder's output.
        shardings: `state_shardings(params, optimizer, frozen)` for a state on a mesh; None: one device.
        frozen: path -> frozen: gradients, optimiser state and updates for the other leaves only (the optimiser
            made over `split_trainable(params, frozen)[0]`, the state by `init_state(params, optimizer, frozen)`).
        with_ctc: add the CTC head's loss (hybrid CTC/attention; `train_step`'s `ctc_weight` weighs it).
    """
    return StepFunctions(
        compiled_grad(module, deterministic=deterministic, freeze_feature_encoder=freeze_feature_encoder,
                      shardings=shardings, frozen=frozen, with_ctc=with_ctc),
        compiled_add(shardings, frozen), compiled_apply(optimizer, shardings, frozen),
        None if shardings is None else shardings.step.mesh, module.config.decoder.vocab_size,
        module.config.ctc.loss_reduction if with_ctc else None, frozen)


def place_batch(mesh: Mesh | None, batch: Mapping[str, Any]) -> dict[str, Any]:
    """A micro-batch's host arrays on the mesh, rows split over `data` x `fsdp`
    (`flax_model.sharding.train_batch_sharding`; None entries dropped); unchanged without a mesh. The rows must
    be a multiple of `train_batch_rows(mesh)` (`pad_batch`)."""
    if mesh is None:
        return {k: v for k, v in batch.items() if v is not None}
    sharding = train_batch_sharding(mesh)
    return {k: shard_batch(mesh, v, sharding) for k, v in batch.items() if v is not None}


def pad_batch(batch: Mapping[str, Any], multiple: int) -> dict[str, Any]:
    """A micro-batch with rows appended up to a multiple of `multiple` (the batch's parts) that add nothing to
    the loss or the gradients: copies of the last utterance whose labels are all `IGNORE_INDEX` and whose
    SpecAugment masks are off. (Dropout draws for a batch of another shape differ: a padded batch trains like
    the unpadded one in deterministic mode only.)"""
    rows = len(batch["labels"])
    padded = -(-rows // multiple) * multiple
    if padded == rows:
        return dict(batch)
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if value is None:
            out[name] = None
            continue
        value = np.asarray(value)
        if name == "labels":
            fill = np.full((padded - rows, *value.shape[1:]), IGNORE_INDEX, value.dtype)
        elif name.startswith("mask_"):
            fill = np.zeros((padded - rows, *value.shape[1:]), value.dtype)
        else:
            fill = np.repeat(value[-1:], padded - rows, axis=0)
        out[name] = np.concatenate([value, fill])
    return out


def _replicated_key(mesh: Mesh | None, key: jax.Array | None) -> jax.Array | None:
    # On a mesh every process passes the same key; placed replicated, it is a global array like the others.
    if mesh is None or key is None:
        return key
    return jax.device_put(key, NamedSharding(mesh, PartitionSpec()))


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """x's shape, dtype and placement as jax.jit keys its cache by them: an array not committed to a device
    (made by `jnp`, no `device_put`) has no sharding of its own there."""
    committed = getattr(x, "committed", False)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=x.sharding if committed else None,
                                weak_type=bool(getattr(x, "weak_type", False)))


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the block runs (as it was after). Tracing a training step
    makes millions of short-lived objects, and each of the collector's passes scans every object the process
    holds: about 0.3 s of the scanned wav2vec2-base + BART-base gradient's 1.0-1.3 s trace."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def compile_first_step(fns: StepFunctions, state: TrainState, *grad_args: Any) -> tuple[Any, threading.Thread | None]:
    """The step's first compile, ordered so that Python's work does not wait on itself and the second core has
    work: `apply` traced and lowered here, its XLA compile started in a thread (`compile_apply_ahead`), then the
    gradient traced, lowered and compiled here while that compile runs (XLA's compiles release the interpreter
    lock); the cyclic garbage collector paused throughout (`collector_paused`). With the update traced in its
    thread beside the gradient's trace, the two took turns on the interpreter (the gradient's trace and lowering:
    1.8 s in `convert.finetune`'s first step, wav2vec2-base + BART-base scanned in bfloat16; 1.3 s in this order,
    beside the update's XLA compile).

    Returns the compiled gradient (a later `fns.grad(*grad_args)` finds it in jax.jit's cache, traced, lowered
    and compiled once) and the thread compiling `apply` (None on a mesh)."""
    with collector_paused():
        thread = compile_apply_ahead(fns, state)
        return fns.grad.trace(*grad_args).lower().compile(), thread


# fns.apply -> the thread that compiled it ahead (an entry goes with its function)
_APPLY_AHEAD: weakref.WeakKeyDictionary[Any, threading.Thread] = weakref.WeakKeyDictionary()


def compile_apply_ahead(fns: StepFunctions, state: TrainState) -> threading.Thread | None:
    """Traces and lowers `fns.apply` for `state`'s shapes and placements here and starts its XLA compile in a
    thread, once per `apply` function; returns the thread (join it before the first `fns.apply` call), or None on
    a mesh (not done there).

    The step's first call compiles the gradient function, during which XLA:CPU leaves part of the cores idle
    (a wav2vec2-base + BART-base gradient: 16.8 s, 23.6 CPU-seconds unrolled); `apply` (AdamW over the trainable
    leaves: ~370 per-layer ones, ~7 s of tracing and compiling; 65 stacked ones, 0.2 s to lower and 1.8
    CPU-seconds to compile) compiles beside it instead of after the first gradient. The later `fns.apply` call
    finds the program in jax.jit's cache, as its arguments have these shapes, dtypes and placements."""
    if fns.mesh is not None:
        return None
    if fns.apply in _APPLY_AHEAD:
        return _APPLY_AHEAD[fns.apply]
    params = state.params if fns.frozen is None else split_trainable(state.params, fns.frozen)[0]
    args = (jax.tree.map(_abstract, state), jax.tree.map(_abstract, params),  # gradients: like their params
            jax.ShapeDtypeStruct((), np.int32))

    lowered = None
    with contextlib.suppress(Exception):  # an optimisation only: the call itself compiles (and reports) then
        lowered = fns.apply.lower(*args)

    def compile_apply() -> None:
        with contextlib.suppress(Exception):
            if lowered is not None:
                lowered.compile()

    thread = _APPLY_AHEAD[fns.apply] = threading.Thread(target=compile_apply, name="compile-apply",
                                                           daemon=True)
    thread.start()
    return thread


def train_step(fns: StepFunctions, state: TrainState, micro_batches: Iterable[tuple[Mapping[str, Any], Any]],
               label_smoothing: float = 0.0, ctc_weight: float = 0.0) -> tuple[TrainState, float, int]:
    """One optimiser step over its micro-batches (gradient accumulation).

    Args:
        fns: from `step_functions`.
        state: the state before the step (donated: do not use it afterwards).
        micro_batches: (batch of host arrays as `loss_grad_function` takes them, dropout key or None), read one
            at a time (all first, with CTC: its weights need the step's counts). On a mesh each is padded to a
            multiple of data x fsdp (`pad_batch`) and its rows split over both axes; in a multi-process run every
            process passes the whole micro-batch.
        label_smoothing: transformers' `label_smoothing_factor`, in [0, 1).
        ctc_weight: lambda of the hybrid loss lambda CTC + (1 - lambda) cross-entropy (`fns` built `with_ctc`).

    Returns:
        (the next state, the step's summed objective, its real label tokens): the mean loss is their ratio.

    Raises:
        UsageError: labels that are not integer ids within the vocabulary or -100, a smoothing outside [0, 1).
    """
    grads, objective, tokens = None, 0.0, 0
    smoothing = np.float32(check_label_smoothing(label_smoothing))
    ahead = None
    scales = None
    if fns.ctc_reduction is not None:
        micro_batches = list(micro_batches)
        labels = [np.asarray(batch["labels"]) for batch, _ in micro_batches]
        count = (sum(int(np.any(b != IGNORE_INDEX, axis=1).sum()) for b in labels)
                 if fns.ctc_reduction == "mean" else 1)
        scales = ctc_scales(ctc_weight, sum(int((b != IGNORE_INDEX).sum()) for b in labels), count)
    for batch, key in micro_batches:
        if not isinstance(batch["labels"], jax.core.Tracer):  # host arrays: ids checked before they are gathered
            check_labels(batch["labels"], fns.vocab_size or np.iinfo(np.int32).max, need_tokens=False)
        if fns.mesh is not None:
            batch = pad_batch(batch, train_batch_rows(fns.mesh))
        extra = () if scales is None else (scales,)
        args = (state.params, place_batch(fns.mesh, batch), _replicated_key(fns.mesh, key), smoothing, *extra)
        if grads is None:  # the first micro-batch's labels are valid: the update compiles beside its gradient
            ahead = _APPLY_AHEAD.get(fns.apply)
            if ahead is None and fns.mesh is None and hasattr(fns.grad, "trace") and not any(
                    isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args)):
                ahead = compile_first_step(fns, state, *args)[1]
            elif ahead is None:
                ahead = compile_apply_ahead(fns, state)
        sums, micro_grads = fns.grad(*args)
        grads = micro_grads if grads is None else fns.add(grads, micro_grads)
        sums = jax.tree.map(np.asarray, sums)  # replicated on a mesh: every process reads it whole
        objective += float(sums.objective(label_smoothing, scales))
        tokens += int(sums.tokens)
    if grads is None:
        raise ValueError("train_step: no micro-batches")
    if ahead is not None:
        ahead.join()
    return fns.apply(state, grads, np.int32(tokens)), objective, tokens
