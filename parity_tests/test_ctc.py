"""Hybrid CTC/attention: the CTC head composed in (kept from a `...ForCTC` checkpoint or created), the CTC loss as
transformers' `Wav2Vec2ForCTC` computes it (`torch.nn.functional.ctc_loss`), its gradients against the reference,
and joint CTC/attention decoding against today's beam search and against a CTC prefix beam search written out here.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert.base.ctc import CTCHeadConfig, CTCVocabulary, forced_align, greedy_collapse, word_timestamps
from convert.base.errors import ConvertError, UnsupportedConfig
from flax_model.ctc import ctc_loss_terms
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel
from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel
from torch_reference.training import gradients_in_flax_layout

LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
# A character vocabulary as Wav2Vec2CTCTokenizer writes it (32 labels, as the w2v_ctc fixture's head).
CHARS = ["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVKXJQZ'"]


def _compose(encoder: Path, decoder: Path, out: Path, **kwargs) -> dict:
    from convert.compose import compose

    return compose(str(encoder), str(decoder), out, verify=False, progress=False, log=io.StringIO(), **kwargs).report


@pytest.fixture(scope="module")
def hybrid_dir(fixture_dir, tmp_path_factory) -> Path:
    """wav2vec2 (a Wav2Vec2ForCTC checkpoint, whose own head is dropped) + BART with a new CTC head over the
    decoder's vocabulary."""
    out = tmp_path_factory.mktemp("ctc") / "hybrid"
    report = _compose(fixture_dir("w2v_ctc"), fixture_dir("bart_causal"), out, ctc_head="decoder")
    assert "replaced by a new head" in dict(report["encoder"]["dropped"])["lm_head.weight"]
    return out


# ----------------------------------------------------------------------------------------------------------
# The head in both formats


