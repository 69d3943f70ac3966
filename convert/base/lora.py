"""LoRA (low-rank adaptation, Hu et al. 2021) in the base layer: which linear layers are adapted, their first
values, merging into the weights, and PEFT's adapter format (`adapter_config.json` + `adapter_model.safetensors`).

An adapted linear layer y = W x + b becomes y = W x + b + s · B A dropout(x), with A [r, in], B [out, r] and
s = alpha / r (PEFT's `lora_A.weight`, `lora_B.weight` and `scaling`). The layer's kernel stays frozen; A and B
train. In the Flax param tree they are two more leaves of the adapted module, `<module>/lora_A` [r, in] and
`<module>/lora_B` [out, r] (PEFT's layout in both frameworks), which the model's modules ignore and
`flax_model.lora` adds to the module's output. Layers are found by name on the key table: every 2-D kernel of the
chosen parts (`encoder`, `decoder`) whose PyTorch module name ends in one of the targets (PEFT's rule for a
list of names). Whether a weight is stored (in, out) in PyTorch (GPT-2's `Conv1D`; PEFT's `fan_in_fan_out`) is
the architecture's fact (`ArchSpec.fan_in_fan_out`); its Flax kernel is then (out, in), else (in, out).

Nothing here needs JAX or PyTorch: arrays are numpy (or anything with `.T`, `@` and `astype`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.errors import CheckpointError, UnsupportedConfig, bad_argument
from convert.base.keymap import KeyMap, T

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_LEAVES = ("lora_A", "lora_B")
# PEFT prefixes every key of a saved adapter with the wrapper's attribute path to the base model.
PEFT_PREFIX = "base_model.model."
PARTS = ("encoder", "decoder")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What LoRA adapts and how.

    Attributes:
        rank: r, the inner dimension of A and B.
        alpha: PEFT's `lora_alpha`; the update is scaled by alpha / r.
        dropout: PEFT's `lora_dropout`, on the adapted layer's input to A (train mode only).
        targets: PyTorch module names (the last component, e.g. `q_proj`, `c_attn`) of the linear layers adapted.
        parts: which parts of the model are adapted: "decoder", "encoder" or both.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    parts: tuple[str, ...] = ("decoder",)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def check(self) -> None:
        """Raises UsageError (API names) for values out of range."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise bad_argument("lora_rank", self.rank, "must be a positive integer")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise bad_argument("lora_alpha", self.alpha, "must be a positive number")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise bad_argument("lora_dropout", self.dropout, "must be in [0, 1)")
        if not self.targets or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t) for t in self.targets):
            raise bad_argument("lora_targets", ",".join(self.targets),
                               "must be module names separated by commas (e.g. q_proj,v_proj)")
        bad = [p for p in self.parts if p not in PARTS]
        if not self.parts or bad:
            raise bad_argument("lora_parts", ",".join(self.parts), f"must be among {', '.join(PARTS)}")


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One adapted linear layer.

    Attributes:
        module: the Flax path of the module (its kernel is `<module>/kernel`).
        torch_module: its PyTorch module name (its weight is `<torch_module>.weight`).
        in_features, out_features: the layer's input and output widths.
        fan_in_fan_out: the PyTorch weight is stored (in, out) (GPT-2's Conv1D); the Flax kernel is (out, in).
    """

    module: str
    torch_module: str
    in_features: int
    out_features: int
    fan_in_fan_out: bool = False

    @property
    def a_path(self) -> str:
        return f"{self.module}/lora_A"

    @property
    def b_path(self) -> str:
        return f"{self.module}/lora_B"

    @property
    def kernel_path(self) -> str:
        return f"{self.module}/kernel"

    def shapes(self, rank: int) -> dict[str, tuple[int, int]]:
        return {self.a_path: (rank, self.in_features), self.b_path: (self.out_features, rank)}


def is_lora_leaf(path: str) -> bool:
    """Whether a `/`-joined Flax path is a LoRA factor (`.../lora_A`, `.../lora_B`)."""
    return path.rsplit("/", 1)[-1] in LORA_LEAVES


def linear_modules(keymap: KeyMap, shapes: Mapping[str, tuple[int, ...]],
                   fan_in_fan_out: Callable[[str], bool]) -> list[LoraLayer]:
    """Every linear layer of a model: each 2-D `kernel` leaf of `shapes` that the key table maps to a PyTorch
    `.weight` with a linear layout. `fan_in_fan_out(torch_key)` says which PyTorch weights are stored (in, out)."""
    out = []
    for path, shape in sorted(shapes.items()):
        if not path.endswith("/kernel") or len(shape) != 2:
            continue
        mapped = keymap.to_torch(path)
        if mapped is None or mapped[1] is not T.LINEAR or not mapped[0].endswith(".weight"):
            continue
        key = mapped[0]
        stored_in_out = fan_in_fan_out(key)
        out_features, in_features = shape if stored_in_out else shape[::-1]
        out.append(LoraLayer(path[: -len("/kernel")], key[: -len(".weight")], in_features, out_features,
                             stored_in_out))
    return out


def find_lora_layers(keymap: KeyMap, shapes: Mapping[str, tuple[int, ...]], settings: LoraSettings,
                     fan_in_fan_out: Callable[[str], bool]) -> tuple[LoraLayer, ...]:
    """The linear layers `settings` adapts in a composed model (paths under `encoder/`, `decoder/`).

    Raises:
        UsageError: a target names no linear layer of the chosen parts (the message lists the names there are).
    """
    layers = [layer for layer in linear_modules(keymap, shapes, fan_in_fan_out)
              if layer.module.split("/", 1)[0] in settings.parts]
    names = {layer.torch_module.rsplit(".", 1)[-1] for layer in layers}
    unknown = [t for t in settings.targets if t not in names]
    if unknown:
        raise bad_argument("lora_targets", ",".join(settings.targets),
                           f"{', '.join(unknown)} names no linear layer of the {' and '.join(settings.parts)} "
                           f"(there are: {', '.join(sorted(names)) or 'none'})")
    return tuple(layer for layer in layers if layer.torch_module.rsplit(".", 1)[-1] in settings.targets)


def init_lora(layers: Iterable[LoraLayer], rank: int, seed: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """First values, as PEFT draws them: A from torch's `kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in),
    1/sqrt(in)); B zero (the adapted model starts as the base model). Seeded by (seed, path), like the
    composer's initialised leaves: the same seed gives the same bytes whatever the order."""
    out = {}
    for layer in layers:
        rng = np.random.default_rng([seed, zlib.crc32(layer.a_path.encode())])
        bound = 1.0 / math.sqrt(layer.in_features)
        out[layer.a_path] = rng.uniform(-bound, bound, (rank, layer.in_features)).astype(dtype)
        out[layer.b_path] = np.zeros((layer.out_features, rank), dtype)
    return out


