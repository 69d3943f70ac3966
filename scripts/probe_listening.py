"""Does a composed model learn to listen? Trains it on one fixed batch and compares its loss with the loss of the
same labels under other utterances' audio (rolled by one): a model that uses the audio separates the two.

    python scripts/probe_listening.py MODEL MANIFEST_DIR [--train all|decoder|SUBSTRING] [--lr 1e-3]
        [--encoder-lr LR] [--steps 61] [--batch 32]

MANIFEST_DIR holds `train.jsonl` (as `scripts/make_spoken_dataset.py` writes). `--train decoder` freezes every
speech-encoder weight; a SUBSTRING freezes the leaves whose path contains it (e.g. `feature_extractor`). Plain
Adam, deterministic (no dropout, no SpecAugment). Prints one JSON line every 10 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np
import optax
from flax import traverse_util

from convert.training_data import LabelTokenizer, load_audio, zero_mean_unit_var
from flax_model import FlaxSpeechEncoderDecoderModel
from flax_model.training import in_speech_encoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--train", default="all")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--encoder-lr", type=float, default=None, help="the speech encoder's rate (default: --lr)")
    parser.add_argument("--steps", type=int, default=61)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(args.model)
    tokenizer = LabelTokenizer.for_model(args.model, model)
    rows = [json.loads(line) for line in (args.data / "train.jsonl").open()][:args.batch]
    waves = [zero_mean_unit_var(load_audio(args.data / r["audio"], 16000)) for r in rows]
    ids = [tokenizer.encode(r["text"]) for r in rows]
    inputs = np.zeros((len(rows), max(map(len, waves))), np.float32)
    mask = np.zeros(inputs.shape, np.int32)
    labels = np.full((len(rows), max(map(len, ids))), -100, np.int32)
    for i, (wave, label) in enumerate(zip(waves, ids)):
        inputs[i, :len(wave)], mask[i, :len(wave)], labels[i, :len(label)] = wave, 1, label

    flat = traverse_util.flatten_dict(model.params, sep="/")

    def group(path: str) -> str:
        encoder = in_speech_encoder(path)
        if args.train == "decoder" and encoder or args.train not in ("all", "decoder") and args.train in path:
            return "frozen"
        return "encoder" if encoder else "train"

    labels_tree = traverse_util.unflatten_dict({k: group(k) for k in flat}, sep="/")
    encoder_lr = args.lr if args.encoder_lr is None else args.encoder_lr
    optimizer = optax.multi_transform({"train": optax.adam(args.lr), "encoder": optax.adam(encoder_lr),
                                       "frozen": optax.set_to_zero()}, labels_tree)

    def loss(params, audio, audio_mask):
        return model.loss(audio, audio_mask, labels, params=params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params, inputs, mask)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    other = np.roll(np.arange(len(rows)), 1)
    mismatched = jax.jit(lambda p: loss(p, inputs[other], mask[other]))
    params, state, start = model.params, optimizer.init(model.params), time.time()
    for i in range(args.steps):
        params, state, value = step(params, state)
        if i % 10 == 0:
            print(json.dumps({"train": args.train, "lr": args.lr, "encoder_lr": encoder_lr, "step": i,
                              "loss": round(float(value), 4),
                              "loss_other_audio": round(float(mismatched(params)), 4),
                              "seconds": round(time.time() - start, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
