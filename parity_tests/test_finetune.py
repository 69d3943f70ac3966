"""`convert.finetune`: the exported directory loads and passes `convert.check`; Ctrl-C saves a checkpoint and a
resumed run ends with the same parameters as an uninterrupted one; bad input is a one-line error."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
from flax import traverse_util

from convert import cli, finetune, finetune_run
from convert.finetune_settings import FinetuneSettings
from convert.training_data import LabelTokenizer

SETTINGS = {"max_steps": 4, "batch_size": 2, "num_buckets": 1, "eval_batch_size": 2, "max_new_tokens": 4,
            "save_every": 2, "learning_rate": 1e-3}
WORDS = ("one two", "three", "four five six", "seven", "eight nine", "zero one")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A composed built-in model (it has a tokenizer.json) and six training / two held-out tone utterances."""
    from convert.compose import compose

    root = tmp_path_factory.mktemp("finetune")
    compose("wav2vec2", "bart", root / "base", verify=False, progress=False, log=io.StringIO())
    rng = np.random.default_rng(0)
    (root / "wav").mkdir()
    for name, texts in (("train", WORDS), ("eval", WORDS[:2])):
        with (root / f"{name}.jsonl").open("w") as f:
            for i, text in enumerate(texts):
                seconds = 0.3 + 0.05 * len(text.split())
                t = np.arange(int(16000 * seconds)) / 16000
                wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.01 * rng.standard_normal(t.shape)
                soundfile.write(root / "wav" / f"{name}{i}.wav", wave.astype(np.float32), 16000)
                f.write(json.dumps({"audio": f"wav/{name}{i}.wav", "text": text}) + "\n")
    return {"root": root, "model": root / "base", "train": root / "train.jsonl", "eval": root / "eval.jsonl"}


@pytest.fixture(scope="module")
def uninterrupted(data) -> Path:
    out = data["root"] / "straight"
    result = finetune.finetune(data["model"], data["train"], data["eval"], out, FinetuneSettings(**SETTINGS),
                               verify=False, progress=False, log=io.StringIO())
    assert not result.interrupted
    return out


def _params(directory: Path) -> dict[str, np.ndarray]:
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(model.params, sep="/").items()}


def test_the_exported_directory_loads_and_convert_check_passes(data, uninterrupted):
    from convert.check import check

    for name in ("config.json", "flax_model.msgpack", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "preprocessor_config.json", "README.md", "training_report.json", "loss_curve.png"):
        assert (uninterrupted / name).is_file(), name
    report = json.loads((uninterrupted / "training_report.json").read_text())
    assert report["steps"] == 4 and [e["step"] for e in report["eval"]] == [0, 4]
    assert report["bfloat16_products"] is None  # a float32 run
    assert "Training run" in (uninterrupted / "README.md").read_text()
    trained, base = _params(uninterrupted), _params(data["model"])
    assert trained.keys() == base.keys()
    moved = sum(not np.array_equal(trained[k], base[k]) for k in base)
    assert moved > len(base) // 2, f"only {moved} of {len(base)} tensors changed"
    result = check(str(uninterrupted), max_new_tokens=5)
    assert result["passed"], json.dumps(result["checks"], default=str)[:1000]


