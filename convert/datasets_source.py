"""Speech data from 🤗 `datasets`: Hub datasets and local ones (parquet, arrow, audiofolder) as utterances for
fine-tuning (`convert.finetune --dataset`) and transcription (`convert.generate --dataset`).

Rows are read through the `datasets` library; their audio is not decoded by it: the audio column is read as the
file's bytes or path (`Audio(decode=False)`) and decoded and resampled by `convert.base.audio`, as manifests' files
are. A NAME_OR_PATH is, in order: a directory written by `save_to_disk` (arrow), a `.parquet` / `.arrow` file, a
local directory (`load_dataset` finds its builder: audiofolder, parquet, ...), or a Hub dataset id (the Hub cache,
`HF_HUB_OFFLINE` honoured). `streaming` reads the split row by row without preparing it in the datasets cache; the
rows' audio is kept in memory (fine-tuning reads every utterance each epoch).

datasets 4 and 5 ask for `torchcodec` (and FFmpeg) even to store an audio file's path or bytes unchanged, which a
local audiofolder needs while it is prepared; this toolkit decodes audio itself, so while it reads a dataset without
torchcodec installed, those values pass through as datasets stores them (`_audio_passthrough`), and anything that
would need encoding (arrays) still fails as datasets makes it fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convert.base.audio import AudioBytes
from convert.base.errors import ConvertError, bad_argument
from convert.base.unicode_text import not_unicode


class DatasetError(ConvertError):
    """A dataset, split, column or row that cannot be used."""


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """One split of a dataset, and where its audio and text are.

    Attributes:
        name: a Hub dataset id or a local path (see the module docstring).
        config: the dataset's configuration (`load_dataset`'s second argument), if it has several.
        split: the split to read.
        audio_column: the column holding the audio (an `Audio` feature, a `{"bytes", "path"}` struct, or a path).
        text_column: the column holding the transcript (None: no text, for transcription without references).
        streaming: read row by row instead of preparing the dataset in the datasets cache.
    """

    name: str
    config: str | None = None
    split: str = "train"
    audio_column: str = "audio"
    text_column: str | None = "text"
    streaming: bool = False

    def __str__(self) -> str:
        return f"{self.name}" + (f" ({self.config})" if self.config else "") + f"[{self.split}]"


@dataclasses.dataclass(frozen=True)
class Row:
    """One utterance: its audio (a local path or the bytes), its transcript, and where it was read."""

    audio: Path | AudioBytes
    text: str | None
    where: str


SINGLE_FILE_SPLIT = "train"  # the one split of a single .parquet / .arrow file (`load_dataset(builder, data_files=f)`)
_COLUMN_DEFAULTS = {"audio_column": "audio", "text_column": "text"}


def add_arguments(group: Any, splits: tuple[tuple[str, str, str], ...], what: str) -> None:
    """The command-line flags of a dataset source: --dataset, --dataset-config, the split flags ((flag, default,
    help) each), --audio-column, --text-column (`what` the text is) and --streaming.

    Every flag but --dataset defaults to None (its default stated in its help, the split flags' defaults recorded
    in `dataset_split_defaults`), so that `source_from_arguments` and `given_without_dataset` can tell a flag given
    from a default."""
    group.add_argument("--dataset", metavar="NAME_OR_PATH",
                       help="a Hub dataset id or a local dataset (save_to_disk directory, parquet / arrow file, "
                       "audiofolder or parquet directory); audio decoded by the toolkit's reader")
    group.add_argument("--dataset-config", metavar="C", help="the dataset's configuration (a Hub dataset or a "
                       "dataset directory that load_dataset reads)")
    defaults = {}
    for flag, default, text in splits:
        action = group.add_argument(flag, metavar="S", help=f"{text} (default: {default}; a single .parquet / "
                                    f".arrow file holds one split, {SINGLE_FILE_SPLIT})")
        defaults[action.dest] = default
    group.set_defaults(dataset_split_defaults=defaults)
    group.add_argument("--audio-column", metavar="COL",
                       help=f"the column holding the audio (default: {_COLUMN_DEFAULTS['audio_column']})")
    group.add_argument("--text-column", metavar="COL",
                       help=f"the column holding {what} (default: {_COLUMN_DEFAULTS['text_column']})")
    group.add_argument("--streaming", action="store_true",
                       help="read row by row instead of preparing the dataset in the datasets cache")


def given_without_dataset(args: Any) -> str | None:
    """The first flag of `add_arguments` (but --dataset) that the command line gave while it gave no --dataset, as
    its parameter name (`train_split`), or None: those flags apply to --dataset only."""
    if args.dataset is not None:
        return None
    names = ["dataset_config", *getattr(args, "dataset_split_defaults", {}), *_COLUMN_DEFAULTS]
    given = [name for name in names if getattr(args, name, None) is not None]
    if getattr(args, "streaming", False):
        given.append("streaming")
    return given[0] if given else None


def source_from_arguments(args: Any, split: str | None) -> DatasetSource:
    """The `DatasetSource` the flags of `add_arguments` name, for one split: `split` as given, or None for the
    default of the command's (one) split flag, which for a single .parquet / .arrow file is its one split."""
    if split is None:
        defaults = list(getattr(args, "dataset_split_defaults", {}).values())
        split = (SINGLE_FILE_SPLIT if _single_file(Path(args.dataset).expanduser()) or len(defaults) != 1
                 else defaults[0])
    columns = {name: getattr(args, name) if getattr(args, name) is not None else default
               for name, default in _COLUMN_DEFAULTS.items()}
    return DatasetSource(args.dataset, args.dataset_config, split, columns["audio_column"], columns["text_column"],
                         args.streaming)


