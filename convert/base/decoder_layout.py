"""Where a decoder family keeps the core's parameters: one declarative table, read by the key table and the models.

A family's `DecoderLayout` lists, for each slot of `convert.base.decoder_core.SLOTS` it uses, the module's PyTorch
key and Flax path (a layer's slots relative to the layer) and its kind (`Kind`: which module holds it in each
framework, and which parameters it has). From this one table come:

* the family's key table (`DecoderLayout.keymap`, the engine of `convert.base.keymap`),
* the parameter names of both models (`flax_model.decoder`, `torch_reference.decoder` build their module trees
  from it: HF's nested names, `name=str(i)` layer lists),
* which keys share storage when the head is tied (`DecoderLayout.tied_keys`), and the Flax paths of the slots the
  composer may create (`DecoderLayout.flax_patterns`).

The rows are in the order in which transformers' module registers them (the reference's `state_dict()` order, in
which the fixture scripts draw their random weights).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Iterable

from convert.base.decoder_core import SLOTS, DecoderCore
from convert.base.keymap import KeyMap, Rule, T


class Kind(enum.Enum):
    """What holds a slot's parameters in each framework (PyTorch module -> Flax module or parameters)."""

    EMBED = "embed"  # nn.Embedding weight [rows, D] -> nn.Embed embedding
    LINEAR = "linear"  # nn.Linear weight [out, in], bias -> nn.Dense kernel [in, out], bias
    CONV1D = "conv1d"  # GPT-2's Conv1D weight [in, out], bias -> kernel [out, in] (HF Flax's layout), bias
    LAYER_NORM = "layer_norm"  # nn.LayerNorm weight, bias -> nn.LayerNorm scale, bias
    RMS_NORM = "rms_norm"  # RMSNorm weight -> RMSNorm scale (`Slot.flax_names` may rename it)
    HEAD = "head"  # the vocabulary projection: nn.Linear weight [V, D] (the token embedding when tied) -> kernel [D, V]
    HEAD_WITH_BIAS = "head_with_bias"  # the same with a bias [V] of its own (tied: the logits bias)
    VECTOR = "vector"  # a parameter [V] of the module above it, the same in both frameworks
    ROW = "row"  # a buffer [1, V] in PyTorch -> a parameter [V] in Flax (BART's final_logits_bias)
    STACK = "stack"  # the layer list: `<torch>.<i>.` / `<flax>/<i>/` prefix the layer's slots


# (PyTorch parameter, Flax parameter, transform) of each kind; VECTOR and ROW name the parameter itself.
PARAMS: dict[Kind, tuple[tuple[str, str, T], ...]] = {
    Kind.EMBED: (("weight", "embedding", T.EMBED),),
    Kind.LINEAR: (("weight", "kernel", T.LINEAR), ("bias", "bias", T.IDENTITY)),
    Kind.CONV1D: (("weight", "kernel", T.LINEAR), ("bias", "bias", T.IDENTITY)),
    Kind.LAYER_NORM: (("weight", "scale", T.NORM), ("bias", "bias", T.IDENTITY)),
    Kind.RMS_NORM: (("weight", "scale", T.NORM),),
    Kind.HEAD: (("weight", "kernel", T.LINEAR),),
    Kind.HEAD_WITH_BIAS: (("weight", "kernel", T.LINEAR), ("bias", "bias", T.IDENTITY)),
    Kind.VECTOR: (("", "", T.IDENTITY),),
    Kind.ROW: (("", "", T.ROW),),
    Kind.STACK: (),
}
NORMS = (Kind.LAYER_NORM, Kind.RMS_NORM)