def test_ctrl_c_saves_a_checkpoint_and_resuming_matches_an_uninterrupted_run(data, uninterrupted, monkeypatch,
                                                                            capsys):
    out, checkpoints = data["root"] / "resumed", data["root"] / "resumed.checkpoints"
    argv = ["--model", str(data["model"]), "--train", str(data["train"]), "--eval", str(data["eval"]),
            "--output", str(out), "--max-steps", "4", "--batch-size", "2", "--num-buckets", "1",
            "--eval-batch-size", "2", "--max-new-tokens", "4", "--save-every", "2", "--learning-rate", "1e-3",
            "--no-verify", "--no-progress"]
    # Ctrl-C as the interrupt guard delivers it: the callback finetune registered is called after step 3 starts.
    handlers = []
    monkeypatch.setattr(cli, "defer_interrupts", lambda h: handlers.append(h))
    real_step = finetune_run.Run.step

    def step(self, state, number):
        if number == 2:  # the callback registered while step 3 runs (steps 1 and 2 are done, not yet saved)
            assert handlers[-1] is not None, handlers
            handlers[-1]()
        return real_step(self, state, number)

    monkeypatch.setattr(finetune_run.Run, "step", step)
    assert finetune.main(argv) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted: checkpoint saved at step 3"), err
    assert not out.exists() and checkpoints.is_dir()
    monkeypatch.setattr(finetune_run.Run, "step", real_step)
    assert finetune.main([*argv, "--resume"]) == cli.EXIT_OK
    assert "resumed from" in capsys.readouterr().out
    resumed, straight = _params(out), _params(uninterrupted)
    differ = [k for k in straight if not np.array_equal(resumed[k], straight[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    # A fresh run does not silently mix with an earlier run's checkpoints.
    assert finetune.main([*argv[:7], str(data["root"] / "other"), "--checkpoint-dir", str(checkpoints)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds checkpoints of an earlier run" in err[0] and "--resume" in err[0], err


@pytest.mark.default_emitters  # scanned and unrolled weights within 1e-6
def test_scanned_layers_train_as_the_unrolled_step_does(data, tmp_path):
    """`--scan-layers` stacks each layer stack inside the step (the weights stay per layer): in deterministic
    mode its losses and trained weights are the unrolled run's, up to the float reassociation of a scan.

    AdamW's first update of a weight is -lr g / (|g| + eps) (no weight decay here): where |g| >= 99 eps it is
    within 1% of lr and the weights are compared (1e-6); below, a rounding of the gradient moves the update by a
    visible fraction of lr (on an AMD EPYC host one element of the feature encoder's first conv kernel, g ~ 2e-8:
    updates 6.476e-4 and 6.461e-4), so there the gradients the updates imply, eps f / (1 - f) for an update of
    f lr, are compared instead: within 1e-8 (measured 1.3e-9), the gradient being clipped to a norm of at most
    `max_grad_norm` (1). After the second step the weights are compared outside that regime and the attention key
    biases (gradient zero analytically)."""
    from flax_model.training import OptimizerSettings

    eps = OptimizerSettings(learning_rate=1.0, total_steps=1).eps
    settings = {**SETTINGS, "save_every": 0, "dropout": False}
    runs = {}
    for steps in (1, 2):
        for scan in (False, True):
            out = tmp_path / f"scan{scan}-{steps}"
            finetune.finetune(data["model"], data["train"], data["eval"], out,
                              FinetuneSettings(**{**settings, "max_steps": steps}, scan_layers=scan), verify=False,
                              progress=False, log=io.StringIO())
            log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            runs[steps, scan] = [entry["loss"] for entry in log if "loss" in entry], _params(out)
    assert json.loads((tmp_path / "scanTrue-2" / "training_report.json").read_text())["settings"]["scan_layers"]
    initial = _params(data["model"])
    for steps in (1, 2):
        (unrolled_losses, unrolled), (scanned_losses, scanned) = runs[steps, False], runs[steps, True]
        assert len(scanned_losses) == len(unrolled_losses) == steps
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(scanned_losses, unrolled_losses))
        assert loss_diff <= 1e-5, f"losses {scanned_losses} vs {unrolled_losses}: relative difference {loss_diff:.2e}"
        assert scanned.keys() == unrolled.keys() == initial.keys()
    (_, unrolled), (_, scanned) = runs[1, False], runs[1, True]
    lr = max(float(np.max(np.abs(unrolled[k] - initial[k]))) for k in initial)  # where |g| >> eps
    assert abs(lr - SETTINGS["learning_rate"]) <= 1e-6, lr  # no warmup: the first step's rate is the set one
    fraction = {k: np.abs(unrolled[k] - initial[k]) / lr for k in initial}
    regime = {k: f < 0.99 for k, f in fraction.items()}

    def implied(params: dict[str, np.ndarray], k: str) -> np.ndarray:
        f = np.minimum(np.abs(params[k] - initial[k]) / lr, 0.995)
        return eps * f / (1 - f)

    assert FinetuneSettings().max_grad_norm == 1.0
    diff, where = max((float(np.max(np.abs(implied(scanned, k) - implied(unrolled, k))[regime[k]], initial=0.0)), k)
                      for k in initial)
    assert diff <= 1e-8, f"the first step's gradients (implied by AdamW's updates) differ by {diff:.2e} (at {where})"
    # Two AdamW steps of 1e-3 move a weight by up to ~2e-3; the scanned and unrolled updates agree far closer.
    for steps, skipped in ((1, ()), (2, ("k_proj/bias",))):
        (_, unrolled), (_, scanned) = runs[steps, False], runs[steps, True]
        diff, where = max((float(np.max(np.abs(scanned[k] - unrolled[k])[~regime[k]], initial=0.0)), k)
                          for k in initial if not k.endswith(skipped))
        assert diff <= 1e-6, f"trained weights differ by {diff:.2e} after {steps} steps (at {where})"


@pytest.mark.default_emitters  # scanned and unrolled weights within 1e-6
def test_a_checkpoint_resumes_in_the_other_layer_layout(data, tmp_path):
    """With `--scan-layers` the state is stacked, checkpoints included; a run in the other layout resumes from such
    a checkpoint (or a stacked run from a per-layer one), its parameters, LoRA factors and AdamW moments converted:
    it ends where an uninterrupted run ends. LoRA on the encoder's and the decoder's layers, merged in the export."""
    settings = {**SETTINGS, "save_every": 0, "dropout": False, "lora_rank": 4, "lora_parts": ("encoder", "decoder")}

    def run(out: Path, scan: bool, stop_at: int | None = None, resume: bool = False) -> list[float]:
        stop = threading.Event()
        log = io.StringIO()
        finetune.finetune(data["model"], data["train"], data["eval"], out, FinetuneSettings(**settings, scan_layers=scan),
                          checkpoint_dir=tmp_path / f"{out.name}.checkpoints", resume=resume, stop=stop,
                          after_step=lambda step: stop.set() if step == stop_at else None, verify=False,
                          progress=False, log=log)
        assert ("resumed from" in log.getvalue()) == resume, log.getvalue()
        return [] if stop_at else [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text()
                                   .splitlines() if "loss" in json.loads(line)]

    straight_losses = run(tmp_path / "straight", scan=False)
    straight = _params(tmp_path / "straight")
    for first in (True, False):  # stacked checkpoint -> per-layer run; per-layer checkpoint -> stacked run
        out = tmp_path / f"first_scanned_{first}"
        run(out, scan=first, stop_at=2)
        # The checkpoint holds the state in its run's layout: `layers/attention/...` stacked, `layers/0/...` not.
        stored = json.loads((tmp_path / f"{out.name}.checkpoints" / "2" / "state" / "_METADATA").read_text())
        assert any("'layers', 'attention'" in key for key in stored["tree_metadata"]) == first
        losses = run(out, scan=not first, resume=True)
        # The log holds the whole run's losses: the first run's two, then the resumed run's.
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, straight_losses))
        assert len(losses) == 4 and rel <= 1e-5, f"losses {losses} vs {straight_losses}: {rel:.2e}"
        resumed = _params(out)
        assert resumed.keys() == straight.keys()
        diff, where = max((float(np.max(np.abs(resumed[k] - straight[k]))), k) for k in straight)
        assert diff <= 1e-6, f"trained weights differ by {diff:.2e} (at {where})"


def test_a_bfloat16_model_trains_float32_master_weights_and_is_written_back_in_bfloat16(data, tmp_path):
    """A composition stored in bfloat16 trains float32 master weights: its run ends where the same run from a
    float32 copy of the same values ends, rounded to bfloat16 once, at the export (rounded at every step, most of
    AdamW's updates, far below bfloat16's resolution, were lost)."""
    import shutil

    import jax
    import ml_dtypes

    from convert.base.checkpoint import Checkpoint
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(data["model"])
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), model.params)
    settings = FinetuneSettings(**{**SETTINGS, "save_every": 0, "dropout": False, "max_steps": 3})
    exported, reports = {}, {}
    for name, dtype in (("bfloat16", ml_dtypes.bfloat16), ("float32", np.float32)):
        start = tmp_path / name
        model.save_pretrained(start, params=jax.tree.map(lambda a: a.astype(dtype), rounded))
        for f in data["model"].iterdir():  # the tokenizer, the feature extractor's config, the compose report
            if not (start / f.name).exists():
                shutil.copyfile(f, start / f.name)
        out = tmp_path / f"{name}-out"
        finetune.finetune(start, data["train"], data["eval"], out, settings, verify=False, progress=False,
                          log=io.StringIO())
        checkpoint = Checkpoint(out, prefer=("model.safetensors",))
        exported[name] = {k: checkpoint.get(k) for k in checkpoint.keys()}
        reports[name] = json.loads((out / "training_report.json").read_text())["memory"]
    assert reports["bfloat16"]["parameter_bytes"] == 4 * reports["bfloat16"]["parameters"], reports  # float32 state
    assert exported["bfloat16"].keys() == exported["float32"].keys()
    assert {v.dtype for v in exported["bfloat16"].values()} == {np.dtype(ml_dtypes.bfloat16)}
    rounded_float32 = {k: v.astype(ml_dtypes.bfloat16).view(np.uint16) for k, v in exported["float32"].items()}
    differ = [k for k, v in exported["bfloat16"].items() if not np.array_equal(v.view(np.uint16), rounded_float32[k])]
    assert not differ, f"{len(differ)} tensors differ from the float32 run's, rounded: {differ[:3]}"


