"""`ArchSpec`: everything the toolkit knows about one architecture, declared once in `convert/base/archs/<name>.py`.

A spec holds the base-layer pieces themselves (config class, key table, source rules, tie and init rules) and
names the pieces that live in higher layers by import path: the Flax module (`flax_model.<name>`), the PyTorch
reference module (`torch_reference.<name>`) and the fixture builder (`scripts.fixtures_<name>`). Each of those
layers resolves its own names (`flax_model.registry`, `torch_reference.registry`), so the base never imports a
layer above it. `convert.base.registry` lists the specs; everything else (supported model types, built-in names,
test parametrisation) is derived from that list.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

from convert.base.configs import HFConfig
from convert.base.errors import ConvertError
from convert.base.keymap import KeyMap, SourceRules, T

Role = Literal["encoder", "decoder"]

# ----------------------------------------------------------------------------------------------------------
# Partitioning over a device mesh (MaxText's convention: batch over `data`, parameters over `fsdp`, optionally
# tensor parallelism over `model`). The base layer speaks plain tuples; `flax_model.sharding` turns them into
# `jax.sharding.PartitionSpec`s for a given mesh.

MESH_AXES = ("data", "fsdp", "model")
# What one dimension is split over: nothing (None), one mesh axis, or several (their product).
DimAxes: TypeAlias = str | tuple[str, ...] | None
# Mesh axes per dimension of a leaf in the Flax layout; dimensions past the end are not split.
MeshAxes: TypeAlias = tuple[DimAxes, ...]
# (regex matched against the whole `/`-joined Flax path, mesh axes per dimension).
PartitionRule: TypeAlias = tuple[str, MeshAxes]

# The default split of each kind of weight, in the Flax layout, derived from the key table's transforms:
# dense kernels over `fsdp` along their first dimension (a contiguous range of the Flax msgpack's bytes:
# the input side of [in, out] kernels) and over `model` along the second; convolution kernels [K, in, out]
# likewise along in and out; embeddings [V, D] over `fsdp` along D (vocabulary sizes are rarely a multiple
# of the device count) and over `model` along V; weight-norm v [C, C/groups, K] over `fsdp` along C. Norm
# scales, biases and other vectors are replicated. Where the mesh does not divide a dimension, that
# dimension is replicated (`flax_model.sharding.partition_spec`).
DEFAULT_AXES: dict[T, MeshAxes] = {
    T.LINEAR: ("fsdp", "model"),
    T.CONV: (None, "fsdp", "model"),
    T.EMBED: ("model", "fsdp"),
    T.WEIGHT_NORM: ("fsdp",),
    T.NORM: (),
    T.IDENTITY: (),
    T.ROW: (),
}


class ShardingError(ConvertError):
    """A partition rule or a device mesh that cannot place the parameters."""


def template_regex(flax_template: str) -> str:
    """The regex of a key-table Flax template: literal text, with `{i}`-style placeholders matching digits."""
    return r"\d+".join(re.escape(part) for part in re.split(r"\{[a-z]\}", flax_template))


def default_partition_rules(keymap: KeyMap) -> tuple[PartitionRule, ...]:
    """One rule per key-table row: its Flax path, split as `DEFAULT_AXES` says for the row's transform."""
    return tuple((template_regex(rule.flax), DEFAULT_AXES[rule.transform]) for rule in keymap.rules)


def prefixed_rules(rules: tuple[PartitionRule, ...], prefix: str) -> tuple[PartitionRule, ...]:
    """The same rules one level down (`encoder/`, `decoder/` in the composed model)."""
    return tuple((re.escape(prefix) + f"(?:{regex})", axes) for regex, axes in rules)


