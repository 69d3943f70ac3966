"""The fast verification's pieces against the plain ways they replace: the tiled bit comparison, the reference
built on views of the safetensors pages, the forward compiled from shapes alone, and the background comparison
inside `verify_directory`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from convert import verify
from convert.base.errors import CheckpointError

PAIR = ("w2v_group_adapter", "bart_cg")  # a tied LM head, an adapter, a weight-normed positional conv


def test_tiled_bit_comparison_finds_one_flipped_bit_in_a_transposed_kernel():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((700, 300)).astype(np.float32)  # Flax [in, out]: several tiles, partial edges
    weight = np.ascontiguousarray(kernel.T)  # PyTorch [out, in]
    assert kernel.T.flags.c_contiguous is False and verify._same_bits(kernel.T, weight)
    flipped = weight.copy()
    flipped.view(np.uint32)[299, 699] ^= 1  # the last bit of the last element (a partial tile)
    assert not verify._same_bits(kernel.T, flipped)
    # Equal as numbers, different as bits: signed zeros, NaNs with different payloads.
    for a, b in ((0.0, -0.0), (np.uint32(0x7FC00000).view(np.float32), np.uint32(0x7FC00001).view(np.float32))):
        k, w = kernel.copy(), weight.copy()
        k[512, 150], w[150, 512] = a, b
        assert not verify._same_bits(k.T, w), (a, b)
        w[150, 512] = a
        assert verify._same_bits(k.T, w), (a, b)
    # Through PyTorch's transposing copy into a reused buffer (how the verification compares): the same answers.
    scratch = verify._Scratch()
    assert verify._same_bits(kernel.T, weight, scratch) and not verify._same_bits(kernel.T, flipped, scratch)
    k, w = kernel.copy(), weight.copy()
    k[512, 150], w[150, 512] = 0.0, -0.0
    assert not verify._same_bits(k.T, w, scratch)
    # A 3-D transposed view (conv kernels) larger than one block of rows.
    conv = rng.standard_normal((3, 512, 1024)).astype(np.float32)  # Flax [K, in, out]
    torch_conv = np.ascontiguousarray(conv.transpose(2, 1, 0))
    assert verify._same_bits(conv.transpose(2, 1, 0), torch_conv)
    torch_conv.view(np.uint32)[1023, 511, 2] ^= 1 << 31
    assert not verify._same_bits(conv.transpose(2, 1, 0), torch_conv)
    assert not verify._same_bits(conv.transpose(2, 1, 0), torch_conv, scratch)


def test_reference_on_mapped_pages_equals_the_ordinary_load(composed_dir):
    directory = composed_dir(*PAIR)
    mapped, plain = verify.load_torch_mapped(directory), verify.load_torch(directory)
    a, b = mapped.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
    assert not mapped.training
    batch = verify.seeded_inputs(mapped.config, seed=3)
    diff = float(np.max(np.abs(verify.torch_logits(mapped, batch) - verify.torch_logits(plain, batch))))
    assert diff == 0.0, f"max|diff|={diff:.2e}"


def test_reference_on_mapped_pages_refuses_a_missing_tensor_in_one_line(composed_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(composed_dir(*PAIR), bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["decoder.model.decoder.layers.0.fc1.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as raised:
        verify.load_torch_mapped(bad)
    message = str(raised.value)
    assert "\n" not in message and "missing decoder.model.decoder.layers.0.fc1.weight" in message, message


def test_forward_compiled_from_shapes_equals_the_models_own_call(composed_dir):
    directory = composed_dir(*PAIR)
    model = verify.load_flax(directory, prefer=verify.FLAX_FILES)
    batch = verify.seeded_inputs(model.config, seed=1, seconds=verify.VERIFY_SECONDS)
    compiled = verify.compile_forward(model.config, batch)
    own = verify.flax_logits(model, batch)
    diff = float(np.max(np.abs(verify.forward_logits(compiled, model, batch) - own)))
    assert diff <= 1e-5, f"max|diff|={diff:.2e}"
    # Parameters that are not the float32 tree compiled for: the model's own call, not a wrong answer.
    model.params = {"encoder": model.params["encoder"]}
    with pytest.raises(Exception):  # noqa: B017 - the model's own call refuses the incomplete tree
        verify.forward_logits(compiled, model, batch)


def test_verification_names_a_tensor_the_weight_files_disagree_on(composed_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(composed_dir(*PAIR), bad)
    tensors = load_file(bad / "model.safetensors")
    key = "encoder.encoder.layers.0.feed_forward.intermediate_dense.weight"
    tensors[key] = tensors[key] + np.float32(0.25)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    result = verify.verify_directory(bad)
    assert not result["passed"] and not result["weight_files_identical"], result
    assert result["differing_tensors"] == [key], result["differing_tensors"]


def test_bfloat16_files_give_the_same_reference_and_flax_weights_uncopied(composed_dir):
    """A bfloat16 file: the reference keeps its weights mapped in bfloat16 and upcasts them module by module;
    its float32 and float64 logits equal those of the ordinary float32 load exactly (the upcast is exact)."""
    directory = composed_dir(*PAIR, dtype="bfloat16")
    mapped, plain = verify.load_torch_mapped(directory, keep_dtype=True), verify.load_torch(directory)
    assert {t.dtype for t in mapped.parameters()} == {torch.bfloat16}
    batch = verify.seeded_inputs(plain.config, seed=2)
    for name, a, b in zip(("float32", "float64"), verify.reference_logits(mapped, batch),
                          verify.reference_logits(plain, batch)):
        diff = float(np.max(np.abs(a - b)))
        assert a.dtype == b.dtype and diff == 0.0, f"{name}: max|diff|={diff:.2e}"
    assert {t.dtype for t in mapped.parameters()} == {torch.bfloat16}, "the weights were not put back"
    # Flax: read from the memory map straight into float32, the same bits as the ordinary load's cast.
    from flax import traverse_util

    read = traverse_util.flatten_dict(verify.load_flax(directory, prefer=verify.FLAX_FILES).params, sep="/")
    ordinary = traverse_util.flatten_dict(verify.load_flax(directory).params, sep="/")
    assert read.keys() == ordinary.keys()
    differ = [k for k in read if read[k].dtype != np.float32 or not np.array_equal(
        np.asarray(read[k]).view(np.uint32), np.asarray(ordinary[k]).view(np.uint32))]
    assert not differ, differ[:5]


def test_reference_on_mapped_pages_takes_a_tied_copy_kept_in_the_file(composed_dir, tmp_path):
    """Some writers keep the tied LM head in the file: ignored, as the ordinary load does (the tie gives it)."""
    from convert.base.composed import composed_tied_keys

    kept = tmp_path / "kept"
    shutil.copytree(composed_dir(*PAIR), kept)
    tensors = load_file(kept / "model.safetensors")
    plain = verify.load_torch(kept)
    tied = composed_tied_keys(plain.config)
    assert tied, "the pair should have a tied LM head"
    for key, source in tied.items():
        tensors[key] = tensors[source].copy()
    save_file(tensors, kept / "model.safetensors", metadata={"format": "pt"})
    mapped = verify.load_torch_mapped(kept)
    for key, source in tied.items():
        assert torch.equal(mapped.state_dict()[key], plain.state_dict()[source]), key