def test_a_ctc_checkpoint_keeps_its_head_and_vocabulary_bit_for_bit(fixture_dir, tmp_path):
    from safetensors.numpy import load_file

    encoder = tmp_path / "w2v_ctc"
    shutil.copytree(fixture_dir("w2v_ctc"), encoder)
    (encoder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(CHARS)}))
    (encoder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    report = _compose(encoder, fixture_dir("bart_causal"), tmp_path / "out")
    out = tmp_path / "out"
    source = load_file(encoder / "model.safetensors")
    written = load_file(out / "model.safetensors")
    assert np.array_equal(written["ctc_head.weight"], source["lm_head.weight"])
    assert np.array_equal(written["ctc_head.bias"], source["lm_head.bias"])
    flax = FlaxSpeechEncoderDecoderModel.from_pretrained(out).params["ctc_head"]
    assert np.array_equal(np.asarray(flax["kernel"]), source["lm_head.weight"].T)
    head = json.loads((out / "config.json").read_text())["ctc"]
    assert head["vocabulary"] == "ctc_vocab.json" and head["vocab_size"] == 32 and head["blank_id"] == 0
    assert head["loss_reduction"] == "sum" and head["zero_infinity"] is False  # Wav2Vec2Config's defaults
    assert json.loads((out / "ctc_vocab.json").read_text()) == {t: i for i, t in enumerate(CHARS)}
    assert report["transformers"]["ignored"] == ["ctc_head.weight", "ctc_head.bias", "config.json: ctc"]
    assert ["lm_head.weight", "ctc_head/kernel"] in report["encoder"]["loaded"]
    assert not [k for k, _ in report["encoder"]["dropped"] if k.startswith("lm_head")]
    assert "## CTC head" in (out / "README.md").read_text()
    vocabulary = CTCVocabulary.read(out / "ctc_vocab.json", CTCHeadConfig.from_dict(head))
    assert vocabulary.encode("one two") == [CHARS.index(c) for c in "ONE|TWO"]
    assert vocabulary.decode(vocabulary.encode("one two")) == "one two"
    with pytest.raises(ConvertError, match="the character '!'"):
        vocabulary.encode("one!")


def test_without_a_vocabulary_the_ctc_head_is_dropped_with_the_reason(fixture_dir, tmp_path):
    report = _compose(fixture_dir("w2v_ctc"), fixture_dir("bart_causal"), tmp_path / "out")
    reasons = {k: why for k, why in report["encoder"]["dropped"]}
    assert "no vocab.json" in reasons["lm_head.weight"] and "ctc" not in json.loads(
        (tmp_path / "out" / "config.json").read_text())


@pytest.mark.parametrize(("section", "message"), [
    ({"vocab_size": 8}, "ctc.blank_id is missing"),
    ({"vocab_size": 8, "blank_id": 8}, "ctc.blank_id=8 is not a label"),
    ({"vocab_size": 8, "blank_id": 0, "loss_reduction": "avg"}, "ctc.loss_reduction=\"avg\" is not one of"),
    ({"vocab_size": 8, "blank_id": 0, "beam": 3}, "ctc.beam is not a CTC head setting"),
])
def test_a_bad_ctc_section_is_refused_by_name(section, message):
    with pytest.raises(UnsupportedConfig, match=message):
        CTCHeadConfig.from_dict(section)


# ----------------------------------------------------------------------------------------------------------
# The loss


def _torch_ctc(logits: np.ndarray, frames: np.ndarray, targets: np.ndarray, blank: int, reduction: str,
               zero_infinity: bool) -> tuple[float, np.ndarray]:
    """torch.nn.functional.ctc_loss as Wav2Vec2ForCTC calls it, and its gradient with respect to the logits."""
    x = torch.tensor(logits, requires_grad=True)
    log_probs = torch.log_softmax(x, dim=-1, dtype=torch.float32).transpose(0, 1)
    mask = targets >= 0
    loss = torch.nn.functional.ctc_loss(log_probs, torch.tensor(targets[mask]), torch.tensor(frames),
                                        torch.tensor(mask.sum(-1)), blank=blank, reduction=reduction,
                                        zero_infinity=zero_infinity)
    loss.backward()
    return float(loss.detach()), x.grad.numpy()


@pytest.mark.parametrize(("reduction", "zero_infinity"), [("mean", True), ("sum", True), ("mean", False)])
def test_ctc_loss_equals_torch_ctc_loss_with_its_gradient(reduction, zero_infinity):
    """Random logits over 4 utterances (padded frames, repeated labels, one target too long for its frames when
    `zero_infinity`) against `torch.nn.functional.ctc_loss`."""
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((4, 24, 7))).astype(np.float32)
    frames = np.array([24, 19, 9, 16])
    targets = np.full((4, 8), -100)
    targets[0] = [1, 1, 2, 3, 3, 3, 4, 5]
    targets[1, :5] = [2, 2, 2, 2, 2]
    # With zero_infinity: 7 labels and 4 repeats need 11 frames, 9 are there (torch: infinity, zeroed).
    targets[2, :7] = [1, 1, 1, 1, 1, 2, 3] if zero_infinity else [1, 2, 3, 4, 5, 6, 1]
    targets[3] = [3, 4, 3, 4, 3, 4, 3, 4]
    head = CTCHeadConfig(vocab_size=7, blank_id=0, loss_reduction=reduction, zero_infinity=zero_infinity)
    mask = np.arange(24)[None, :] < frames[:, None]

    def ours(x):
        total, count = ctc_loss_terms(x, jnp.asarray(mask), jnp.asarray(targets), jnp.ones(4, bool), head)
        return total / count

    loss, grad = jax.jit(jax.value_and_grad(ours))(jnp.asarray(logits))
    ref_loss, ref_grad = _torch_ctc(logits, frames, targets, 0, reduction, zero_infinity)
    assert abs(float(loss) - ref_loss) <= LOSS_TOLERANCE * abs(ref_loss), f"loss {float(loss)} vs torch {ref_loss}"
    rel = np.linalg.norm(np.asarray(grad) - ref_grad) / np.linalg.norm(ref_grad)
    assert rel <= GRAD_TOLERANCE, f"|Δgrad| / |grad| = {rel:.2e}"
    if not zero_infinity:  # torch gives infinity for an unalignable target: so does this
        targets[2, :7] = [1, 1, 1, 1, 1, 2, 3]
        assert float(jax.jit(ours)(jnp.asarray(logits))) == np.inf
        assert _torch_ctc(logits, frames, targets, 0, reduction, zero_infinity)[0] == np.inf


