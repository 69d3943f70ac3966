"""The decoder core's features, each against a small independent computation (numpy, float64).

The families on the core today (BART, GPT-2, BERT, RoBERTa) do not use grouped-query attention, RMSNorm, rotary
positions, gated MLPs, QK-norm, soft-capping or sliding windows; these tests prove them on tiny llama-style and
gemma-style configurations built here (a config class, a layout), so that a family that needs them only declares
them. Each model's weights are drawn in the reference (PyTorch), carried to Flax through the layout's key table, and
both frameworks' logits are compared with a numpy forward pass written from transformers' definitions (repeated
key/value heads, `rotate_half`, RMSNorm in float32, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from convert.base.decoder_core import DecoderCore
from convert.base.decoder_layout import DecoderLayout, Kind, Slot, cross_attention_slots
from convert.base.keymap import plan_torch_to_flax
from convert.base.rope import RopeSettings
from flax_model.decoder import CausalLM as FlaxCausalLM
from flax_model.layers import layer_scan
from torch_reference.decoder import CausalLM as TorchCausalLM

TOL = 1e-5
V, D, N, K, H, FFN, LAYERS, T, B = 32, 16, 4, 2, 4, 24, 2, 7, 2
RMS = (("weight", "weight"),)  # HF Flax's RMSNorm names its scale `weight`


def _layout(name: str, cross: bool = False, qk_norm: bool = False, sandwich: bool = False) -> DecoderLayout:
    """A llama-style table (Gemma 2's norm names with `sandwich`)."""
    norms = ((Slot("self_attn_norm", "input_layernorm", "input_layernorm", Kind.RMS_NORM, RMS),
              Slot("self_attn_post_norm", "post_attention_layernorm", "post_attention_layernorm", Kind.RMS_NORM, RMS),
              Slot("mlp_norm", "pre_feedforward_layernorm", "pre_feedforward_layernorm", Kind.RMS_NORM, RMS),
              Slot("mlp_post_norm", "post_feedforward_layernorm", "post_feedforward_layernorm", Kind.RMS_NORM, RMS))
             if sandwich else
             (Slot("self_attn_norm", "input_layernorm", "input_layernorm", Kind.RMS_NORM, RMS),
              Slot("mlp_norm", "post_attention_layernorm", "post_attention_layernorm", Kind.RMS_NORM, RMS)))
    return DecoderLayout(name, top=(
        Slot("embed_tokens", "model.embed_tokens", "model/embed_tokens", Kind.EMBED),
        Slot("layers", "model.layers", "model/layers", Kind.STACK),
        Slot("final_norm", "model.norm", "model/norm", Kind.RMS_NORM, RMS),
        Slot("head", "lm_head", "lm_head", Kind.HEAD),
    ), layer=(
        *(Slot(f"self_attn.{p}", f"self_attn.{p}_proj", f"self_attn/{p}_proj", Kind.LINEAR) for p in "qkvo"),
        *((Slot("self_attn.q_norm", "self_attn.q_norm", "self_attn/q_norm", Kind.RMS_NORM, RMS),
           Slot("self_attn.k_norm", "self_attn.k_norm", "self_attn/k_norm", Kind.RMS_NORM, RMS)) if qk_norm else ()),
        *(cross_attention_slots(Kind.RMS_NORM, RMS) if cross else ()),
        *(Slot(f"mlp.{p}", f"mlp.{p}_proj", f"mlp/{p}_proj", Kind.LINEAR) for p in ("gate", "up", "down")),
        *norms,
    ))


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """A family of one: its `decoder_core()` is given. Hashable, as the models' configs must be."""

    LAYOUT: ClassVar[DecoderLayout] = _layout("tiny")
    core: DecoderCore

    def decoder_core(self) -> DecoderCore:
        return self.core


@dataclasses.dataclass(frozen=True)
class TinyCrossConfig(TinyConfig):
    LAYOUT: ClassVar[DecoderLayout] = _layout("tiny-cross", cross=True)


@dataclasses.dataclass(frozen=True)
class TinyQKConfig(TinyConfig):
    LAYOUT: ClassVar[DecoderLayout] = _layout("tiny-qk", qk_norm=True)


@dataclasses.dataclass(frozen=True)
class TinySandwichConfig(TinyConfig):
    LAYOUT: ClassVar[DecoderLayout] = _layout("tiny-sandwich", sandwich=True)


LLAMA = DecoderCore(
    vocab_size=V, hidden_size=D, num_layers=LAYERS, num_heads=N, num_kv_heads=K, head_dim=H, intermediate_size=FFN,
    positions="rotary", max_positions=64, norm="rms", norm_eps=1e-6, pre_norm=True, final_norm=True,
    score_scale=H**-0.5, qkv_bias=True, out_bias=False, mlp_bias=False, activation="silu", gated_mlp=True,
    tie_word_embeddings=False,
    rope=RopeSettings("llama3", 500000.0, factor=8.0, original_max_position_embeddings=8, low_freq_factor=1.0,
                      high_freq_factor=4.0))
GEMMA = dataclasses.replace(
    LLAMA, num_kv_heads=1, norm_offset=1.0, post_block_norm=True, embed_scale=math.sqrt(D), scale_inputs_embeds=True,
    score_scale=None, query_scale=None, score_divisor=None, qkv_bias=False, activation="gelu_pytorch_tanh",
    attn_logit_softcap=3.0, final_logit_softcap=5.0, sliding_window=3, sliding_layers=(True, False),
    tie_word_embeddings=True, rope=RopeSettings("default", 10000.0))
GEMMA = dataclasses.replace(GEMMA, query_scale=0.6)  # Gemma 2 scales the queries by query_pre_attn_scalar**-0.5


# ----------------------------------------------------------------------------------------------------------
# The independent computation


def _rms(x: np.ndarray, w: np.ndarray, core: DecoderCore) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + core.norm_eps) * (core.norm_offset + w)


