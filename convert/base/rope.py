"""Rotary position embeddings (RoPE): a config's rotary settings, read as transformers 5 reads them, and the
inverse frequencies they give, computed once in numpy (float32, as transformers computes them).

transformers 5 keeps a decoder's rotary settings in `rope_parameters` (`rope_type`, `rope_theta`, and the type's own
fields); configs written before it hold `rope_scaling` (the type's fields, its type under `rope_type` or `type`) and a
top-level `rope_theta`, and `rope_scaling` wins when both are given (`convert_rope_params_to_dict` in
`modeling_rope_utils.py`). The types implemented here are transformers' `default`, `linear`, `llama3` and `yarn`;
the others (`dynamic`, `longrope`, ...) are refused by name. The models make cos/sin of `positions x inv_freq`
(the halves repeated, times `attention_scaling`) themselves; no model recomputes the frequencies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from convert.base.errors import UnsupportedConfig

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DEFAULT_THETA = 10_000.0  # transformers' `RotaryEmbeddingConfigMixin.default_theta`
# The fields each type reads besides `rope_type` / `type` and `rope_theta` (transformers' validators' key lists).
_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
}
_REQUIRED = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


@dataclasses.dataclass(frozen=True)
class RopeSettings:
    """What the inverse frequencies depend on, resolved as transformers resolves it (defaults filled in)."""

    rope_type: str = "default"
    theta: float = DEFAULT_THETA
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


def rope_settings(rope_parameters: Any, rope_scaling: Any, rope_theta: Any, partial_rotary_factor: Any,
                  max_position_embeddings: int, where: str) -> RopeSettings:
    """The rotary settings of a config's fields (each as found in config.json, or None when absent).

    Raises:
        UnsupportedConfig: `where: <field>=<value> ...`, naming the config field (`rope_scaling.rope_type`, ...).
    """
    field = "rope_scaling" if rope_scaling else "rope_parameters"
    params = rope_scaling or rope_parameters or {}
    if not isinstance(params, Mapping):
        raise UnsupportedConfig(f"{where}: {field}={params!r} is not a JSON object or null")
    if any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedConfig(f"{where}: {field} holds one setting per layer type ({', '.join(params)}), which is "
                                "not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedConfig(f"{where}: {field}.rope_type={rope_type!r} is not supported (supported: "
                                f"{', '.join(ROPE_TYPES)})")
    theta = params.get("rope_theta", rope_theta if rope_theta is not None else DEFAULT_THETA)
    _number(theta, f"{field}.rope_theta" if "rope_theta" in params else "rope_theta", where, positive=True)
    partial = params.get("partial_rotary_factor", partial_rotary_factor)
    if partial is not None and partial != 1.0:
        name = f"{field}.partial_rotary_factor" if "partial_rotary_factor" in params else "partial_rotary_factor"
        raise UnsupportedConfig(f"{where}: {name}={partial!r} is not supported (rotary positions on the whole head "
                                "only)")
    values: dict[str, Any] = {}
    for name in _FIELDS[rope_type]:
        value = params.get(name)
        if value is None and name in _REQUIRED.get(rope_type, ()):
            raise UnsupportedConfig(f"{where}: {field}.{name} is missing (rope_type={rope_type!r} needs it)")
        if value is None:
            continue
        if name == "truncate":
            if not isinstance(value, bool):
                raise UnsupportedConfig(f"{where}: {field}.truncate={value!r} is not a boolean")
        elif name == "original_max_position_embeddings":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UnsupportedConfig(f"{where}: {field}.{name}={value!r} is not a positive integer")
        else:
            _number(value, f"{field}.{name}", where, positive=True)
        values[name] = value
    if rope_type in ("llama3", "yarn"):
        # transformers' standardize_rope_params: the pretraining length defaults to max_position_embeddings.
        values.setdefault("original_max_position_embeddings", max_position_embeddings)
    if rope_type == "llama3" and values["high_freq_factor"] <= values["low_freq_factor"]:
        raise UnsupportedConfig(f"{where}: {field}.high_freq_factor={values['high_freq_factor']!r} must exceed "
                                f"low_freq_factor={values['low_freq_factor']!r}")
    if rope_type == "yarn" and values.get("factor") is None:
        # transformers' yarn: no factor means the ratio of the context lengths.
        values["factor"] = max_position_embeddings / values["original_max_position_embeddings"]
    return RopeSettings(rope_type=rope_type, theta=float(theta), **values)


def _number(value: Any, name: str, where: str, positive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise UnsupportedConfig(f"{where}: {name}={value!r} is not a {'positive ' if positive else ''}number")


def inverse_frequencies(settings: RopeSettings, head_dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim // 2] float32, attention_scaling): transformers' `ROPE_INIT_FUNCTIONS` for the type.

    The arithmetic is float32 where transformers' is (its torch tensors), so the values agree to float32 rounding.
    """
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)  # [dim / 2]
    base = np.float32(settings.theta) ** exponents
    inv_freq = np.float32(1.0) / base
    kind = settings.rope_type
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(settings.factor)).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, settings), 1.0
    return _yarn(base, settings, dim)


def _llama3(inv_freq: np.ndarray, s: RopeSettings) -> np.ndarray:
    """Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = np.float32(s.factor), s.low_freq_factor, s.high_freq_factor
    old_context = s.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    blended = ((np.float32(1) - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def _yarn(base: np.ndarray, s: RopeSettings, dim: int) -> tuple[np.ndarray, float]:
    """YaRN: interpolated frequencies below a band, extrapolated above, a linear ramp between; and the factor
    that scales cos/sin (0.1 ln(factor) + 1 unless the config sets it)."""
    factor = s.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.attention_factor
    if attention is None:
        attention = (float(mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)) if s.mscale and s.mscale_all_dim
                     else mscale(factor))
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1
    original = s.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(s.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (np.float32(1) - ramp).astype(np.float32)  # 1 where the frequency is kept as trained
    interpolated = np.float32(1) / (np.float32(factor) * base)
    extrapolated = np.float32(1) / base
    inv_freq = interpolated * (np.float32(1) - extrapolation) + extrapolated * extrapolation
    return inv_freq.astype(np.float32), float(attention)