def _single_file(path: Path) -> bool:
    return path.is_file() and path.suffix in (".parquet", ".arrow")


def _looks_like_a_path(name: str) -> bool:
    """A NAME_OR_PATH that a Hub id cannot be (`owner/name` or `name`): absolute, relative with ./ or ../, from ~,
    with two slashes or more, a backslash, or a data file's suffix."""
    return (name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1
            or "\\" in name or Path(name).suffix in (".parquet", ".arrow", ".jsonl", ".json", ".csv"))


def read_rows(source: DatasetSource, require_text: bool = True) -> list[Row]:
    """Every row of the split, its audio as a path or bytes (nothing is decoded). Without `require_text` a split
    that lacks the text column gives rows without text (transcription without references).

    Raises:
        DatasetError: one line naming the dataset, split, column or row: a dataset or split that cannot be
            loaded, a missing column, a row without audio or (with `require_text`) without a transcript.
    """
    if not isinstance(source.name, str) or not source.name.strip():
        raise bad_argument("dataset", repr(source.name), "is not a dataset (a Hub id or a local path)")
    with _audio_passthrough(), _progress_bars_only_on_a_terminal():
        dataset = _load(source)
        columns = list(dataset.column_names or ()) if getattr(dataset, "column_names", None) else None
        text_column = source.text_column
        if columns is not None and text_column is not None and text_column not in columns and not require_text:
            text_column = None  # transcription without references
        for column in (source.audio_column, text_column):
            if column is not None and columns is not None and column not in columns:
                flag = "audio_column" if column == source.audio_column else "text_column"
                raise DatasetError(f"{source}: no column {column!r} (columns: {', '.join(columns)}; pass {flag}=...)")
        dataset = _undecoded(dataset, source.audio_column)
        rows = []
        for index, item in enumerate(_iterate(dataset, source)):
            where = f"{source}:{index}"
            if source.audio_column not in item:
                raise DatasetError(f"{where}: no column {source.audio_column!r} (columns: {', '.join(item)})")
            text = None
            if text_column is not None:
                text = item.get(text_column)
                if text is not None and not isinstance(text, str):
                    raise DatasetError(f"{where}: {text_column!r} is {type(text).__name__}, not a string")
                if text is not None and not_unicode(text):
                    raise DatasetError(f"{where}: {text_column!r} {not_unicode(text)}")
                if require_text and (text is None or not text.strip()):
                    raise DatasetError(f"{where}: {text_column!r} must be a non-empty string")
            rows.append(Row(_audio_of(item[source.audio_column], where), text, where))
    if not rows:
        raise DatasetError(f"{source}: the split holds no rows")
    return rows