def _hybrid_batch(config, seed: int = 0, lengths: tuple[int, int] = (4800, 3200)) -> dict[str, np.ndarray]:
    """Two utterances (the second padded), decoder labels with the start / eos tokens and -100 padding, and a
    third row of batch filler (silence, no labels), which counts for nothing in either loss. 0.3 s and 0.2 s: the
    padded length is the one transcription pads them to (tenths of a second), so the tests share compilations."""
    rng = np.random.default_rng(seed)
    inputs = np.zeros((3, lengths[0]), np.float32)
    mask = np.zeros((3, lengths[0]), np.int32)
    for row, n in enumerate(lengths):
        inputs[row, :n] = rng.standard_normal(n)
        mask[row, :n] = 1
    mask[2] = 1
    words = [i for i in range(config.decoder.vocab_size) if i not in config.special_token_ids]
    labels = np.full((3, 8), -100, np.int64)
    labels[0] = [config.decoder.bos_token_id, *rng.choice(words, 6), config.eos_token_id]
    labels[1, :5] = [config.decoder.bos_token_id, *rng.choice(words, 3), config.eos_token_id]
    return {"inputs": inputs, "attention_mask": mask, "labels": labels}


@functools.cache
def _hybrid_models(directory: Path):
    return FlaxSpeechEncoderDecoderModel.from_pretrained(directory), SpeechEncoderDecoderModel.from_pretrained(directory)


def test_hybrid_loss_and_every_gradient_match_the_reference(hybrid_dir):
    """lambda CTC + (1 - lambda) cross-entropy, Flax against the reference (whose CTC term is torch's ctc_loss):
    the loss against the float32 reference, every gradient against the reference run in float64 (torch's float32
    CTC gradient strays from float64's by ~1e-4 on a long utterance of a random head, this toolkit's by ~1e-6: see
    `flax_model.ctc.ctc_log_likelihood`); and the CTC term alone (lambda = 1) against torch's ctc_loss on the
    reference's own CTC logits."""
    import copy

    from parity_tests.test_training import _compare

    flax_model, ref = _hybrid_models(hybrid_dir)
    batch = _hybrid_batch(flax_model.config, lengths=(1600, 1000))  # test_training's lengths
    loss, grads = jax.jit(jax.value_and_grad(lambda p: flax_model.loss(
        batch["inputs"], batch["attention_mask"], batch["labels"], params=p, ctc_weight=0.3)))(flax_model.params)
    torch_batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        ref_loss = float(ref.loss(torch_batch["inputs"], torch_batch["attention_mask"], torch_batch["labels"],
                                  ctc_weight=0.3))
    exact = copy.deepcopy(ref).double()
    exact_loss = exact.loss(torch_batch["inputs"].double(), torch_batch["attention_mask"], torch_batch["labels"],
                            ctc_weight=0.3)
    exact_loss.backward()
    rel = abs(float(loss) - ref_loss) / abs(ref_loss)
    assert rel <= LOSS_TOLERANCE, f"loss {float(loss):.7f} vs the reference's {ref_loss:.7f}: relative {rel:.2e}"
    _compare("hybrid lambda=0.3 (float64 reference)", float(loss), grads, float(exact_loss),
             {k: v.astype(np.float64) for k, v in gradients_in_flax_layout(exact).items()})
    assert float(jnp.linalg.norm(grads["ctc_head"]["kernel"])) > 0

    with torch.no_grad():
        ctc_only = float(ref.loss(torch_batch["inputs"], torch_batch["attention_mask"], torch_batch["labels"],
                                  ctc_weight=1.0))
        logits, frame_mask = ref.ctc_logits(torch_batch["inputs"][:2], torch_batch["attention_mask"][:2])
    special = sorted(flax_model.config.special_token_ids)
    targets = np.full((2, 8), -100)
    for row in range(2):
        kept = [int(t) for t in batch["labels"][row] if t >= 0 and t not in special]
        targets[row, :len(kept)] = kept
    head = flax_model.config.ctc
    direct, _ = _torch_ctc(logits.numpy(), frame_mask.sum(-1).numpy(), targets, head.blank_id, head.loss_reduction,
                           head.zero_infinity)
    ours = float(flax_model.loss(batch["inputs"], batch["attention_mask"], batch["labels"], ctc_weight=1.0))
    for name, value in (("reference", ctc_only), ("Flax", ours)):
        assert abs(value - direct) <= LOSS_TOLERANCE * abs(direct), f"{name} CTC {value} vs ctc_loss {direct}"


