"""🤗 datasets as a data source: local audiofolder, parquet and arrow datasets made here (no network), their audio
decoded by the toolkit's reader (`convert.base.audio`), bad columns and splits refused by name."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile

from convert.base.audio import load_audio
from convert.datasets_source import DatasetError, DatasetSource, read_rows

WORDS = ("one two", "three", "four five six", "seven", "eight nine", "zero one")


def _tone(i: int, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32)


def make_audiofolder(root: Path, rate: int = 16000) -> Path:
    """train/ (6 utterances) and validation/ (2), each with its metadata.csv (file_name, text)."""
    for split, texts in (("train", WORDS), ("validation", WORDS[:2])):
        (root / split).mkdir(parents=True)
        with (root / split / "metadata.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "text"])
            for i, text in enumerate(texts):
                soundfile.write(root / split / f"{i}.wav", _tone(i, rate, 0.3 + 0.05 * len(text.split())), rate)
                writer.writerow([f"{i}.wav", text])
    return root


def make_parquet(path: Path, rate: int = 8000) -> Path:
    """Three utterances whose audio is stored as FLAC bytes at 8 kHz in the file (HF's Audio storage: a struct of
    bytes and path), with a `sentence` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio = []
    for i in range(3):
        buffer = io.BytesIO()
        soundfile.write(buffer, _tone(i, rate, 0.4), rate, format="FLAC")
        audio.append({"bytes": buffer.getvalue(), "path": f"{i}.flac"})
    table = pa.table({"audio": audio, "sentence": list(WORDS[:3])})
    pq.write_table(table, path)
    return path


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_an_audiofolder_gives_its_splits_rows_decoded_by_the_toolkit(tmp_path):
    root = make_audiofolder(tmp_path / "folder")
    for streaming in (False, True):
        rows = read_rows(DatasetSource(str(root), split="validation", streaming=streaming))
        assert [r.text for r in rows] == list(WORDS[:2])
        assert [Path(r.audio).name for r in rows] == ["0.wav", "1.wav"]
        assert np.array_equal(load_audio(rows[1].audio, 16000), load_audio(root / "validation" / "1.wav", 16000))
    with pytest.raises(DatasetError, match=r"no split 'test'"):
        read_rows(DatasetSource(str(root), split="test"))
    with pytest.raises(DatasetError, match=r"no column 'sentence' \(columns: audio, text; pass text_column=...\)"):
        read_rows(DatasetSource(str(root), text_column="sentence"))


def test_parquet_audio_bytes_are_decoded_and_resampled_by_the_toolkit(tmp_path, capfd):
    path = make_parquet(tmp_path / "data.parquet")
    rows = read_rows(DatasetSource(str(path), text_column="sentence"))
    # stderr is no terminal here: the datasets library draws none of its bars ("Generating train split: ...").
    assert capfd.readouterr().err == ""
    assert [r.text for r in rows] == list(WORDS[:3])
    expected = io.BytesIO()
    soundfile.write(expected, _tone(2, 8000, 0.4), 8000, format="FLAC")
    (tmp_path / "2.flac").write_bytes(expected.getvalue())
    ours = load_audio(rows[2].audio, 16000)
    assert ours.shape == (6400,) and np.array_equal(ours, load_audio(tmp_path / "2.flac", 16000))
    assert str(rows[2].audio) == f"{path}[train]:2 (2.flac)"
    # Without the text column, transcription reads the rows without references; training refuses them.
    assert [r.text for r in read_rows(DatasetSource(str(path)), require_text=False)] == [None] * 3
    with pytest.raises(DatasetError, match="no column 'text'"):
        read_rows(DatasetSource(str(path)))


def test_a_saved_arrow_dataset_is_read_from_disk(tmp_path):
    import datasets

    rows = read_rows(DatasetSource(str(make_parquet(tmp_path / "data.parquet")), split="train",
                                   text_column="sentence"))
    table = datasets.Dataset.from_dict({"speech": [{"bytes": r.audio.data, "path": None} for r in rows],
                                        "words": [r.text for r in rows]})
    datasets.DatasetDict({"validation": table}).save_to_disk(str(tmp_path / "arrow"))
    again = read_rows(DatasetSource(str(tmp_path / "arrow"), split="validation", audio_column="speech",
                                    text_column="words"))
    assert [r.text for r in again] == [r.text for r in rows]
    assert [r.audio.data for r in again] == [r.audio.data for r in rows]
    with pytest.raises(DatasetError, match=r"no split 'train' \(splits: validation\)"):
        read_rows(DatasetSource(str(tmp_path / "arrow"), split="train", audio_column="speech", text_column="words"))


def test_a_single_file_answers_only_to_its_one_split_train(tmp_path):
    """`load_dataset("parquet", data_files=FILE)` calls a single file's rows `train`: another split name is refused
    (it was answered with the same rows, so a run evaluated on its training rows), naming the file and the split;
    a command's default split (generate's `--split test`) means the file's one split."""
    import argparse

    from convert.datasets_source import add_arguments, source_from_arguments

    path = make_parquet(tmp_path / "data.parquet")
    for split in ("test", "validation"):
        with pytest.raises(DatasetError) as info:
            read_rows(DatasetSource(str(path), split=split, text_column="sentence"))
        assert str(info.value) == (f"{path}: no split {split!r}: a single .parquet file holds one split, 'train'")
    parser = argparse.ArgumentParser()
    add_arguments(parser, (("--split", "test", "the split"),), "the references")
    assert source_from_arguments(parser.parse_args(["--dataset", str(path)]), None).split == "train"
    assert source_from_arguments(parser.parse_args(["--dataset", str(tmp_path)]), None).split == "test"
    given = parser.parse_args(["--dataset", str(path), "--split", "test"])
    with pytest.raises(DatasetError, match="no split 'test'"):
        read_rows(source_from_arguments(given, given.split))


def test_a_missing_local_path_and_a_config_a_local_file_cannot_have_are_refused(tmp_path):
    from convert.base.errors import UsageError

    for name in ("./nope_dir", str(tmp_path / "nope"), "~/nope/x", "nope.parquet"):
        with pytest.raises(DatasetError) as info:
            read_rows(DatasetSource(name))
        assert str(info.value) == f"{name}: no such file or directory"
    path = make_parquet(tmp_path / "data.parquet")
    with pytest.raises(UsageError, match=r"^dataset_config=clean: .*data.parquet is a single .parquet file, which "
                       "has no configurations$"):
        read_rows(DatasetSource(str(path), config="clean", text_column="sentence"))