@contextlib.contextmanager
def _progress_bars_only_on_a_terminal() -> Iterator[None]:
    """The `datasets` library's own progress bars (building a split, reading files) drawn only where the toolkit
    draws its own: on a terminal (`cli.show_progress`), never as half-drawn lines in a log."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from convert import cli

    was_disabled = are_progress_bars_disabled()
    if not cli.show_progress():
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _load(source: DatasetSource) -> Any:
    """The split as a `datasets` Dataset or IterableDataset."""
    import datasets

    path = Path(source.name).expanduser()
    kwargs: dict[str, Any] = {"split": source.split, "streaming": source.streaming}
    saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
    if not path.exists() and _looks_like_a_path(source.name):
        raise DatasetError(f"{source.name}: no such file or directory")
    if source.config is not None and (saved or _single_file(path)):
        what = "a save_to_disk directory" if saved else f"a single {path.suffix} file"
        raise bad_argument("dataset_config", source.config, f"{source.name} is {what}, which has no configurations")
    if _single_file(path) and source.split != SINGLE_FILE_SPLIT:
        raise DatasetError(f"{source.name}: no split {source.split!r}: a single {path.suffix} file holds one split, "
                           f"{SINGLE_FILE_SPLIT!r}")
    try:
        if saved:
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise DatasetError(f"{source}: no split {source.split!r} (splits: {', '.join(loaded)})")
                loaded = loaded[source.split]
            return loaded.to_iterable_dataset() if source.streaming else loaded
        if _single_file(path):
            builder = path.suffix[1:]
            return datasets.load_dataset(builder, data_files={SINGLE_FILE_SPLIT: str(path)}, **kwargs)
        return datasets.load_dataset(str(path) if path.exists() else source.name, source.config, **kwargs)
    except DatasetError:
        raise
    except ValueError as e:
        if "split" in str(e).lower() or "Unknown split" in str(e):
            raise DatasetError(f"{source}: no split {source.split!r} ({_one_line(e)})") from None
        raise DatasetError(f"{source}: cannot be loaded ({_one_line(e)})") from None
    except (FileNotFoundError, OSError, ImportError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DatasetError(f"{source}: cannot be loaded ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (DatasetGenerationError, HTTP errors, ...)
        raise DatasetError(f"{source}: cannot be loaded ({type(e).__name__}: {_one_line(e)})") from None


def _undecoded(dataset: Any, column: str) -> Any:
    """The dataset with its audio column read as bytes / path (`Audio(decode=False)`), when it is an Audio column."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    if isinstance(features.get(column), datasets.Audio):
        return dataset.cast_column(column, datasets.Audio(decode=False))
    return dataset


def _iterate(dataset: Any, source: DatasetSource) -> Iterator[dict[str, Any]]:
    try:
        yield from dataset
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the builder raises while reading rows
        raise DatasetError(f"{source}: a row cannot be read ({type(e).__name__}: {_one_line(e)})") from None


def _audio_of(value: Any, where: str) -> Path | AudioBytes:
    """A row's audio as a local file or its bytes."""
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: the audio is {type(value).__name__}, not a file (bytes or a path)")
    data, path = value.get("bytes"), value.get("path")
    if data:
        return AudioBytes(bytes(data), f"{where} ({path})" if path else where)
    if path and Path(path).is_file():
        return Path(path)
    raise DatasetError(f"{where}: the audio has no bytes, and its path {path!r} is not a local file")


@contextlib.contextmanager
def _audio_passthrough() -> Iterator[None]:
    """Without torchcodec, `datasets.Audio.encode_example` stores paths and bytes as datasets would (it refuses
    to without torchcodec, though it does not use it for them); restored on leaving."""
    import importlib.util

    import datasets

    if importlib.util.find_spec("torchcodec") is not None:
        yield
        return
    original = datasets.Audio.encode_example

    def encode_example(self: Any, value: Any) -> dict:
        if isinstance(value, (str, Path)):
            return {"bytes": None, "path": str(Path(value).absolute()) if isinstance(value, Path) else value}
        if isinstance(value, (bytes, bytearray)):
            return {"bytes": bytes(value), "path": None}
        if isinstance(value, dict) and "array" not in value and (value.get("bytes") is not None
                                                                  or value.get("path") is not None):
            return {"bytes": value.get("bytes"), "path": value.get("path")}
        return original(self, value)

    datasets.Audio.encode_example = encode_example
    try:
        yield
    finally:
        datasets.Audio.encode_example = original


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__