@dataclasses.dataclass(frozen=True)
class Slot:
    """One row: a core slot, its module's PyTorch key and Flax path, and its kind.

    Attributes:
        slot: a name of `convert.base.decoder_core.SLOTS`.
        torch: the dotted module path (VECTOR, ROW: the parameter's key); a layer's slots are relative to the layer.
        flax: the `/`-joined Flax path, likewise.
        kind: see `Kind`.
        flax_names: (PyTorch parameter, Flax parameter) renames, e.g. (("weight", "weight"),) for HF Flax's RMSNorm.
    """

    slot: str
    torch: str
    flax: str
    kind: Kind
    flax_names: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.slot not in SLOTS:
            raise ValueError(f"{self.slot!r} is not a decoder core slot")

    def params(self) -> tuple[tuple[str, str, T], ...]:
        """(PyTorch parameter, Flax parameter, transform) rows; empty names for VECTOR and ROW."""
        rename = dict(self.flax_names)
        return tuple((t, rename.get(t, f), tr) for t, f, tr in PARAMS[self.kind])

    def keys(self, torch_prefix: str = "", flax_prefix: str = "") -> tuple[Rule, ...]:
        """Key-table rows of this slot under the given prefixes."""
        return tuple(Rule(_join(torch_prefix + self.torch, t, "."), _join(flax_prefix + self.flax, f, "/"), tr)
                     for t, f, tr in self.params())


def _join(path: str, name: str, sep: str) -> str:
    return f"{path}{sep}{name}" if name else path


@dataclasses.dataclass(frozen=True)
class DecoderLayout:
    """A family's table: top-level slots (one of them the `layers` stack) and the slots of each layer.

    Attributes:
        name: the family (the key table's name).
        top: the model's slots outside the layers, the STACK slot among them, in registration order.
        layer: a layer's slots, relative to the layer, in registration order.
        base_model: the PyTorch path of the container transformers calls the base model (`bert`, `transformer`),
            which the reference makes callable: hidden states from ids (and optional position ids), as
            `torch_reference.decoder.CausalLM.hidden_states`; None if the family has none to call.
        head_module: the PyTorch path of a container holding the whole LM head (`cls`, RoBERTa's `lm_head`), which
            the reference makes callable: logits from hidden states.
    """

    name: str
    top: tuple[Slot, ...]
    layer: tuple[Slot, ...]
    base_model: str | None = None
    head_module: str | None = None

    def __post_init__(self) -> None:
        names = [s.slot for s in self.top + self.layer]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a slot is named twice")
        if [s.slot for s in self.top if s.kind is Kind.STACK] != ["layers"]:
            raise ValueError(f"{self.name}: the layout needs exactly one STACK slot, `layers`")
        if not {"self_attn.o", "self_attn_norm", "mlp.up", "mlp.down", "mlp_norm", "embed_tokens"} <= set(names):
            raise ValueError(f"{self.name}: a decoder needs embed_tokens, self_attn.o and its norm, mlp.up/down and "
                             "their norm")
        for attention in ("self_attn", "cross_attn"):
            forms = {p for p in ("q", "k", "v", "qkv", "kv") if f"{attention}.{p}" in names}
            if forms and forms not in ({"q", "k", "v"}, {"qkv"}, {"q", "kv"}):
                raise ValueError(f"{self.name}: {attention} projections {sorted(forms)}: use q, k, v or qkv or q, kv")

    @functools.cached_property
    def slots(self) -> dict[str, Slot]:
        return {s.slot: s for s in self.top + self.layer}

    @property
    def stack(self) -> Slot:
        return self.slots["layers"]

    def layer_prefixes(self) -> tuple[str, str]:
        """(`<torch stack>.{i}.`, `<flax stack>/{i}/`): the prefixes of a layer's slots in the key table."""
        return f"{self.stack.torch}.{{i}}.", f"{self.stack.flax}/{{i}}/"

    def keymap(self) -> KeyMap:
        """The family's key table: every parameter any configuration of it may have."""
        torch_prefix, flax_prefix = self.layer_prefixes()
        rules = [rule for s in self.top for rule in s.keys()]
        rules += [rule for s in self.layer for rule in s.keys(torch_prefix, flax_prefix)]
        return KeyMap(self.name, tuple(rules))

    def present(self, core: DecoderCore, slots: Iterable[Slot]) -> tuple[Slot, ...]:
        return tuple(s for s in slots if core.has(s.slot))

    def tied_keys(self, core: DecoderCore) -> dict[str, str]:
        """{PyTorch key: the key it shares storage with} of a tied head: the head's weight is the token embedding,
        its bias (if it has one) the logits bias."""
        if not core.tie_word_embeddings or "head" not in self.slots:
            return {}
        head = self.slots["head"]
        tied = {f"{head.torch}.weight": f"{self.slots['embed_tokens'].torch}.weight"}
        if head.kind is Kind.HEAD_WITH_BIAS:
            tied[f"{head.torch}.bias"] = self.slots["logits_bias"].torch
        return tied

    def _prefixes(self, slot: Slot) -> tuple[str, str]:
        return self.layer_prefixes() if slot in self.layer else ("", "")

    def module_patterns(self, slots: Iterable[str]) -> tuple[str, ...]:
        """Regexes (whole Flax paths) of everything below the named slots' modules (e.g. a group one trains alone,
        LoRA factors beside the kernels included)."""
        out = []
        for name in slots:
            slot = self.slots[name]
            path = self._prefixes(slot)[1] + slot.flax
            suffix = r"\Z" if slot.kind in (Kind.VECTOR, Kind.ROW) else "/.*"
            out.append(re.escape(path).replace(re.escape("{i}"), r"\d+") + suffix)
        return tuple(out)

    def in_out_weights(self) -> tuple[str, ...]:
        """Regexes (whole PyTorch keys) of the linear weights stored (in, out): the CONV1D slots' (PEFT's
        `fan_in_fan_out`)."""
        return tuple(re.escape(rule.torch).replace(re.escape("{i}"), r"\d+")
                     for slot in self.top + self.layer if slot.kind is Kind.CONV1D
                     for rule in slot.keys(*self._prefixes(slot)) if rule.torch.endswith(".weight"))

    def flax_patterns(self, slots: Iterable[str]) -> tuple[str, ...]:
        """Regexes (whole Flax paths, layer indices as `\\d+`) of the parameters of the named slots."""
        out = []
        for name in slots:
            slot = self.slots[name]
            for rule in slot.keys(*self._prefixes(slot)):
                out.append(re.escape(rule.flax).replace(re.escape("{i}"), r"\d+") + r"\Z")
        return tuple(out)