def check_partition_rules(rules: tuple[PartitionRule, ...], where: str) -> None:
    """Refuses a rule whose regex does not compile or whose axes are not mesh axes, each used at most once.

    Raises:
        ShardingError: naming `where` and the rule.
    """
    for rule in rules:
        if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)
                and isinstance(rule[1], tuple)):
            raise ShardingError(f"{where}: partition rule {rule!r} is not (regex, axes per dimension)")
        regex, axes = rule
        try:
            re.compile(regex)
        except re.error as e:
            raise ShardingError(f"{where}: partition rule {regex!r} is not a valid regex ({e})") from None
        names = [n for dim in axes for n in ((dim,) if isinstance(dim, str) else () if dim is None else dim)]
        bad = [n for n in names if n not in MESH_AXES]
        if bad or not all(dim is None or isinstance(dim, (str, tuple)) for dim in axes):
            raise ShardingError(f"{where}: partition rule {regex!r} names {bad or axes!r}, not mesh axes "
                                f"(one of {', '.join(MESH_AXES)} or None per dimension)")
        if len(set(names)) != len(names):
            raise ShardingError(f"{where}: partition rule {regex!r} uses a mesh axis twice ({axes!r})")


def no_tied_keys(config: Any) -> dict[str, str]:
    """For architectures whose parameters share no storage."""
    return {}


def unchanged_config(config: Any, checkpoint: Any) -> Any:
    """For architectures whose config needs no fix from the checkpoint's contents."""
    return config