# ----------------------------------------------------------------------------------------------------------
# Joint CTC/attention decoding


def _prefix_beam_search(log_probs: np.ndarray, beams: int, max_new: int, blank: int, eos: int, bos: int,
                        length_penalty: float = 1.0) -> tuple[list[int], float]:
    """CTC prefix beam search written out (label-synchronous, lambda = 1), in float64, for one utterance's real
    frames: the first token forced to `bos`, the last allowed one to `eos` (the fixture's generation config), the
    beam bookkeeping of `torch_reference.generation.beam_search` (transformers'). Every prefix probability comes
    from the CTC forward algorithm over that whole prefix, run afresh: psi(h) sums, over the frames, the
    probability of entering h's last label there; eos scores p(g), the forward algorithm's total."""
    x = log_probs.astype(np.float64)
    frames, vocab = x.shape
    never = -np.inf

    def forward(prefixes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """prefixes [C, L] -> (log psi [C] of each, log p [C] of each as a whole transcript)."""
        count, length = prefixes.shape
        ext = np.full((count, 2 * length + 1), blank)
        ext[:, 1::2] = prefixes
        states = ext.shape[1]
        skip = np.zeros_like(ext, bool)
        skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
        last = states - 2
        alpha = np.full((count, states), never)
        enter = []
        for t in range(frames):
            emit = x[t, ext]
            if t == 0:
                new = np.full((count, states), never)
                new[:, :2] = emit[:, :2]
                enter.append(emit[:, 1] if length == 1 else np.full(count, never))
            else:
                one = np.concatenate([np.full((count, 1), never), alpha[:, :-1]], axis=1)
                two = np.where(skip, np.concatenate([np.full((count, 2), never), alpha[:, :-2]], axis=1), never)
                new = np.logaddexp(np.logaddexp(alpha, one), two) + emit
                enter.append(np.logaddexp(one[:, last], two[:, last]) + emit[:, last])
            alpha = new
        return np.logaddexp.reduce(np.stack(enter), axis=0), np.logaddexp(alpha[:, -1], alpha[:, -2])

    running = [([], 0.0, 0.0)] + [([], -1e9, 0.0)] * (beams - 1)  # (tokens, score, psi of the CTC labels)
    finished: list[tuple[list[int], float]] = []
    for step in range(max_new):
        generated = step + 1
        candidates = []
        for k, (tokens, score, psi) in enumerate(running):
            labels = [t for t in tokens if t != bos]
            if step == 0:
                candidates.append((score, k * vocab + bos, tokens + [bos], psi))
                continue
            if generated == max_new:
                _, whole = forward(np.asarray([labels]) if labels else np.zeros((1, 0), int))
                candidates.append((score - psi + whole[0], k * vocab + eos, tokens + [eos], psi))
                continue
            extended = np.asarray([labels + [c] for c in range(vocab)])
            psis, _ = forward(extended)
            _, whole = forward(np.asarray([labels]) if labels else np.zeros((1, 0), int))
            for c in range(vocab):
                if c == eos:
                    candidates.append((score - psi + whole[0], k * vocab + c, tokens + [c], psi))
                elif c not in (blank, bos):
                    candidates.append((score - psi + psis[c], k * vocab + c, tokens + [c], psis[c]))
        candidates.sort(key=lambda c: (-c[0], c[1]))
        top = candidates[:2 * beams]
        go_on, ended = [], []
        for rank, (score, _, tokens, psi) in enumerate(top):
            if tokens[-1] == eos or generated == max_new:
                if rank < beams and len(finished) < beams or (rank < beams and score / generated ** length_penalty
                                                               > min(s for _, s in finished)):
                    finished.append((tokens, score / generated ** length_penalty))
                    finished.sort(key=lambda h: -h[1])
                    del finished[beams:]
                ended.append((tokens, score - 1e9, psi))
            else:
                go_on.append((tokens, score, psi))
        running = (go_on + ended)[:beams]
        if len(finished) == beams and min(s for _, s in finished) >= running[0][1] / generated ** length_penalty:
            break
    return max(finished, key=lambda h: h[1])


@functools.cache
def _ctc_trained(directory: Path):
    """The hybrid model with its CTC head trained (CTC loss, Adam) to emit two utterances' labels from their fixed
    encoder output; its batch; the head's training loss."""
    import optax

    from flax_model.ctc import ctc_targets

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    batch = _hybrid_batch(model.config)
    features, mask = model._fn("encode_features")(model.params, jnp.asarray(batch["inputs"]),
                                                  jnp.asarray(batch["attention_mask"]))
    targets = ctc_targets(jnp.asarray(batch["labels"]), sorted(model.config.special_token_ids))

    def loss(head):
        total, count = ctc_loss_terms(features @ head["kernel"] + head["bias"], mask, targets,
                                      jnp.asarray([True, True, False]), model.config.ctc)
        return total / count

    step = jax.jit(jax.value_and_grad(loss))
    head, optimizer = dict(model.params["ctc_head"]), optax.adam(0.05)
    state = optimizer.init(head)
    for _ in range(150):
        value, grads = step(head)
        updates, state = optimizer.update(grads, state, head)
        head = optax.apply_updates(head, updates)
    trained = FlaxSpeechEncoderDecoderModel(model.config, {**model.params, "ctc_head": head})
    trained.generation_config = model.generation_config
    return trained, batch, float(value), np.asarray(targets)


def test_joint_decoding_with_weight_0_is_todays_beam_search(hybrid_dir):
    """... token for token and score for score; and batched equals single at lambda = 0.3: each utterance decoded
    in a batch of copies of itself (nothing else in its batch; the same compiled search) gives its row of the
    mixed batch. (That the frames past an utterance's length change nothing, the lambda = 1 test shows: it
    compares the padded second utterance with a search over its real frames alone.)"""
    model, batch, _, _ = _ctc_trained(hybrid_dir)
    plain = model.generate(batch["inputs"], batch["attention_mask"], num_beams=3, max_new_tokens=10)
    joint = model.generate(batch["inputs"], batch["attention_mask"], num_beams=3, max_new_tokens=10, ctc_weight=0.0)
    assert np.array_equal(joint.sequences, plain.sequences), f"{joint.sequences} vs {plain.sequences}"
    assert np.array_equal(joint.sequences_scores, plain.sequences_scores)
    hybrid = model.generate(batch["inputs"], batch["attention_mask"], num_beams=3, max_new_tokens=10,
                            ctc_weight=0.3)
    for row in range(3):  # the third row is silence
        copies = {k: np.repeat(batch[k][row:row + 1], 3, axis=0) for k in ("inputs", "attention_mask")}
        single = model.generate(copies["inputs"], copies["attention_mask"], num_beams=3, max_new_tokens=10,
                                ctc_weight=0.3)
        width = min(single.sequences.shape[1], hybrid.sequences.shape[1])
        assert single.sequences[0, :width].tolist() == hybrid.sequences[row, :width].tolist()
        assert abs(float(single.sequences_scores[0] - hybrid.sequences_scores[row])) <= 1e-5


def test_joint_decoding_with_weight_1_is_ctc_prefix_beam_search(hybrid_dir):
    """On the CTC-trained head and on the untrained one (whose beams differ at every step)."""
    trained, batch, loss, targets = _ctc_trained(hybrid_dir)
    assert loss < 0.5, f"the CTC head did not learn its two utterances (loss {loss:.3f})"
    untrained = FlaxSpeechEncoderDecoderModel.from_pretrained(hybrid_dir)
    config = trained.config
    for name, model in (("trained", trained), ("untrained", untrained)):
        out = model.generate(batch["inputs"], batch["attention_mask"], num_beams=3, max_new_tokens=10,
                             ctc_weight=1.0)
        logits, mask = model.ctc_logits(batch["inputs"], batch["attention_mask"])
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        for row in range(2):
            frames = int(mask[row].sum())
            tokens, score = _prefix_beam_search(log_probs[row, :frames], 3, 10, config.ctc.blank_id,
                                                config.eos_token_id, config.decoder.bos_token_id)
            ours = [t for t in out.sequences[row, 1:].tolist()][:len(tokens)]
            assert ours == tokens, f"{name} row {row}: {ours} vs the written-out search's {tokens}"
            assert abs(float(out.sequences_scores[row]) - score) <= 1e-4 * abs(score), (
                f"{name} row {row}: score {float(out.sequences_scores[row])} vs {score}")
            if name == "trained":
                expected = [t for t in targets[row] if t >= 0]
                assert tokens[1:-1] == expected, f"row {row}: {tokens} does not spell the labels {expected}"


# ----------------------------------------------------------------------------------------------------------
# CTC decoding alone, alignment and timestamps


def test_forced_alignment_is_the_best_path_that_spells_the_labels():
    """Viterbi against every path of 7 frames over 3 symbols (blank 0) that collapses to the labels."""
    import itertools

    rng = np.random.default_rng(3)
    log_probs = np.log(rng.dirichlet(np.ones(3), size=7))
    for labels in ([1, 2], [1, 1], [2, 1, 2]):
        best, best_path = -np.inf, None
        for path in itertools.product(range(3), repeat=7):
            collapsed = [p for k, p in enumerate(path) if p != 0 and (k == 0 or p != path[k - 1])]
            score = sum(log_probs[t, p] for t, p in enumerate(path))
            if collapsed == labels and score > best:
                best, best_path = score, path
        spans = forced_align(log_probs, labels, 0)
        expected = []
        for t, p in enumerate(best_path):
            if p != 0 and (t == 0 or p != best_path[t - 1]):
                expected.append([t, t + 1])
            elif p != 0:
                expected[-1][1] = t + 1
        assert [list(s) for s in spans] == expected, f"{labels}: {spans} vs {expected} ({best_path})"
    assert forced_align(log_probs, [1, 1, 1, 1, 2], 0) is None  # 5 labels and 3 repeats need 8 frames, 7 here
    assert greedy_collapse(np.array([0, 3, 3, 0, 3, 4, 4, 0]), 8, 0) == ([3, 3, 4], [(1, 3), (4, 5), (5, 7)])


def test_words_span_their_labels_frames():
    spell = {1: "nine", 2: "fi", 3: "ve"}
    decode = lambda ids: " ".join(spell[i] for i in ids if i == 1) + " " + "".join(spell[i] for i in ids if i > 1)
    words = word_timestamps([1, 2, 3], [(2, 4), (6, 7), (9, 11)], lambda ids: decode(ids).strip(), 0.02)
    assert words == [{"word": "nine", "start": 0.04, "end": 0.08}, {"word": "five", "start": 0.12, "end": 0.22}]


def _word_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer.json: ids 0-2 the special <s>, <pad>, </s>; the others the words w3, w4, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<s>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "<pad>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))


def test_transcription_decodes_with_the_ctc_head_and_times_the_words(hybrid_dir, tmp_path):
    """`transcribe` (what `python -m convert.generate --decoder ctc --timestamps` runs) on the CTC-trained model:
    the best path spells the labels it learned, each word spans its label's frames (20 samples a frame), and joint
    decoding through `transcribe` gives `generate`'s tokens."""
    import soundfile

    from convert.transcribe import transcribe

    model, batch, _, targets = _ctc_trained(hybrid_dir)
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    _word_tokenizer(directory, model.config.decoder.vocab_size)
    (directory / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "sampling_rate": 16000,
                                                                    "return_attention_mask": True}))
    files = []
    for row in range(2):
        files.append(tmp_path / f"{row}.wav")
        soundfile.write(files[-1], batch["inputs"][row, :int(batch["attention_mask"][row].sum())], 16000,
                        subtype="FLOAT")
    report = transcribe(model, files, model_dir=directory, decoder="ctc", timestamps=True, batch_size=3, buckets=1,
                        progress=False)
    assert report.shapes == [(3, 4800)]  # the test batch's shape: the compiled functions are shared
    logits, mask = model.ctc_logits(batch["inputs"], batch["attention_mask"])
    best = np.asarray(jnp.argmax(logits, axis=-1))
    for row, result in enumerate(report.results):
        labels, spans = greedy_collapse(best[row], int(mask[row].sum()), model.config.ctc.blank_id)
        assert result.token_ids == labels == [t for t in targets[row] if t >= 0], (result.token_ids, labels)
        assert result.text == " ".join(f"w{t}" for t in labels)
        assert [(w["word"], w["start"], w["end"]) for w in result.words] == [
            (f"w{t}", round(a * (20 / 16000), 3), round(b * (20 / 16000), 3)) for t, (a, b) in zip(labels, spans)]
    joint = transcribe(model, files, model_dir=directory, ctc_weight=0.3, num_beams=3, max_new_tokens=10,
                       timestamps=True, batch_size=3, buckets=1, progress=False)
    direct = model.generate(batch["inputs"], batch["attention_mask"], num_beams=3, max_new_tokens=10,
                            ctc_weight=0.3)
    for row, result in enumerate(joint.results):
        tokens = direct.sequences[row].tolist()
        assert result.token_ids == tokens[:tokens.index(model.config.eos_token_id, 1) + 1]
        assert [w["word"] for w in result.words] == result.text.split()


