"""Golden values of the prefix composition from transformers itself (parity_tests/goldens/prefix/).

For each pair (an encoder fixture and a decoder-only LM fixture, composed in prefix mode exactly as
`parity_tests/test_prefix_model.py` composes them), on the test's seeded batch, each utterance alone:

1. the encoder's output from transformers' own class (`AutoModel.from_pretrained(DIR/encoder)`), its real frames
   from transformers' `_get_feat_extract_output_lengths`;
2. the audio embeddings from those frames and the saved `projector.safetensors`, computed here in numpy (K
   frames side by side, the last S mod K dropped; Linear, exact GELU or ReLU, Linear);
3. the LM's logits from transformers' `AutoModelForCausalLM.from_pretrained(DIR/decoder)` given
   `inputs_embeds` = [its embeddings of the prompt's ids before the audio, the audio embeddings, of the ids
   after, of the text ids] (one row, nothing padded: the utterance alone).

The test compares both of our implementations (each running the padded batch) with these rows. Run it in an
environment with transformers (never a dependency of the package or its tests):

    PYTHONPATH=$PWD /work/tfenv/bin/python scripts/make_prefix_goldens.py [--only ENCODER+DECODER ...]

What is written: `<encoder>+<decoder>.npz` (the batch's inputs, each row's logits [columns, V], the sha256 of the
composed directory's weight files) and `manifest.json` (cases, versions).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OUT = Path(__file__).resolve().parent.parent / "parity_tests" / "goldens" / "prefix"


def digest(directory: Path) -> str:
    """sha256 over the composed directory's weight files (both parts' safetensors and the projector's)."""
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        h.update(str(path.relative_to(directory)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def projected_audio(hidden: np.ndarray, frames: int, weights: dict[str, np.ndarray], config: dict) -> np.ndarray:
    """[S, E] encoder output of one utterance -> [frames // K, D] audio embeddings (numpy, float64)."""
    from math import erf

    k = config["stack_frames"]
    kept = (frames // k) * k
    x = hidden[:kept].astype(np.float64).reshape(frames // k, k * hidden.shape[-1])
    x = x @ weights["projector.linear_1.weight"].T.astype(np.float64) + weights["projector.linear_1.bias"]
    if config["projector_type"] == "mlp":
        if config["projector_activation"] == "relu":
            x = np.maximum(x, 0.0)
        else:
            x = 0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float64])(x / np.sqrt(2.0)))
        x = x @ weights["projector.linear_2.weight"].T.astype(np.float64) + weights["projector.linear_2.bias"]
    return x


def record(directory: Path, batch: dict[str, np.ndarray], adapters: Path | None = None) -> dict[str, np.ndarray]:
    """Each utterance's logits from transformers (see the module docstring); with `adapters`, each part wrapped by
    `peft.PeftModel.from_pretrained(part, adapters/<part>)` where that adapter exists."""
    import torch
    import transformers
    from safetensors.numpy import load_file

    config = json.loads((directory / "config.json").read_text())
    weights = load_file(str(directory / "projector.safetensors"))
    encoder = transformers.AutoModel.from_pretrained(directory / "encoder", attn_implementation="eager").eval()
    lm = transformers.AutoModelForCausalLM.from_pretrained(directory / "decoder", attn_implementation="eager").eval()
    if adapters is not None:
        import peft

        encoder, lm = (peft.PeftModel.from_pretrained(model, adapters / part).eval()
                       if (adapters / part).is_dir() else model for part, model in (("encoder", encoder), ("decoder", lm)))
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():  # the encoder runs on the padded batch, as the prefix model runs it
        hidden = encoder(torch.from_numpy(batch["inputs"]),
                         attention_mask=torch.from_numpy(batch["attention_mask"])).last_hidden_state
    for row in range(batch["inputs"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        with torch.no_grad():
            frames = int(encoder._get_feat_extract_output_lengths(torch.tensor(n)))
            audio = torch.from_numpy(projected_audio(hidden[row].numpy(), frames, weights, config)).float()
            embed = lm.get_input_embeddings()
            pieces = [embed(torch.tensor(config["prompt_ids_before"], dtype=torch.long)), audio,
                      embed(torch.tensor(config["prompt_ids_after"], dtype=torch.long)),
                      embed(torch.from_numpy(batch["text_ids"][row]).long())]
            sequence = torch.cat([p.reshape(-1, audio.shape[-1]) for p in pieces])[None]
            logits = lm(inputs_embeds=sequence).logits[0]
        out[f"logits_{row}"] = logits.numpy().astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="ENCODER+DECODER cases to (re)make; the others are kept")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    import torch
    import transformers

    from convert.base.prefix import read_prefix_config
    from convert.compose_prefix import compose_prefix
    from scripts import make_fixtures
    from scripts import prefix_cases as spec

    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for encoder, decoder in spec.PAIRS:
            name = f"{encoder}+{decoder}"
            if args.only and name not in args.only:
                continue
            lm = spec.lm_with_tokenizer(make_fixtures.build(decoder, root), root / "lm" / decoder)
            directory = root / "prefix" / name
            compose_prefix(str(make_fixtures.build(encoder, root)), str(lm), directory, **spec.COMPOSE,
                           verify=False, progress=False, log=io.StringIO())

            batch = spec.prefix_batch(read_prefix_config(directory))
            del batch["labels"]
            arrays = record(directory, batch)
            np.savez_compressed(args.out / f"{name}.npz", **batch, **arrays)
            manifest["cases"][name] = {"file": f"{name}.npz", "weights_sha256": digest(directory),
                                       "compose": spec.COMPOSE}
            print(f"{name}: {[arrays[k].shape for k in sorted(arrays)]}")
    manifest.update(made_by="scripts/make_prefix_goldens.py", transformers=transformers.__version__,
                    torch=torch.__version__, numpy=np.__version__)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