def _act(name: str, x: np.ndarray) -> np.ndarray:
    if name == "silu":
        return x / (1 + np.exp(-x))
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # gelu_pytorch_tanh


def _rotate(x: np.ndarray, positions: np.ndarray, core: DecoderCore) -> np.ndarray:
    """transformers' apply_rotary_pos_emb on x [B, T, heads, H] at positions [B, T]."""
    inv_freq, factor = core.rope_frequencies()
    angles = positions[..., None].astype(np.float64) * inv_freq.astype(np.float64)  # [B, T, H/2]
    angles = np.concatenate([angles, angles], -1)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.cos(angles) * factor + rotated * np.sin(angles) * factor


def _attention(core: DecoderCore, q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """q [B, T, N, H], k/v [B, S, K, H] -> [B, T, N * H], key/value heads repeated (transformers' repeat_kv)."""
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k)
    if core.score_scale is not None:
        scores = scores * core.score_scale
    if core.attn_logit_softcap is not None:
        scores = np.tanh(scores / core.attn_logit_softcap) * core.attn_logit_softcap
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs, v).reshape(q.shape[0], q.shape[1], -1)


def numpy_logits(core: DecoderCore, w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray,
                 positions: np.ndarray | None = None, encoder: np.ndarray | None = None) -> np.ndarray:
    """The forward pass of a llama-style `core` with weights `w` (PyTorch keys) on ids [B, T] (mask [B, T])."""
    batch, length = ids.shape
    positions = np.broadcast_to(np.arange(length), (batch, length)) if positions is None else positions
    h = w["model.embed_tokens.weight"][ids]
    if core.embed_scale is not None:
        h = h * float(np.float32(core.embed_scale))
    t = np.arange(length)
    allowed = (t[None, :] <= t[:, None])[None, None] & mask.astype(bool)[:, None, None, :]  # [B, 1, T, T]
    window = allowed & (t[None, :] > t[:, None] - (core.sliding_window or 0))[None, None]
    linear = lambda x, name: x @ w[f"{name}.weight"].T + w.get(f"{name}.bias", 0.0)  # noqa: E731
    sandwich = "model.layers.0.pre_feedforward_layernorm.weight" in w
    for i in range(core.num_layers):
        p = f"model.layers.{i}."
        x = _rms(h, w[p + "input_layernorm.weight"], core)
        q = linear(x, p + "self_attn.q_proj")
        if core.query_scale is not None:
            q = q * core.query_scale
        q = q.reshape(batch, length, core.num_heads, -1)
        k = linear(x, p + "self_attn.k_proj").reshape(batch, length, core.kv_heads, -1)
        v = linear(x, p + "self_attn.v_proj").reshape(batch, length, core.kv_heads, -1)
        if core.qk_norm:
            q, k = _rms(q, w[p + "self_attn.q_norm.weight"], core), _rms(k, w[p + "self_attn.k_norm.weight"], core)
        q, k = _rotate(q, positions, core), _rotate(k, positions, core)
        out = linear(_attention(core, q, k, v, window if core.is_sliding(i) else allowed), p + "self_attn.o_proj")
        if sandwich:
            out = _rms(out, w[p + "post_attention_layernorm.weight"], core)
        h = h + out
        if encoder is not None:
            x = _rms(h, w[p + "cross_attn_layernorm.weight"], core)
            q = linear(x, p + "cross_attn.q_proj").reshape(batch, length, core.num_heads, -1)
            k = linear(encoder, p + "cross_attn.k_proj").reshape(batch, encoder.shape[1], core.num_heads, -1)
            v = linear(encoder, p + "cross_attn.v_proj").reshape(batch, encoder.shape[1], core.num_heads, -1)
            everything = np.ones((batch, 1, length, encoder.shape[1]), bool)
            h = h + linear(_attention(dataclasses.replace(core, attn_logit_softcap=None), q, k, v, everything),
                           p + "cross_attn.o_proj")
        x = _rms(h, w[p + ("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm") + ".weight"], core)
        out = linear(_act(core.activation, linear(x, p + "mlp.gate_proj")) * linear(x, p + "mlp.up_proj"),
                     p + "mlp.down_proj")
        if sandwich:
            out = _rms(out, w[p + "post_feedforward_layernorm.weight"], core)
        h = h + out
    h = _rms(h, w["model.norm.weight"], core)
    head = w["model.embed_tokens.weight"] if core.tie_word_embeddings else w["lm_head.weight"]
    logits = h @ head.T
    if core.final_logit_softcap is not None:
        logits = np.tanh(logits / core.final_logit_softcap) * core.final_logit_softcap
    return logits