# The cross-attention of a decoder-only family: the composer creates these parameters (drawn with the decoder's
# init_scale, biases 0, norm scales 1) under these names, in every layer, when the source has none; the model saves
# them under them. They sit after the self-attention block, normalised as the layer's other blocks.
CROSS_ATTENTION_SLOTS = ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.kv", "cross_attn.o",
                         "cross_attn.q_norm", "cross_attn.k_norm", "cross_attn_norm", "cross_attn_post_norm")


def cross_attention_slots(norm: Kind = Kind.RMS_NORM, flax_names: tuple[tuple[str, str], ...] = (),
                          linear: Kind = Kind.LINEAR) -> tuple[Slot, ...]:
    """Default names for the cross-attention a decoder-only family is given when composed (llama-style names):
    `cross_attn.{q,k,v,o}_proj` and `cross_attn_layernorm`, relative to the layer (e.g.
    `model.layers.3.cross_attn.q_proj.weight`, Flax `model/layers/3/cross_attn/q_proj/kernel`).

    Args:
        norm: the kind of the block's norm (the family's other norms').
        flax_names: the norm's Flax parameter renames (HF Flax's RMSNorm calls its scale `weight`).
        linear: the projections' kind.
    """
    return (
        Slot("cross_attn.q", "cross_attn.q_proj", "cross_attn/q_proj", linear),
        Slot("cross_attn.k", "cross_attn.k_proj", "cross_attn/k_proj", linear),
        Slot("cross_attn.v", "cross_attn.v_proj", "cross_attn/v_proj", linear),
        Slot("cross_attn.o", "cross_attn.o_proj", "cross_attn/o_proj", linear),
        Slot("cross_attn_norm", "cross_attn_layernorm", "cross_attn_layernorm", norm, flax_names),
    )