def test_a_bad_manifest_line_is_a_one_line_error(data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "x.wav", "text": "one"}\n')
    code = finetune.main(["--model", str(data["model"]), "--train", str(bad), "--eval", str(data["eval"]),
                          "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_ERROR and len(err) == 1, err
    assert err[0].startswith(f"error: {bad}:1: audio ") and "no such file" in err[0], err


@pytest.mark.parametrize("flag, value", [("--label-smoothing", "1.5"), ("--encoder-learning-rate", "0"),
                                         ("--seed", "-1"), ("--seed", "4294967296")])
def test_a_bad_setting_is_a_usage_error_naming_the_flag(data, tmp_path, capsys, flag, value):
    code = finetune.main(["--model", str(data["model"]), "--train", str(data["train"]), "--eval", str(data["eval"]),
                          "--output", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1 and err[0].startswith(f"error: {flag} "), err
    assert "must be" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_model_directory_without_config_is_a_usage_error_naming_the_flag(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = finetune.main(["--model", str(empty), "--train", str(data["train"]), "--eval", str(data["eval"]),
                          "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    expected = f"error: --model {empty}: not a composed model directory (no config.json)"
    assert code == cli.EXIT_USAGE and err == [expected], err


def test_labels_drop_the_start_token_and_end_with_eos(data):
    tokenizer = LabelTokenizer(data["model"], decoder_start_token_id=2, eos_token_id=2, vocab_size=320)
    ids = tokenizer.encode("one two")
    raw = tokenizer.tokenizer.encode("one two").ids
    assert ids == [*raw, 2] and tokenizer.decode(ids) == "one two"
    starting = LabelTokenizer(data["model"], decoder_start_token_id=raw[0], eos_token_id=2, vocab_size=320)
    assert starting.encode("one two") == [*raw[1:], 2]


def test_labels_start_with_the_token_generation_forces_first(data):
    """The built-in BART's generation forces <s> after the start token; its tokenizer does not add <s>. Trained
    without it, a model meets a context at generation that it never saw (every hypothesis came out empty)."""
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

    model = FlaxSpeechEncoderDecoderModel.from_pretrained(data["model"])
    forced = json.loads((data["model"] / "generation_config.json").read_text())["forced_bos_token_id"]
    tokenizer = LabelTokenizer.for_model(data["model"], model)
    raw = tokenizer.tokenizer.encode("one two").ids
    assert raw[0] != forced
    assert tokenizer.encode("one two") == [forced, *raw, model.config.eos_token_id]
    assert tokenizer.decode(tokenizer.encode("one two")) == "one two"
    plain = LabelTokenizer(data["model"], model.config.decoder_start_token_id, model.config.eos_token_id, 320)
    assert plain.encode("one two") == [*raw, model.config.eos_token_id]


def _cli_run(data: dict[str, Path], output: Path, *flags: str) -> int:
    return finetune.main(["--model", str(data["model"]), "--train", str(data["train"]), "--eval", str(data["eval"]),
                          "--output", str(output), "--max-steps", "2", "--batch-size", "2", "--num-buckets", "1",
                          "--eval-batch-size", "2", "--max-new-tokens", "2", "--no-progress", "--no-verify", *flags])


def test_a_bfloat16_run_traces_its_products_in_the_form_asked_and_says_so(data, tmp_path, capsys, monkeypatch):
    """`--dtype bfloat16 --bfloat16-products upcast`: every float32-sum product the run traces (its step and its
    evaluation) is traced in the upcast form; the log, the report and the model card say so; the process's form
    is restored after the run."""
    from flax_model import layers

    traced = []
    kept = layers.float32_sums
    monkeypatch.setattr(layers, "float32_sums", lambda *a: traced.append(layers.bfloat16_products()) or kept(*a))
    assert _cli_run(data, tmp_path / "out", "--dtype", "bfloat16", "--bfloat16-products", "upcast") == cli.EXIT_OK
    assert traced and set(traced) == {"upcast"}, set(traced)
    assert "bfloat16 products: operands upcast to float32 (as asked)" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert report["bfloat16_products"] == "upcast" and report["settings"]["bfloat16_products"] == "upcast"
    assert "products: operands upcast to float32" in (tmp_path / "out" / "README.md").read_text()
    assert layers.bfloat16_products() == layers.NATIVE


def test_the_compile_cache_hands_a_later_run_its_compiled_programs(data, tmp_path):
    """`--compile-cache DIR`: the first run writes its compiled programs there, a second run with the same
    settings compiles nothing new (every program read back) and trains the same weights; JAX's own setting is
    restored after each run."""
    import jax

    cache = tmp_path / "cache" / "xla"
    before = jax.config.jax_compilation_cache_dir
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the tiny programs compile in < 1 s
    try:
        assert _cli_run(data, tmp_path / "first", "--compile-cache", str(cache)) == cli.EXIT_OK
        assert jax.config.jax_compilation_cache_dir == before
        written = sorted(p.name for p in cache.iterdir())
        assert any(name.startswith("jit_") for name in written), written
        assert _cli_run(data, tmp_path / "second", "--compile-cache", str(cache)) == cli.EXIT_OK
        again = sorted(p.name for p in cache.iterdir())
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    assert again == written, f"programs compiled again: {sorted(set(again) - set(written))}"
    first, second = _params(tmp_path / "first"), _params(tmp_path / "second")
    assert all(np.array_equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("case", ["under_a_file", "with_no_cache"])
def test_a_bad_compile_cache_is_a_usage_error(data, tmp_path, capsys, case):
    blocker = tmp_path / "file"
    blocker.write_text("kept")
    flags = (["--compile-cache", str(blocker / "xla")] if case == "under_a_file"
             else ["--compile-cache", str(tmp_path / "c"), "--no-compile-cache"])
    code = _cli_run(data, tmp_path / "out", *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_USAGE and len(err) == 1 and "--compile-cache" in err[0], err
    assert blocker.read_text() == "kept" and not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags", [["--train-split", "train"], ["--eval-split", "validation"], ["--audio-column", "a"],
                                   ["--text-column", "text"], ["--streaming"], ["--dataset-config", "clean"]])
def test_a_dataset_flag_with_manifests_is_a_usage_error_naming_it(tmp_path, capsys, flags):
    """The dataset flags were ignored beside --train / --eval (even given their default values); without them the
    same command gets past the data flags (to the missing model)."""
    argv = ["--model", str(tmp_path / "nomodel"), "--train", str(tmp_path / "t.jsonl"), "--eval",
            str(tmp_path / "e.jsonl"), "--output", str(tmp_path / "out")]
    assert finetune.main([*argv, *flags]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {' '.join(flags)}: applies to --dataset"), err
    assert finetune.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model"), err


def test_a_non_finite_loss_stops_the_run_with_one_line_and_writes_nothing(data, tmp_path, capsys, monkeypatch):
    """A non-finite loss (a model with a NaN weight gives one) trained on and exported NaN weights with exit 0: the
    run stops at that step, names it and the likely causes, and writes no output. (The step's loss is made NaN
    here; a model with a NaN cross-attention kernel gives the same line from the real step.)"""
    monkeypatch.setattr(finetune_run.Run, "step", lambda self, state, number: (state, float("nan"), 0.5))
    assert _cli_run(data, tmp_path / "out") == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step 1: the training loss is nan (not finite)"), err
    assert "non-finite weights" in err[0] and "learning rate" in err[0] and "no checkpoint was saved" in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


def test_eval_ctc_weight_on_a_head_joint_decoding_cannot_use_is_refused_before_any_step(data, tmp_path, monkeypatch):
    """A CTC head with its own vocabulary cannot join the decoder's scores: refused when the run is set up (it was
    refused by the evaluation's generation, in its words, after the step-0 evaluation or after training); the case
    of no head at all is in test_safety_data's catalogue."""
    from convert.base.errors import UsageError
    from convert.compose import compose

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: 5 + i for i, c in enumerate("eghinorstuvwxz")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    compose("wav2vec2", "bart", tmp_path / "own", ctc_vocab=tmp_path / "vocab.json", verify=False, progress=False,
            log=io.StringIO())
    monkeypatch.setattr(finetune_run.Run, "step", lambda *a: pytest.fail("a step ran"))
    monkeypatch.setattr(finetune_run.Run, "evaluate", lambda *a: pytest.fail("an evaluation ran"))
    with pytest.raises(UsageError) as info:
        finetune.finetune(tmp_path / "own", data["train"], data["eval"], tmp_path / "out",
                          FinetuneSettings(**SETTINGS, eval_ctc_weight=0.3), verify=False, progress=False,
                          log=io.StringIO())
    assert info.value.param == "eval_ctc_weight" and str(info.value).startswith(
        "eval_ctc_weight=0.3: the model's CTC head has its own vocabulary"), info.value
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


def test_ctc_targets_longer_than_the_audio_allows_are_refused_naming_the_line(data, tmp_path):
    """With zero_infinity (a --ctc-head decoder head's setting), a transcript whose CTC labels cannot be aligned
    with the utterance's encoder frames gave a CTC loss of 0 and trained nothing, silently: refused when the run is
    set up, naming the manifest line, the labels and the frames."""
    from convert.compose import compose
    from convert.training_data import DataError

    compose("wav2vec2", "bart", tmp_path / "ctc", ctc_head="decoder", verify=False, progress=False, log=io.StringIO())
    assert json.loads((tmp_path / "ctc" / "config.json").read_text())["ctc"]["zero_infinity"] is True
    lines = (data["train"]).read_text().splitlines()
    long = json.loads(lines[1])
    long["text"] = "one two three four five six seven eight nine zero"
    train = data["root"] / "long_ctc.jsonl"  # beside the audio its lines name
    train.write_text("\n".join([lines[0], json.dumps(long), *lines[2:]]) + "\n")
    with pytest.raises(DataError) as info:
        finetune.finetune(tmp_path / "ctc", train, data["eval"], tmp_path / "out",
                          FinetuneSettings(**SETTINGS, ctc_weight=0.3), verify=False, progress=False,
                          log=io.StringIO())
    message = str(info.value)
    assert message.startswith(f"{train}:2: its ") and "CTC labels need" in message, message
    assert "encoder frames: its CTC loss would be 0 (zero_infinity) and train nothing" in message, message
    assert not (tmp_path / "out").exists()


def test_audio_too_short_is_named_once_with_its_true_length(data, tmp_path, monkeypatch):
    """A zero-sample WAV in a dataset row was `ROW: ROW (FILE) has 1 samples` (the row named twice, the length
    rounded up to 1): the row once, its file, and the samples it has; a manifest's file likewise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from convert.base.errors import ConvertError
    from convert.datasets_source import DatasetSource

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    wav = io.BytesIO()
    soundfile.write(wav, np.zeros(0, np.float32), 16000, format="WAV")
    pq.write_table(pa.table({"audio": [{"bytes": wav.getvalue(), "path": "zero.wav"}], "text": ["one"]}),
                   tmp_path / "zero.parquet")
    (tmp_path / "zero.wav").write_bytes(wav.getvalue())
    (tmp_path / "zero.jsonl").write_text(json.dumps({"audio": "zero.wav", "text": "one"}) + "\n")
    dataset = DatasetSource(str(tmp_path / "zero.parquet"))
    for train, where, audio in ((dataset, f"{dataset}:0", "its audio (zero.wav)"),
                                (tmp_path / "zero.jsonl", f"{tmp_path / 'zero.jsonl'}:1", tmp_path / "zero.wav")):
        with pytest.raises(ConvertError) as info:
            finetune.finetune(data["model"], train, data["eval"], tmp_path / "out", FinetuneSettings(**SETTINGS),
                              verify=False, progress=False, log=io.StringIO())
        assert str(info.value).startswith(f"{where}: {audio} has 0 samples, too short for the encoder"), info.value


def test_help_gives_every_option_a_text_and_every_default():
    """The README says --help shows every default: every option has a help text, each that has a default value
    shows it, and --max-new-tokens (computed from the data) says what it is."""
    import argparse

    parser = finetune.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help" or not action.option_strings:
            continue
        text = formatter._get_help_string(action)
        assert action.help, f"{action.option_strings[0]} has no help text"
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        if action.default is not None and not switch:
            assert "default" in text.lower(), f"{action.option_strings[0]}: {text!r}"
    help_text = " ".join(parser.format_help().split())
    assert "--max-new-tokens N most tokens generated in evaluation (default: twice the longest training label" \
        in help_text, help_text