# ----------------------------------------------------------------------------------------------------------
# Models with the same weights in both frameworks


@functools.cache
def models(config: Any, seed: int = 0) -> tuple[TorchCausalLM, dict, dict[str, np.ndarray]]:
    """(reference, Flax params through the layout's key table, the weights as float64 numpy by PyTorch key)."""
    model = TorchCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    offset = config.core.norm_offset
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if offset else 1.0) + 0.2 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if p.ndim == 1 or p.shape[0] == V else
                                                                     1 / math.sqrt(p.shape[1])))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    tied = config.LAYOUT.tied_keys(config.core)
    source = {k: v for k, v in state.items() if k not in tied}
    plan = plan_torch_to_flax(config.LAYOUT.keymap(), {k: v.shape for k, v in source.items()})
    flat = {e.target: e.transform.to_flax(source[e.source]) for e in plan.entries}
    return model, traverse_util.unflatten_dict(flat, sep="/"), {k: v.astype(np.float64) for k, v in state.items()}


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int32)
    mask[1, 5:] = 0
    return rng.integers(0, V, (B, T)).astype(np.int32), mask


@functools.cache
def _compiled(config: Any, method: str = "__call__") -> Any:
    # One compilation per model and call shape: far cheaper here than running the tiny models op by op.
    module = FlaxCausalLM(config)
    return jax.jit(lambda params, *args, **kwargs: module.apply({"params": params}, *args, method=method, **kwargs))


def flax_logits(config: Any, params: dict, *args: Any, **kwargs: Any) -> np.ndarray:
    return np.asarray(_compiled(config)(params, *args, **kwargs)[0])


