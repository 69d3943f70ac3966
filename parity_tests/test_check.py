"""`python -m convert.check`: passes on a good composed model, fails with the figure on a bad one.

The command runs in this process (`convert.check.main`, its output read from stdout) where what is checked is what
it computes and prints; one test starts it as `python -m convert.check` (the entry point, the exit status and the
one-line error on stderr)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import check as check_command
from convert.check import check

REPO = Path(__file__).resolve().parent.parent


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert.check", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def write_wav(path: Path, seconds: float, seed: int) -> Path:
    samples = (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 3000).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(samples.tobytes())
    return path


def main_check(capsys, *args: str) -> tuple[int, str]:
    """`convert.check.main(args)` in this process: (exit status, what it printed on stdout)."""
    capsys.readouterr()
    code = check_command.main(list(args))
    out, err = capsys.readouterr()
    assert err == "" or code != 0, err
    return code, out + err


@pytest.mark.default_emitters  # the check users run
def test_check_passes_on_a_good_composed_model(composed_dir, capsys):
    code, out = main_check(capsys, str(composed_dir("w2v_stable_wide", "gpt2_lm")), "--json")
    assert code == 0, out
    figures = json.loads(out)
    assert figures["passed"] and [c["passed"] for c in figures["checks"]] == [True, True, True, True]
    logits = next(c for c in figures["checks"] if c["name"].startswith("max |Δlogits|"))
    # Flax's error from the float64 reference, next to the float32 reference's own: both rounding-sized.
    assert 0 <= logits["flax_error"] <= logits["bound"] and logits["flax_error"] <= 1e-5, logits
    assert 0 < logits["reference_error"] <= 1e-5, logits


def test_check_fails_with_the_figure_when_weight_files_disagree(composed_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(composed_dir("w2v_group_adapter", "bart_cg"), bad)
    tensors = load_file(bad / "model.safetensors")
    key = "decoder.model.decoder.layers.0.fc1.weight"
    tensors[key] = tensors[key] + np.float32(0.25)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    code, out = main_check(capsys, str(bad))
    assert code == 1, out
    assert "flax_model.msgpack == model.safetensors" in out
    assert "1 differ (max |Δ| 2.500e-01)" in out
    # The text output names the tensor and by how much it differs.
    assert f"{key}: max |Δ| 2.500e-01, " in out, out
    assert "FAIL" in out and "FAILED" in out
    logits_line = next(line for line in out.splitlines() if "max |Δlogits|" in line)
    assert logits_line.rstrip().endswith("FAIL"), logits_line
    assert float(logits_line.split()[6]) > 1e-3, logits_line


def test_check_runs_on_wav_files_greedily_whatever_the_generation_config_asks(composed_dir, tmp_path):
    wavs = [write_wav(tmp_path / "a.wav", 0.5, 1), write_wav(tmp_path / "b.wav", 0.3, 2)]
    result = check(str(composed_dir("w2v_group_adapter", "bart_cg")), audio=wavs, max_new_tokens=5)
    assert result["passed"], result
    greedy = result["checks"][-1]
    assert len(greedy["flax"]) == 2 and greedy["flax"] == greedy["torch"]
    # A model whose generation config samples with beams is still compared greedily (no key needed, same tokens).
    sampling = tmp_path / "sampling"
    shutil.copytree(composed_dir("w2v_group_adapter", "bart_cg"), sampling)
    config = json.loads((sampling / "generation_config.json").read_text())
    config.update(do_sample=True, num_beams=3, num_return_sequences=2, top_k=5)
    (sampling / "generation_config.json").write_text(json.dumps(config))
    again = check(str(sampling), audio=wavs, max_new_tokens=5)
    assert again["passed"], again
    assert again["checks"][-1]["flax"] == greedy["flax"], (again["checks"][-1], greedy)


def test_check_of_a_missing_directory_is_a_one_line_error(tmp_path):
    result = run_check(str(tmp_path / "nothing-here"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "nothing-here" in result.stderr


def test_check_fails_when_a_weight_file_is_missing_unless_the_format_is_restricted(composed_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(composed_dir("w2v_group_adapter", "bart_cg"), partial)
    (partial / "flax_model.msgpack").unlink()
    failed = check(str(partial), max_new_tokens=2)
    assert not failed["passed"] and failed["checks"][0]["missing"] == ["flax_model.msgpack"], failed
    assert len(failed["checks"]) == 1  # nothing is judged from a partial directory
    restricted = check(str(partial), weights="safetensors", max_new_tokens=2)
    assert restricted["passed"], restricted
    assert [c["name"].split()[0] for c in restricted["checks"]] == ["weight", "max", "greedy"]


def test_a_broken_generation_config_is_refused_before_any_background_work(composed_dir, tmp_path, monkeypatch):
    """The command used to abort (exit 134, "terminate called without an active exception") when the generation
    config was refused while its background threads were inside PyTorch or XLA: it is now read first, and an error
    in the block waits for those threads (`convert.verify.settling`)."""
    import threading
    import time

    from convert import verify
    from convert.base.errors import ConvertError

    broken = tmp_path / "broken"
    shutil.copytree(composed_dir("w2v_group_adapter", "bart_cg"), broken)
    config = json.loads((broken / "generation_config.json").read_text())
    (broken / "generation_config.json").write_text(json.dumps({**config, "num_beams": "four"}))
    started = []
    monkeypatch.setattr(verify.InBackground, "__init__", lambda self, fn, *args: started.append(fn))
    with pytest.raises(ConvertError, match=r"generation_config\.json: num_beams=four"):
        check(str(broken), max_new_tokens=2)
    assert started == []
    monkeypatch.undo()

    ended = threading.Event()
    slow = verify.InBackground(lambda: (time.sleep(0.3), ended.set()))
    with pytest.raises(ValueError, match="in the block"), verify.settling(None, slow):
        raise ValueError("in the block")
    assert ended.is_set()


def test_check_refuses_a_broken_tokenizer_or_preprocessor_config_beside_the_weights(composed_dir, tmp_path):
    """`convert.check` used to pass a directory whose tokenizer.json or preprocessor config was broken (generation
    then failed on it): both are read, and refused in one line naming the file."""
    from convert.base.errors import ConvertError

    broken = tmp_path / "broken"
    shutil.copytree(composed_dir("w2v_group_adapter", "bart_cg"), broken)
    (broken / "tokenizer.json").write_text("garbage{")
    with pytest.raises(ConvertError, match=rf"^{broken / 'tokenizer.json'}: not a tokenizers file \("):
        check(str(broken), max_new_tokens=2)
    (broken / "tokenizer.json").unlink()
    (broken / "preprocessor_config.json").write_text(json.dumps({"do_normalize": "false"}))
    with pytest.raises(ConvertError, match=rf'^{broken / "preprocessor_config.json"}: do_normalize="false" is not '
                                           r"true or false$"):
        check(str(broken), max_new_tokens=2)


def test_check_notes_an_adapter_it_does_not_apply(composed_dir, tmp_path, capsys):
    """A directory `convert.finetune --lora-export adapter` wrote holds the base weights and `adapter/`: the check
    runs the base weights, and says so rather than passing in silence."""
    with_adapter = tmp_path / "with_adapter"
    shutil.copytree(composed_dir("w2v_group_adapter", "bart_cg"), with_adapter)
    (with_adapter / "adapter").mkdir()
    code, out = main_check(capsys, str(with_adapter), "--max-new-tokens", "2")
    assert code == 0, out
    assert f"note: {with_adapter / 'adapter'} holds a LoRA adapter: these checks ran the base weights without it" in out
