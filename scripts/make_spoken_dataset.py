"""Synthesises a small spoken-digits dataset with espeak-ng, with voices held out for evaluation.

    apt-get install -y espeak-ng        # Debian / Ubuntu: the speech synthesiser this script runs
    python scripts/make_spoken_dataset.py OUTDIR [--train 1500] [--eval 150] [--digits 2-5] [--seed 0]

Each utterance is a string of 2 to 5 digits (`--digits MIN-MAX`; `1-1` gives isolated digits) read as words ("three one four"), spoken by an espeak-ng voice (an
accent plus a voice variant), at a random speaking rate (words per minute) and pitch, resampled to 16 kHz mono
WAV. Training and evaluation use different voices, so the held-out WER measures how well a model generalises to
speakers it never heard. OUTDIR gets `wav/`, `train.jsonl` and `eval.jsonl` (manifest lines
`{"audio": "wav/NAME.wav", "text": "three one four"}`, as `convert.finetune` reads them), and `voices.json`
listing which voices went where. The same seed writes the same dataset.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import soxr

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 16000
# (accent, variant) pairs. Training hears these; evaluation hears the held-out ones only.
TRAIN_VOICES = tuple((accent, variant) for accent in ("en-us", "en-gb", "en-gb-scotland", "en-029")
                     for variant in ("m1", "m3", "m5", "f1", "f3", "klatt", "klatt3"))
EVAL_VOICES = (("en-gb-x-rp", "m2"), ("en-us-nyc", "f2"), ("en-gb-x-gbclan", "m4"), ("en-us", "f4"),
               ("en-gb", "m6"), ("en-029", "klatt2"))
RATES = (120, 200)  # words per minute (espeak-ng -s)
PITCHES = (25, 75)  # espeak-ng -p, 0-99


def synthesise(text: str, voice: str, rate: int, pitch: int, path: Path, workdir: Path) -> float:
    """Speaks `text` into a 16 kHz mono WAV at `path`; returns its duration in seconds."""
    raw = workdir / "raw.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(raw), text],
                   check=True, capture_output=True)
    samples, rate_hz = soundfile.read(str(raw), dtype="float32")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    samples = soxr.resample(samples, rate_hz, SAMPLE_RATE) if rate_hz != SAMPLE_RATE else samples
    soundfile.write(str(path), samples, SAMPLE_RATE, subtype="PCM_16")
    return len(samples) / SAMPLE_RATE


def digit_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        low_n, high_n = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX (e.g. 2-5), got {text!r}") from None
    if not 1 <= low_n <= high_n:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return low_n, high_n


def make_split(name: str, count: int, voices: tuple[tuple[str, str], ...], outdir: Path,
               rng: np.random.Generator, workdir: Path, digits_range: tuple[int, int]) -> list[dict]:
    lines = []
    for i in range(count):
        digits = rng.integers(0, 10, rng.integers(digits_range[0], digits_range[1] + 1))
        text = " ".join(DIGITS[d] for d in digits)
        accent, variant = voices[i % len(voices)]
        rate, pitch = int(rng.integers(*RATES)), int(rng.integers(*PITCHES))
        wav = Path("wav") / f"{name}_{i:05d}.wav"
        seconds = synthesise(text, f"{accent}+{variant}", rate, pitch, outdir / wav, workdir)
        lines.append({"audio": str(wav), "text": text, "voice": f"{accent}+{variant}", "rate": rate,
                      "pitch": pitch, "seconds": round(seconds, 3)})
    with (outdir / f"{name}.jsonl").open("w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--train", type=int, default=1500, help="training utterances")
    parser.add_argument("--eval", type=int, default=150, help="held-out utterances (held-out voices)")
    parser.add_argument("--digits", type=digit_range, default=(2, 5), metavar="MIN-MAX",
                        help="digits per utterance (default: 2-5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("error: espeak-ng is not installed (Debian/Ubuntu: apt-get install -y espeak-ng)", file=sys.stderr)
        return 1
    (args.outdir / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        train = make_split("train", args.train, TRAIN_VOICES, args.outdir, rng, Path(tmp), args.digits)
        held_out = make_split("eval", args.eval, EVAL_VOICES, args.outdir, rng, Path(tmp), args.digits)
    (args.outdir / "voices.json").write_text(json.dumps(
        {"train": ["+".join(v) for v in TRAIN_VOICES], "eval": ["+".join(v) for v in EVAL_VOICES]}, indent=2))
    for name, lines in (("train", train), ("eval", held_out)):
        print(f"{args.outdir / (name + '.jsonl')}: {len(lines)} utterances, "
              f"{sum(x['seconds'] for x in lines) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
