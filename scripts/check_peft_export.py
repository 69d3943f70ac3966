"""Proof that the toolkit's PEFT export is PEFT's format: `peft.PeftModel.from_pretrained(base, adapter)` loads it
and gives the logits of the toolkit's own LoRA model and of its merged export.

Run it in the goldens environment (transformers and peft are never dependencies of the package or its tests):

    PYTHONPATH=$PWD /work/tfenv/bin/python scripts/check_peft_export.py [--keep DIR]

For each case of the cross-attention mode (a composed fixture pair and the layers adapted: both weight layouts,
GPT-2's Conv1D stored (in, out) and nn.Linear (out, in), encoder and decoder), the script

1. composes the pair (`convert.compose`), adds LoRA factors (A as PEFT draws it, B random so that the update
   is not zero) and computes the Flax model's logits on a seeded padded batch;
2. writes the factors as a PEFT adapter (`convert.base.lora.write_peft_adapter`) and the merged model
   (`merge_lora` then `save_pretrained`), as `convert.finetune --lora-export adapter|merged` does;
3. loads, with transformers and peft, `SpeechEncoderDecoderModel.from_pretrained(base)` wrapped by
   `PeftModel.from_pretrained(base, adapter)`, and `SpeechEncoderDecoderModel.from_pretrained(merged)`, and
   compares: PEFT's logits vs the Flax LoRA model's, transformers' merged logits vs PEFT's, and PEFT's own
   `merge_and_unload()` weights vs the toolkit's merged file.

Then the prefix mode (`run_prefix_case`): one adapter per part (the LM's `...ForCausalLM` names, the encoder's
`...Model` names), each loaded by PEFT into transformers' own part, the whole prefix computed as
`scripts/make_prefix_goldens.py` computes it, against the Flax prefix model with LoRA and the merged export.

It prints one line per case with the figures and exits 1 if any exceeds its bound (logits 1e-5 absolute,
merged weights 1e-6), or if PEFT injected fewer layers than were adapted.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

LOGITS_BOUND = 1e-5
WEIGHT_BOUND = 1e-6
# (encoder fixture, decoder fixture, LoRA targets, parts)
CASES = {
    "w2v_stable_wide+gpt2_untied": ("w2v_stable_wide", "gpt2_untied", ("c_attn", "q_proj"), ("decoder", "encoder")),
    "w2v_stable_wide+bart_cg": ("w2v_stable_wide", "bart_cg", ("q_proj", "v_proj", "fc1"), ("decoder",)),
}


def nonzero_factors(layers, rank: int) -> dict[str, np.ndarray]:
    """A as PEFT draws it, B random (PEFT starts B at zero: the update would be zero and prove nothing)."""
    from convert.base.lora import init_lora

    factors = init_lora(layers, rank, seed=0)
    rng = np.random.default_rng(0)
    for layer in layers:
        factors[layer.b_path] = (0.2 * rng.standard_normal(factors[layer.b_path].shape)).astype(np.float32)
    return factors


def with_lora(base, shapes, settings):
    """(the model with LoRA factors added, its flat params without them, every linear layer, the adapted ones,
    the factors) for a loaded model of either composition."""
    import jax.numpy as jnp
    from flax import traverse_util

    from convert.base.composed import keymap_for, stores_in_out
    from convert.base.lora import find_lora_layers, linear_modules

    keymap = keymap_for(base.config)
    candidates = linear_modules(keymap, shapes, stores_in_out(base.config))
    layers = find_lora_layers(keymap, shapes, settings, stores_in_out(base.config))
    factors = nonzero_factors(layers, settings.rank)
    flat = traverse_util.flatten_dict(base.params, sep="/")
    adapted = type(base)(base.config, traverse_util.unflatten_dict(
        {**flat, **{k: jnp.asarray(v) for k, v in factors.items()}}, sep="/"), lora=settings)
    return adapted, flat, candidates, layers, factors


def run_case(name: str, root: Path) -> dict:
    import peft
    import torch
    import transformers
    from flax import traverse_util

    from convert.base.lora import LoraSettings, merge_lora, write_peft_adapter
    from convert.compose import compose
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, param_shapes
    from scripts import make_fixtures

    encoder, decoder, targets, parts = CASES[name]
    base_dir = root / name / "base"
    compose(str(make_fixtures.build(encoder, root / "fixtures")), str(make_fixtures.build(decoder, root / "fixtures")),
            base_dir, verify=False, progress=False, log=io.StringIO())
    base = FlaxSpeechEncoderDecoderModel.from_pretrained(base_dir)
    config = base.config
    settings = LoraSettings(rank=4, alpha=8.0, dropout=0.1, targets=targets, parts=parts)
    adapted, flat, candidates, layers, factors = with_lora(base, param_shapes(config), settings)

    rng = np.random.default_rng(1)
    n = max(1600, 4 * config.encoder.min_input_length)
    inputs = rng.standard_normal((2, n)).astype(np.float32)
    mask = np.ones((2, n), np.int64)
    mask[1, n * 3 // 4:] = 0
    inputs[1, n * 3 // 4:] = 0
    ids = rng.integers(0, config.decoder.vocab_size, (2, 7))
    flax_logits = np.asarray(adapted(inputs, mask, ids).logits)

    adapter_dir, merged_dir = root / name / "adapter", root / name / "merged"
    adapter_dir.mkdir(parents=True)
    write_peft_adapter(adapter_dir, settings, layers, factors, candidates)
    merged = merge_lora({**flat, **factors}, layers, settings.scaling)
    FlaxSpeechEncoderDecoderModel(config, traverse_util.unflatten_dict(merged, sep="/")).save_pretrained(merged_dir)

    # use_cache=False: transformers 5's BART cache needs a config the composed model does not carry (see
    # make_goldens.py); the logits are the same.
    torch_inputs = dict(inputs=torch.from_numpy(inputs), attention_mask=torch.from_numpy(mask),
                        decoder_input_ids=torch.from_numpy(ids), use_cache=False)
    hf_base = transformers.SpeechEncoderDecoderModel.from_pretrained(base_dir).eval()
    with torch.no_grad():
        base_logits = hf_base(**torch_inputs).logits.numpy()  # before PEFT injects its layers into hf_base
    wrapped = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    injected = [n for n, _ in wrapped.named_modules() if n.endswith(".lora_A.default")]
    with torch.no_grad():
        peft_logits = wrapped(**torch_inputs).logits.numpy()
    hf_merged = transformers.SpeechEncoderDecoderModel.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        merged_logits = hf_merged(**torch_inputs).logits.numpy()
        unloaded = {k: v.numpy() for k, v in wrapped.merge_and_unload().state_dict().items()}
    ours = {k: v.numpy() for k, v in hf_merged.state_dict().items()}
    weight_err = max(float(np.abs(unloaded[k] - ours[k]).max()) for k in ours)
    result = {
        "case": name,
        "adapted_layers": len(layers),
        "peft_injected_layers": len(injected),
        "fan_in_fan_out": json.loads((adapter_dir / "adapter_config.json").read_text())["fan_in_fan_out"],
        "peft_vs_flax_lora": float(np.abs(peft_logits - flax_logits).max()),
        "transformers_merged_vs_peft": float(np.abs(merged_logits - peft_logits).max()),
        "peft_merge_vs_our_merged_weights": weight_err,
        "update_size": float(np.abs(peft_logits - base_logits).max()),
    }
    result["passed"] = (result["peft_injected_layers"] == len(layers)
                        and result["peft_vs_flax_lora"] <= LOGITS_BOUND
                        and result["transformers_merged_vs_peft"] <= LOGITS_BOUND
                        and weight_err <= WEIGHT_BOUND and result["update_size"] > 100 * LOGITS_BOUND)
    return result


def run_prefix_case(root: Path) -> dict:
    """The prefix composition: the LM's and the encoder's adapters (`adapter/decoder`, `adapter/encoder`, as
    `convert.finetune --lora-export adapter` writes them) loaded by PEFT into transformers' own parts, the audio
    embeddings from the saved projector (`scripts/make_prefix_goldens.py`), against the Flax model with LoRA; and
    the merged export (`merge_lora`, `save_pretrained`) in transformers against PEFT's."""
    from flax import traverse_util

    from convert.base.lora import LoraSettings, merge_lora, write_part_adapters
    from convert.compose_prefix import compose_prefix
    from flax_model.prefix import FlaxSpeechPrefixModel, param_shapes
    from scripts import make_fixtures
    from scripts.make_prefix_goldens import record
    from scripts.prefix_cases import COMPOSE, LMS, lm_with_tokenizer, prefix_batch

    name = f"prefix: w2v_stable_wide+{LMS[0]}"
    lm = lm_with_tokenizer(make_fixtures.build(LMS[0], root / "fixtures"), root / "lm")
    directory = root / "prefix"
    compose_prefix(str(make_fixtures.build("w2v_stable_wide", root / "fixtures")), str(lm), directory, **COMPOSE,
                   verify=False, progress=False, log=io.StringIO())
    base = FlaxSpeechPrefixModel.from_pretrained(directory)
    config = base.config
    settings = LoraSettings(rank=4, alpha=8.0, dropout=0.1, targets=("c_attn", "q_proj"), parts=("decoder", "encoder"))
    adapted, flat, candidates, layers, factors = with_lora(base, param_shapes(config), settings)
    batch = prefix_batch(config)
    logits, real = (np.asarray(a) for a in adapted(batch["inputs"], batch["attention_mask"], batch["text_ids"]))
    write_part_adapters(root / "adapter", settings, layers, factors, candidates)
    del batch["labels"]
    peft_rows = record(directory, batch, adapters=root / "adapter")
    merged = merge_lora({**flat, **factors}, layers, settings.scaling)
    FlaxSpeechPrefixModel(config, traverse_util.unflatten_dict(merged, sep="/")).save_pretrained(root / "merged")
    merged_rows = record(root / "merged", batch)
    base_rows = record(directory, batch)
    rows = range(batch["inputs"].shape[0])
    result = {
        "case": name,
        "adapted_layers": len(layers),
        "peft_vs_flax_lora": max(float(np.abs(peft_rows[f"logits_{r}"] - logits[r][real[r]]).max()) for r in rows),
        "transformers_merged_vs_peft": max(float(np.abs(merged_rows[f"logits_{r}"] - peft_rows[f"logits_{r}"]).max())
                                           for r in rows),
        "update_size": max(float(np.abs(peft_rows[f"logits_{r}"] - base_rows[f"logits_{r}"]).max()) for r in rows),
    }
    result["passed"] = (result["peft_vs_flax_lora"] <= LOGITS_BOUND and result["transformers_merged_vs_peft"]
                        <= LOGITS_BOUND and result["update_size"] > 100 * LOGITS_BOUND)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="write the cases here (kept) instead of a temporary directory")
    parser.add_argument("--only", nargs="*", choices=list(CASES), help="run these cases only")
    args = parser.parse_args()
    import peft
    import transformers

    print(f"transformers {transformers.__version__}, peft {peft.__version__}")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for name in args.only or CASES:
            result = run_case(name, root)
            failed += not result["passed"]
            print(json.dumps(result))
        if not args.only:
            result = run_prefix_case(root)
            failed += not result["passed"]
            print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