def no_source_rules(config: Any) -> SourceRules:
    return SourceRules()


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """One architecture.

    Attributes:
        name: the file stem shared by `convert/base/archs/`, `flax_model/`, `torch_reference/` and
            `scripts/fixtures_<name>.py`.
        role: "encoder" (speech) or "decoder" (text).
        config_class: reads the architecture's `config.json`; its `MODEL_TYPES` are the model types served.
        keymap: canonical PyTorch keys <-> HF Flax paths, every parameter of the model.
        source_rules: config -> how raw checkpoint names (task heads, prefixes, old spellings) become
            canonical names, with every dropped key's reason.
        flax_source_rules: the same for sources that hold only `flax_model.msgpack`.
        tied_keys: config -> {canonical key: the key it shares storage with} (left out of files).
        adapt_config: (config, checkpoint) -> config with data-dependent fixes (e.g. a non-zero logits bias).
        initializable: regexes of Flax paths the composer may create when the source lacks them
            (e.g. GPT-2's cross-attention).
        layer_stack: (config field holding the number of identical layers, Flax path prefix of the stack).
        flax_class: "module:Class" of the Flax module (under `flax_model`).
        torch_class: "module:Class" of the reference module (under `torch_reference`); the module also has
            `from_pretrained(directory) -> (model, LoadReport)`.
        fixtures: the module under `scripts` whose `CASES` build tiny seeded checkpoints.
        hf_classes: the transformers classes whose checkpoints are read (for messages and documentation).
        partition_rules: (Flax path regex, mesh axes per dimension) rules that take precedence over the
            defaults derived from the key table (`DEFAULT_AXES`); most architectures need none. See
            `partitioning`.
        buffers: regexes (whole-key matches) of the canonical PyTorch keys that transformers keeps as buffers,
            not parameters (a logits bias, BatchNorm running statistics, a rotary `inv_freq`): stored and
            loaded like weights, never trained (`convert.base.composed.non_trainable_paths`).
        groups: (name, regexes of the architecture's Flax paths, whole-path matches) of the named parts one may
            train alone (`convert.finetune --train-only`), e.g. a decoder's ("cross-attention", ...); the composed
            model adds `encoder`, `decoder` and its projection (`convert.base.composed.train_groups`).
        fan_in_fan_out: regexes (whole-key matches) of the canonical PyTorch weights of linear layers stored
            (in, out) rather than nn.Linear's (out, in) (GPT-2's Conv1D; PEFT's `fan_in_fan_out`); their Flax
            kernels are (out, in). LoRA needs it to merge its update (`convert.base.lora`).
        init_rules: (regex over a Flax path of the architecture, initialiser "normal" | "zeros" | "ones") for the
            parameters the composer creates, tried before its generic rules (kernels normal, biases 0, `scale` 1):
            e.g. RMSNorm weights named `weight`, at 0 where the norm multiplies by `1 + weight` (Gemma).
        hf_cross_attention: for a decoder, whether transformers' class of the family has cross-attention (GPT-2's
            `add_cross_attention`, BART's `encoder_attn`). Without it, transformers' `SpeechEncoderDecoderModel`
            cannot run the composed model, and `convert.extract` leaves the cross-attention (the `initializable`
            paths) out of the decoder it writes, with the config's `as_causal_lm()`.
        causal_lm: a decoder that is a language model on its own (GPT-2, Llama, ...; not BART's or BERT's
            decoders): the prefix composition (`convert.compose --mode prefix`) accepts it.
        ctc_head: an encoder's CTC head module as a task checkpoint stores it (`...ForCTC`'s `lm_head`: keys
            `lm_head.weight`/`.bias`, Flax `lm_head/kernel`/`bias`), which compose keeps as the composed model's
            CTC head (`convert.base.ctc`); None when the architecture has none.
    """

    name: str
    role: Role
    config_class: type[HFConfig]
    keymap: KeyMap
    source_rules: Callable[[Any], SourceRules]
    flax_class: str
    torch_class: str
    fixtures: str
    layer_stack: tuple[str, str]
    flax_source_rules: Callable[[Any], SourceRules] = no_source_rules
    tied_keys: Callable[[Any], dict[str, str]] = no_tied_keys
    adapt_config: Callable[[Any, Any], Any] = unchanged_config
    initializable: tuple[str, ...] = ()
    hf_classes: tuple[str, ...] = ()
    partition_rules: tuple[PartitionRule, ...] = ()
    buffers: tuple[str, ...] = ()
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    fan_in_fan_out: tuple[str, ...] = ()
    init_rules: tuple[tuple[str, str], ...] = ()
    hf_cross_attention: bool = True
    causal_lm: bool = False
    ctc_head: str | None = None

    def __post_init__(self) -> None:
        check_partition_rules(self.partition_rules, f"{self.name}: partition_rules")
        for attr, package in (("flax_class", "flax_model."), ("torch_class", "torch_reference."),
                              ("fixtures", "scripts.")):
            value = getattr(self, attr)
            if not value.startswith(package):
                raise ValueError(f"{self.name}: {attr}={value!r} must name a module under {package[:-1]}")

    def stores_in_out(self, torch_key: str) -> bool:
        """Whether a canonical PyTorch linear weight of this architecture is stored (in, out) (see
        `fan_in_fan_out`)."""
        return any(re.fullmatch(pattern, torch_key) for pattern in self.fan_in_fan_out)

    def is_buffer(self, torch_key: str) -> bool:
        """Whether a canonical PyTorch key of this architecture is a buffer (see `buffers`)."""
        return any(re.fullmatch(pattern, torch_key) for pattern in self.buffers)

    def hf_class(self, model_type: str) -> str:
        """The transformers class whose state-dict keys are this architecture's canonical keys, for a config of
        `model_type`: the first of `hf_classes` named after it (`MBartForCausalLM` for an mBART config of the BART
        spec), else the first."""
        stem = model_type.replace("-", "").replace("_", "").lower()
        return next((c for c in self.hf_classes if c.lower().startswith(stem)), self.hf_classes[0])

    @property
    def model_types(self) -> tuple[str, ...]:
        return self.config_class.MODEL_TYPES

    def config(self, d: dict[str, Any], where: str = "config.json") -> HFConfig:
        """The typed config of a parsed `config.json`."""
        return self.config_class.from_hf_dict(d, where)

    def num_layers(self, config: Any) -> int:
        return int(getattr(config, self.layer_stack[0]))

    @property
    def partitioning(self) -> tuple[PartitionRule, ...]:
        """Every partition rule of the architecture, first match wins: its own `partition_rules`, then one
        derived from each key-table row (`default_partition_rules`)."""
        return self.partition_rules + default_partition_rules(self.keymap)
