"""Writes the prefix demonstration's decoder-only LM: a small GPT-2 pretrained (in seconds, on the CPU) on digit-word
text, with the word-level digit tokenizer of `make_demo_model.py` (Llama's conventions: the tokenizer puts `<s>`
first, texts end with `</s>`).

    python scripts/make_demo_lm.py OUTDIR [--steps 300] [--seed 0]
    python -m convert.compose --encoder ENCODER --decoder OUTDIR --mode prefix --prompt "{audio}" --output ...

The "pretraining" corpus is random strings of 1-5 digit words, `<s> three one four </s>`, drawn afresh for
every batch: the LM learns the format (a digit after a digit, `</s>` after one to five of them), not which
digits follow which (they are uniform), so the speech prefix is what must tell it the digits. OUTDIR is a
`GPT2LMHeadModel` checkpoint (config.json, model.safetensors, flax_model.msgpack) with tokenizer.json,
tokenizer_config.json and generation_config.json; transformers loads it as it is. Seeded: the same command writes
the same bytes on the same machine.
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

BOS, PAD, EOS = 0, 1, 2  # SPECIALS = <s>, <pad>, </s>, <unk>
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


def batch(rng: np.random.Generator, size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`<s> d1 .. dn </s>` rows (n from 1 to 5), right-padded; and their mask."""
    ids = np.full((size, length), PAD, np.int32)
    mask = np.zeros((size, length), np.int32)
    for row in range(size):
        n = rng.integers(1, 6)
        text = [BOS, *(len(SPECIALS) + rng.integers(0, 10, n)), EOS]
        ids[row, :len(text)] = text
        mask[row, :len(text)] = 1
    return ids, mask


def train(config: GPT2Config, steps: int, seed: int, log=print) -> tuple[dict, float]:
    module = module_for(config, "decoder")
    rng = np.random.default_rng(seed)
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, steps), weight_decay=0.01)
    state = optimizer.init(params)

    def loss_fn(p, ids, mask):
        logits, _ = module.apply({"params": p}, ids, mask)
        targets, real = ids[:, 1:], mask[:, 1:]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * real) / jnp.sum(real)

    @jax.jit
    def step(p, s, ids, mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids, mask)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    started = time.perf_counter()
    for i in range(steps):
        params, state, loss = step(params, state, *batch(rng, 64, 8))
        if (i + 1) % max(1, steps // 5) == 0:
            log(f"step {i + 1}: loss {float(loss):.3f}")
    # Held-out loss. The entropy of the format is the floor: log 10 per digit and log 5 / 6 nats for the length.
    held_out = float(loss_fn(params, *batch(np.random.default_rng(seed + 1), 512, 8)))
    log(f"{steps} steps in {time.perf_counter() - started:.1f} s; held-out loss {held_out:.3f} nats per token")
    return params, held_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    raw = hf_config(**LM)
    config = GPT2Config.from_hf_dict(raw)
    params, held_out = train(config, args.steps, args.seed)
    args.outdir.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    save_params(args.outdir, config, flat)
    tokenizer().save(str(args.outdir / "tokenizer.json"))
    (args.outdir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2, sort_keys=True) + "\n")
    (args.outdir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}, indent=2) + "\n")
    (args.outdir / "lm_report.json").write_text(json.dumps({"steps": args.steps, "held_out_loss": held_out}) + "\n")
    print(f"wrote {args.outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