def torch_logits(model: TorchCausalLM, *args: Any, **kwargs: Any) -> np.ndarray:
    with torch.no_grad():
        return model(*(None if a is None else torch.from_numpy(np.asarray(a)) for a in args),
                     **{k: None if v is None else torch.from_numpy(np.asarray(v)) for k, v in kwargs.items()})[0].numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    keep = np.broadcast_to(np.isfinite(b), np.shape(b))
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)[keep]))


# ----------------------------------------------------------------------------------------------------------
# Tests


CASES = {
    "llama: GQA, RMSNorm, llama3 RoPE, SwiGLU, q/k/v biases, untied": TinyConfig(LLAMA),
    "gemma2: MQA, 1+weight RMSNorm, sandwich norms, sqrt(D) embeddings, soft-caps, alternating sliding window, "
    "GeGLU, tied": TinySandwichConfig(GEMMA),
    "QK-norm, MHA": TinyQKConfig(dataclasses.replace(LLAMA, num_kv_heads=None, qk_norm=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_both_frameworks_equal_an_independent_numpy_forward(case):
    config = CASES[case]
    model, params, weights = models(config)
    ids, mask = batch()
    expected = numpy_logits(config.core, weights, ids, mask)
    for who, got in (("flax", flax_logits(config, params, ids, mask)), ("torch", torch_logits(model, ids, mask))):
        err = max_diff(got, expected)
        assert err <= TOL, f"{case}: {who} vs numpy max|diff|={err:.2e}"
    assert float(np.std(expected)) > 0.1, "degenerate logits"


def test_grouped_query_cache_is_sized_by_key_value_heads_and_equals_the_full_forward():
    """A cache of K = 2 key/value heads ([B, K, L, H] in Flax, [B, L, K, H] in the reference); a prefill of 5 tokens,
    then one at a time, gives the teacher-forced logits, with the sliding window of Gemma's first layer."""
    config = TinyConfig(dataclasses.replace(GEMMA, num_kv_heads=K, post_block_norm=False))
    model, params, _ = models(config)
    ids, mask = batch(1)
    module = FlaxCausalLM(config)
    cache = module.apply({"params": params}, B, T, method="init_cache")
    assert cache.layers[0].self_keys.shape == (B, K, T, H)
    t_cache = model.init_cache(B, T)
    assert t_cache.layers[0].key.shape == (B, T, K, H)
    flax_steps, torch_steps = [], []
    step = _compiled(config)
    for start, stop in ((0, 5), *((t, t + 1) for t in range(5, T))):
        logits, cache = step(params, ids[:, start:stop], mask, cache=cache)
        flax_steps.append(np.asarray(logits))
        with torch.no_grad():
            logits, t_cache = model(torch.from_numpy(ids[:, start:stop]), torch.from_numpy(mask), cache=t_cache)
        torch_steps.append(logits.numpy())
    full = flax_logits(config, params, ids, mask)
    for who, steps in (("flax", flax_steps), ("torch", torch_steps)):
        err = max_diff(np.concatenate(steps, axis=1), full)
        assert err <= TOL, f"{who}: cached vs full max|diff|={err:.2e}"


def test_inputs_embeds_hidden_states_and_position_ids():
    """`embed` then `inputs_embeds` is the ids' forward; `hidden_states` then `logits` is `__call__`; per-row
    `position_ids` (a left-padded row) rotate as numpy does."""
    config = TinySandwichConfig(GEMMA)  # the embedding scale applies to inputs_embeds too (Gemma)
    model, params, weights = models(config)
    ids, mask = batch(2)
    full = flax_logits(config, params, ids, mask)
    embeds = _compiled(config, "embed")(params, ids)
    err = max_diff(flax_logits(config, params, None, mask, inputs_embeds=embeds), full)
    assert err <= TOL, f"inputs_embeds: max|diff|={err:.2e}"
    hidden, _ = _compiled(config, "hidden_states")(params, ids, mask)
    err = max_diff(_compiled(config, "logits")(params, hidden), full)
    assert err <= TOL, f"hidden_states then logits: max|diff|={err:.2e}"
    with torch.no_grad():
        t_embeds = model.embed(torch.from_numpy(ids))
        assert max_diff(torch_logits(model, None, mask, inputs_embeds=t_embeds), torch_logits(model, ids, mask)) == 0
    positions = np.stack([np.arange(T), np.maximum(np.arange(T) - 2, 0)]).astype(np.int32)
    expected = numpy_logits(config.core, weights, ids, mask, positions)
    for who, got in (("flax", flax_logits(config, params, ids, mask, position_ids=positions)),
                     ("torch", torch_logits(model, ids, mask, position_ids=positions))):
        err = max_diff(got, expected)
        assert err <= TOL, f"{who}: position_ids vs numpy max|diff|={err:.2e}"


def test_cross_attention_added_to_a_decoder_only_family():
    """The cross-attention rows of `cross_attention_slots` (llama-style names) run over an encoder output as numpy
    does; without an encoder output the model is the decoder alone (its logits equal the same weights' without
    cross-attention), also through a cache made without one."""
    config = TinyCrossConfig(dataclasses.replace(LLAMA, cross_attention=True))
    model, params, weights = models(config)
    assert "model/layers/0/cross_attn/q_proj/kernel" in traverse_util.flatten_dict(params, sep="/")
    assert "model.layers.1.cross_attn_layernorm.weight" in model.state_dict()
    ids, mask = batch(3)
    encoder = np.random.default_rng(4).standard_normal((B, 5, D)).astype(np.float32)
    expected = numpy_logits(config.core, weights, ids, mask, encoder=encoder.astype(np.float64))
    for who, got in (("flax", flax_logits(config, params, ids, mask, encoder)),
                     ("torch", torch_logits(model, ids, mask, encoder))):
        err = max_diff(got, expected)
        assert err <= TOL, f"{who}: cross-attention vs numpy max|diff|={err:.2e}"
    alone = numpy_logits(config.core, weights, ids, mask)
    cache = FlaxCausalLM(config).apply({"params": params}, B, T, method="init_cache")
    cached, _ = _compiled(config)(params, ids, mask, cache=cache)
    for who, got in (("flax", flax_logits(config, params, ids, mask)), ("torch", torch_logits(model, ids, mask)),
                     ("flax cached", np.asarray(cached))):
        err = max_diff(got, alone)
        assert err <= TOL, f"{who}: decoder alone vs numpy max|diff|={err:.2e}"


def test_scanned_layers_choose_their_window_by_their_traced_index():
    """Under `nn.scan` the layer index is traced: the alternating sliding window still follows it."""
    config = TinySandwichConfig(GEMMA)
    _, params, weights = models(config)
    ids, mask = batch()
    flat = traverse_util.flatten_dict(params, sep="/")
    stacked = {}
    for path, value in flat.items():
        if path.startswith("model/layers/"):
            rest = path.split("/", 3)[3]
            stacked.setdefault(f"model/layers/{rest}", []).append((int(path.split("/")[2]), value))
        else:
            stacked[path] = value
    stacked = {k: np.stack([a for _, a in sorted(v)]) if isinstance(v, list) else v for k, v in stacked.items()}
    with layer_scan(True):
        got = jax.jit(FlaxCausalLM(config).apply)({"params": traverse_util.unflatten_dict(stacked, sep="/")}, ids,
                                                  mask)[0]
    err = max_diff(got, numpy_logits(config.core, weights, ids, mask))
    assert err <= TOL, f"scanned vs numpy max|diff|={err:.2e}"


def test_the_layout_names_both_frameworks_parameters():
    """The key table derived from the layout maps every reference key to a Flax leaf of the initialised model and
    back, and the reference registers its parameters in the layout's order."""
    config = TinySandwichConfig(GEMMA)
    model, params, _ = models(config)
    init = jax.eval_shape(lambda: FlaxCausalLM(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(init["params"], sep="/").items()}
    assert shapes == {k: v.shape for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    assert "model/layers/0/post_feedforward_layernorm/weight" in shapes  # the RMSNorm's renamed scale
    order = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in model.state_dict() if k.startswith("model.layers.0.")))
    assert order == [f"model.layers.0.{s.torch}" for s in config.LAYOUT.layer]