def test_finetune_trains_the_hybrid_loss_from_a_dataset_and_generate_reads_one(tmp_path, monkeypatch, capsys):
    """`python -m convert.finetune --dataset FOLDER --ctc-weight 0.3 --eval-ctc-weight 0.3` on the built-in pair
    with a CTC head over BART's vocabulary: the loss is the hybrid one (step 1 against `model.loss`), the head
    trains, the report says so; then `python -m convert.generate --dataset PARQUET --decoder ctc` transcribes a
    parquet split and scores it against its text column."""
    from convert import finetune, generate
    from parity_tests.test_datasets import make_audiofolder, make_parquet

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _compose("wav2vec2", "bart", tmp_path / "base", ctc_head="decoder")
    folder = make_audiofolder(tmp_path / "folder")
    argv = ["--model", str(tmp_path / "base"), "--dataset", str(folder), "--output", str(tmp_path / "out"),
            "--max-steps", "2", "--batch-size", "3", "--num-buckets", "1", "--eval-batch-size", "2",
            "--max-new-tokens", "4", "--learning-rate", "1e-3", "--ctc-weight", "0.3", "--eval-ctc-weight", "0.3",
            "--no-dropout", "--no-verify", "--no-progress"]
    assert finetune.main(argv) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert report["settings"]["ctc_weight"] == 0.3 and report["train_manifest"].endswith("[train]")
    assert "hybrid CTC/attention" in (tmp_path / "out" / "README.md").read_text()
    base = FlaxSpeechEncoderDecoderModel.from_pretrained(tmp_path / "base")
    trained = FlaxSpeechEncoderDecoderModel.from_pretrained(tmp_path / "out")
    assert not np.array_equal(np.asarray(base.params["ctc_head"]["kernel"]),
                              np.asarray(trained.params["ctc_head"]["kernel"]))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["ctc"]["vocabulary"] == "decoder"

    parquet = make_parquet(tmp_path / "test.parquet")
    assert generate.main(["--model", str(tmp_path / "out"), "--dataset", str(parquet), "--text-column", "sentence",
                          "--decoder", "ctc", "--timestamps", "--no-progress"]) == 0
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [line["reference"] for line in lines] == ["one two", "three", "four five six"]
    assert all("words" in line and "token_ids" in line for line in lines)
    assert "WER" in out.err