def kernel_delta(layer: LoraLayer, a: Any, b: Any, scaling: float) -> Any:
    """s · B A in the layout of the layer's Flax kernel ((in, out), or (out, in) for fan-in-fan-out layers)."""
    delta = (b @ a) * scaling  # [out, in]: PyTorch nn.Linear's layout
    return delta if layer.fan_in_fan_out else delta.T


def merge_lora(flat: Mapping[str, Any], layers: Iterable[LoraLayer], scaling: float) -> dict[str, Any]:
    """A plain model's leaves: each adapted kernel plus s · B A (computed in float32, cast to the kernel's
    dtype), the LoRA leaves removed. `flat` maps `/`-joined Flax paths to arrays (numpy or JAX)."""
    out = {k: v for k, v in flat.items() if not is_lora_leaf(k)}
    for layer in layers:
        kernel = flat[layer.kernel_path]
        delta = kernel_delta(layer, flat[layer.a_path].astype(np.float32), flat[layer.b_path].astype(np.float32),
                             scaling)
        out[layer.kernel_path] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
    return out


def split_lora(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the base model's leaves, the LoRA leaves) of a flat param tree."""
    base = {k: v for k, v in flat.items() if not is_lora_leaf(k)}
    return base, {k: v for k, v in flat.items() if is_lora_leaf(k)}


# ----------------------------------------------------------------------------------------------------------
# PEFT's adapter format


def _relative(name: str, strip: str) -> str:
    if not name.startswith(strip):
        raise ValueError(f"{name}: not under {strip!r}")
    return name[len(strip):]


def peft_key(layer: LoraLayer, leaf: str, strip: str = "") -> str:
    """PEFT's saved name of a factor: `base_model.model.<module>.lora_A.weight` (the adapter name left out, as
    `PeftModel.save_pretrained` writes it). `strip` removes the part's prefix (`decoder.`) when the adapter is for
    that part alone."""
    return f"{PEFT_PREFIX}{_relative(layer.torch_module, strip)}.{leaf}.weight"


def target_modules(layers: Iterable[LoraLayer], candidates: Iterable[LoraLayer], strip: str = "") -> list[str] | str:
    """`target_modules` that selects exactly `layers` among `candidates` (every linear layer of the base model)
    under PEFT's rules: the list of short names when those pick exactly these layers (a module matches a name it
    ends with), else a regex that PEFT matches against whole module names."""
    chosen = sorted(_relative(layer.torch_module, strip) for layer in layers)
    names = sorted({c.rsplit(".", 1)[-1] for c in chosen})
    picked = sorted(_relative(c.torch_module, strip) for c in candidates
                    if c.torch_module.startswith(strip) and c.torch_module.rsplit(".", 1)[-1] in names)
    if picked == chosen:
        return names
    return "(" + "|".join(re.escape(c) for c in chosen) + ")"


def adapter_config(settings: LoraSettings, layers: Iterable[LoraLayer], candidates: Iterable[LoraLayer], *,
                   strip: str = "", base_model: str | None = None, task_type: str | None = None) -> dict[str, Any]:
    """The fields of PEFT's `LoraConfig` that this adapter sets (PEFT fills every other field with its default
    when it reads the file). `fan_in_fan_out` is true when the adapted layers are Conv1D-style (PEFT checks it per
    layer, and corrects it with a warning for a layer of the other kind)."""
    layers = list(layers)
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": alpha,
        "lora_dropout": settings.dropout,
        "target_modules": target_modules(layers, candidates, strip),
        "fan_in_fan_out": bool(layers) and all(layer.fan_in_fan_out for layer in layers),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_peft_adapter(directory: str | Path, settings: LoraSettings, layers: Iterable[LoraLayer],
                       leaves: Mapping[str, Any], candidates: Iterable[LoraLayer], *, strip: str = "",
                       base_model: str | None = None, task_type: str | None = None) -> list[Path]:
    """Writes `adapter_config.json` and `adapter_model.safetensors` (PEFT's names, PyTorch layouts: A [r, in],
    B [out, r]) into an existing directory; `leaves` maps the LoRA leaves' Flax paths to arrays.

    Returns:
        The files written.
    """
    from convert.base.writing import write_safetensors

    directory = Path(directory)
    layers = list(layers)
    tensors = {peft_key(layer, leaf, strip): np.asarray(leaves[path])
               for layer in layers for leaf, path in (("lora_A", layer.a_path), ("lora_B", layer.b_path))}
    write_safetensors(directory / ADAPTER_WEIGHTS, tensors)
    config = adapter_config(settings, layers, candidates, strip=strip, base_model=base_model, task_type=task_type)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return [directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS]


def write_part_adapters(directory: str | Path, settings: LoraSettings, layers: Iterable[LoraLayer],
                        leaves: Mapping[str, Any], candidates: Iterable[LoraLayer]) -> list[Path]:
    """For a model whose parts are models of their own (the prefix composition): one PEFT adapter per adapted part,
    in `directory/<part>/`, with the part's own module names (`decoder.` or `encoder.` left out), for
    `PeftModel.from_pretrained(<the part's transformers model>, directory/<part>)`."""
    layers, candidates, files = list(layers), list(candidates), []
    for part in settings.parts:
        target = Path(directory) / part
        target.mkdir(parents=True)
        mine = lambda items: [layer for layer in items if layer.module.startswith(f"{part}/")]  # noqa: E731
        files += write_peft_adapter(target, settings, mine(layers), leaves, mine(candidates), strip=f"{part}.")
    return files


# Fields of an adapter config this toolkit reads, with the values it can honour (anything else is refused).
_REFUSED_UNLESS = {"use_rslora": (False, None), "use_dora": (False, None), "bias": ("none", None),
                   "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "modules_to_save": (None, []),
                   "layers_to_transform": (None,), "lora_bias": (False, None)}


def read_peft_adapter(directory: str | Path, layers: Iterable[LoraLayer], *, strip: str = ""
                      ) -> tuple[LoraSettings, dict[str, np.ndarray]]:
    """Reads a PEFT LoRA adapter for a model whose linear layers are `layers` (every candidate): the settings and
    the LoRA leaves by Flax path.

    Raises:
        CheckpointError: a file is missing or unreadable, or a tensor does not fit its layer.
        UnsupportedConfig: the adapter uses a PEFT feature this toolkit does not implement (named).
    """
    from convert.base.checkpoint.safetensors_reader import SafetensorsFile

    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: cannot read the adapter config ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UnsupportedConfig(f"{config_path}: peft_type={config.get('peft_type')!r}: only LORA adapters are read")
    for field, allowed in _REFUSED_UNLESS.items():
        if field in config and config[field] not in allowed:
            raise UnsupportedConfig(f"{config_path}: {field}={config[field]!r} is not supported")
    weights = SafetensorsFile(directory / ADAPTER_WEIGHTS) if (directory / ADAPTER_WEIGHTS).is_file() else None
    if weights is None:
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS}: missing")
    by_key = {peft_key(layer, leaf, strip): (layer, leaf) for layer in layers
              if layer.torch_module.startswith(strip) for leaf in LORA_LEAVES}
    unknown = sorted(set(weights.entries) - set(by_key))
    if unknown:
        raise CheckpointError(f"{weights.path}: {unknown[0]} is not a LoRA factor of a linear layer of this model")
    rank = int(config.get("r", 8))
    leaves: dict[str, np.ndarray] = {}
    found: list[LoraLayer] = []
    for key in sorted(weights.entries):
        layer, leaf = by_key[key]
        expected = layer.shapes(rank)[layer.a_path if leaf == "lora_A" else layer.b_path]
        if weights.entries[key].shape != expected:
            raise CheckpointError(f"{weights.path}: {key} has shape {list(weights.entries[key].shape)}, expected "
                                  f"{list(expected)} (r={rank})")
        leaves[layer.a_path if leaf == "lora_A" else layer.b_path] = weights.read(key)
        if leaf == "lora_A":
            found.append(layer)
    for layer in found:
        if layer.b_path not in leaves:
            raise CheckpointError(f"{weights.path}: {peft_key(layer, 'lora_B', strip)} is missing")
    parts = sorted({layer.module.split("/", 1)[0] for layer in found} & set(PARTS)) or ["decoder"]
    settings = LoraSettings(rank=rank, alpha=float(config.get("lora_alpha", 8)),
                            dropout=float(config.get("lora_dropout", 0.0)),
                            targets=tuple(sorted({layer.torch_module.rsplit(".", 1)[-1] for layer in found})),
                            parts=tuple(parts))
    return settings, leaves
