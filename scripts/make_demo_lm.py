"""Writes the prefix demonstration's decoder-only LM: a small GPT-2 pretrained (in seconds, on the CPU) on digit-word
text, with the word-level digit tokenizer of `make_demo_model.py` (Llama's conventions: the tokenizer puts `<s>`
first, texts end with `</s>`).

    python scripts/make_demo_lm.py OUTDIR [--steps 300] [--seed 0] [--task text|copy]
    python -m convert.compose --encoder ENCODER --decoder OUTDIR --mode prefix --prompt "{audio}" --output ...
    python -m convert.compose ... --prompt "{audio} <unk>" ...            # an LM made with --task copy

The "pretraining" corpus is random strings of 1-5 digit words, `<s> three one four </s>`, drawn afresh for
every batch: the LM learns the format (a digit after a digit, `</s>` after one to five of them), not which
digits follow which (they are uniform), so the speech prefix is what must tell it the digits. OUTDIR is a
`GPT2LMHeadModel` checkpoint (config.json, model.safetensors, flax_model.msgpack) with tokenizer.json,
tokenizer_config.json and generation_config.json; transformers loads it as it is. Seeded: the same command writes
the same bytes on the same machine.

`--task copy` pretrains on `<s> X <unk> d1 .. dn </s>` instead, where X is the same digits as a spoken prefix
looks to the LM: each digit word repeated 2-6 times (the frames of a word), separated and surrounded by runs of
`<pad>` (silence). The LM learns to read a transcript out of such a prefix (collapse the runs, skip the silence),
which an LM that only ever read random digits has no reason to do; the projector then has to map audio to that
prefix's token embeddings. The prompt `{audio} <unk>` marks where the prefix ends.
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
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from convert.base.archs.gpt2 import GPT2Config
from convert.base.params import save_params
from flax_model.registry import module_for
from scripts.fixtures_gpt2 import hf_config
from scripts.make_demo_model import DIGITS, SPECIALS

BOS, PAD, EOS, UNK = 0, 1, 2, 3  # SPECIALS = <s>, <pad>, </s>, <unk>
LM = {"vocab_size": len(SPECIALS) + len(DIGITS), "n_positions": 128, "n_ctx": 128, "n_embd": 144, "n_layer": 2,
      "n_head": 4, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "attn_pdrop": 0.0,
      "embd_pdrop": 0.0, "resid_pdrop": 0.0, "architectures": ["GPT2LMHeadModel"]}


def tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIALS + DIGITS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    t.add_special_tokens(list(SPECIALS))
    return t


COPY_LENGTH = 64


def batch(rng: np.random.Generator, size: int, length: int, task: str = "text"
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the task (see the module docstring; n from 1 to 5 digits), right-padded: ids, attention mask, and
    the mask of the positions the loss counts (the transcript and its `</s>`; for `copy`, not the prefix)."""
    ids = np.full((size, length), PAD, np.int32)
    mask = np.zeros((size, length), np.int32)
    scored = np.zeros((size, length), np.int32)
    for row in range(size):
        digits = list(len(SPECIALS) + rng.integers(0, 10, rng.integers(1, 6)))
        prefix = []
        if task == "copy":
            for d in digits:
                prefix += [PAD] * int(rng.integers(1, 4)) + [d] * int(rng.integers(2, 7))
            prefix += [PAD] * int(rng.integers(1, 4)) + [UNK]
        text = [BOS, *prefix, *digits, EOS]
        ids[row, :len(text)] = text
        mask[row, :len(text)] = 1
        scored[row, 1 + len(prefix):len(text)] = 1
    return ids, mask, scored


def train(config: GPT2Config, steps: int, seed: int, task: str = "text", log=print) -> tuple[dict, float]:
    module = module_for(config, "decoder")
    rng = np.random.default_rng(seed)
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    warmup = min(20, steps // 2)  # a short run (a smoke test) still decays after its warmup
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, steps), weight_decay=0.01)
    state = optimizer.init(params)

    def loss_fn(p, ids, mask, scored):
        logits, _ = module.apply({"params": p}, ids, mask)
        targets, real = ids[:, 1:], scored[:, 1:]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * real) / jnp.sum(real)

    @jax.jit
    def step(p, s, ids, mask, scored):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids, mask, scored)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    length = COPY_LENGTH if task == "copy" else 8
    started = time.perf_counter()
    for i in range(steps):
        params, state, loss = step(params, state, *batch(rng, 64, length, task))
        if (i + 1) % max(1, steps // 5) == 0:
            log(f"step {i + 1}: loss {float(loss):.3f}")
    # Held-out loss. For `text` the entropy of the format is the floor (log 10 per digit, log 5 / 6 nats for the
    # length); for `copy` the transcript follows from the prefix, so the floor is 0.
    held_out = float(loss_fn(params, *batch(np.random.default_rng(seed + 1), 512, length, task)))
    log(f"{steps} steps in {time.perf_counter() - started:.1f} s; held-out loss {held_out:.3f} nats per token")
    return params, held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=("text", "copy"), default="text",
                        help="text: random digit strings; copy: read the digits out of a spoken-like prefix")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: must be at least 2")
    raw = hf_config(**LM)
    config = GPT2Config.from_hf_dict(raw)
    params, held_out = train(config, args.steps, args.seed, args.task)
    args.outdir.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    save_params(args.outdir, config, flat)
    tokenizer().save(str(args.outdir / "tokenizer.json"))
    (args.outdir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2, sort_keys=True) + "\n")
    (args.outdir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}, indent=2) + "\n")
    (args.outdir / "lm_report.json").write_text(
        json.dumps({"steps": args.steps, "task": args.task, "held_out_loss": held_out}) + "\n")
    print(f"wrote {args.outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
