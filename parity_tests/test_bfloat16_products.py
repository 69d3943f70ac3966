"""How bfloat16 products are computed: the form a command chooses from the device and the host CPU's flags
(`convert.host_cpu`), and the composed model's bfloat16 training gradient traced in each form
(`flax_model.layers.set_bfloat16_products`). Each product's numbers in both forms: test_bfloat16_matmul.py,
test_strided_conv.py, test_grouped_conv.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import host_cpu
from convert.base.errors import UsageError
from flax_model import layers
from parity_tests.jaxprs import equations
from scripts.make_fixtures import cases_by_arch

ZEN3 = frozenset("fpu sse2 avx avx2 fma f16c bmi2".split())  # an AVX2 CPU: no bfloat16 arithmetic
ZEN4 = ZEN3 | {"avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "amx_tile", "amx_bf16"}


def test_the_flags_common_to_every_processor_are_read_from_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu avx2\n\n")
    monkeypatch.setattr(host_cpu, "CPUINFO", str(cpuinfo))
    assert host_cpu.cpu_flags() == {"fpu", "avx2"}  # a flag one processor lacks is not the machine's
    assert host_cpu.has_bfloat16_arithmetic(machine="x86_64") is False
    assert host_cpu.cpuinfo_lines(("model name",)) == ["model name\t: Some CPU\n"]
    monkeypatch.setattr(host_cpu, "CPUINFO", str(tmp_path / "absent"))
    assert host_cpu.cpu_flags() is None and host_cpu.has_bfloat16_arithmetic(machine="x86_64") is None


@pytest.mark.parametrize(("flags", "machine", "form", "reason"), [
    (ZEN3, "x86_64", "upcast", "has no bfloat16 arithmetic: no amx_bf16 or avx512_bf16 flag"),
    (ZEN4, "x86_64", "native", "has bfloat16 arithmetic: avx512_bf16"),
    (SAPPHIRE_RAPIDS, "x86_64", "native", "has bfloat16 arithmetic: amx_bf16"),
    (frozenset({"fp", "asimd"}), "aarch64", "upcast", "no bf16 flag"),
    (frozenset({"fp", "asimd", "bf16"}), "aarch64", "native", "has bfloat16 arithmetic: bf16"),
    (frozenset({"fpu"}), "riscv64", "native", "not known"),
])
def test_auto_upcasts_only_on_a_cpu_known_to_lack_bfloat16_arithmetic(flags, machine, form, reason):
    chosen = host_cpu.bfloat16_products("auto", flags=flags, machine=machine)
    assert chosen.form == form and reason in chosen.reason, chosen


def test_an_accelerator_and_an_explicit_choice_are_not_decided_by_the_cpu():
    assert host_cpu.bfloat16_products("auto", platform_name="gpu", flags=ZEN3, machine="x86_64").form == "native"
    assert host_cpu.bfloat16_products("native", flags=ZEN3, machine="x86_64").form == "native"
    assert host_cpu.bfloat16_products("upcast", flags=ZEN4, machine="x86_64").form == "upcast"


def test_a_choice_of_form_that_is_not_one_is_refused():
    with pytest.raises(UsageError, match="bfloat16_products=fast: is not one of auto, native, upcast"):
        host_cpu.bfloat16_products("fast")
    with pytest.raises(ValueError, match="'fast' is neither"):
        layers.set_bfloat16_products("fast")
    assert layers.bfloat16_products() == layers.NATIVE


def test_the_composed_models_bfloat16_gradient_takes_float32_operands_when_upcast(composed_dir, bfloat16_form):
    """Every product of the training gradient that sums in float32 (the linear layers forward and backward, the
    feature encoder's convs as products, the LM head) takes bfloat16 operands in the native form and float32 ones
    when upcast; the attention's products, bfloat16 in both, are unchanged."""
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, SpeechEncoderDecoderModule
    from flax_model.training import loss_grad_function, step_key

    encoder, decoder = next(iter(cases_by_arch()["wav2vec2"])), next(iter(cases_by_arch()["bart"]))
    model = FlaxSpeechEncoderDecoderModel.from_pretrained(composed_dir(encoder, decoder))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.standard_normal((2, 4000)), jnp.float32),
             "attention_mask": jnp.ones((2, 4000), jnp.int32),
             "labels": jnp.asarray(rng.integers(0, model.config.decoder.vocab_size, (2, 6)), jnp.int32)}
    step = loss_grad_function(SpeechEncoderDecoderModule(model.config, dtype=jnp.bfloat16), deterministic=False,
                              freeze_feature_encoder=False)
    program = jax.make_jaxpr(step)(model.params, batch, step_key(0, 0), jnp.float32(0.0))
    dots = [e for e in equations(program) if e.primitive.name == "dot_general"]
    summed = [e for e in dots if e.params["preferred_element_type"] == jnp.float32]
    operands = {v.aval.dtype for e in summed for v in e.invars}
    expected = jnp.dtype(jnp.bfloat16 if bfloat16_form == "native" else jnp.float32)
    assert len(summed) >= 12 and operands == {expected}, (len(summed), operands)
    attention = [e for e in dots if e.params["preferred_element_type"] in (None, jnp.bfloat16)
                 and e.outvars[0].aval.dtype == jnp.bfloat16]
    assert attention and all(v.aval.dtype == jnp.bfloat16 for e in attention for v in e.invars)
