"""A decoder's `tokenizer.json` (the `tokenizers` package), read once and refused in one line when it is not one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.base.errors import CheckpointError, ConvertError

TOKENIZER_FILE = "tokenizer.json"


def read_tokenizer(path: str | Path, error: type[ConvertError] = CheckpointError, vocab_size: int | None = None,
                   where: str | None = None, param: str | None = None) -> Any:
    """The `tokenizers.Tokenizer` of `path`.

    Args:
        path: a `tokenizer.json`.
        error: the error class to refuse it with (a checkpoint's file, a training run's data, ...).
        vocab_size: the decoder's vocabulary (its embedding's rows): a tokenizer that makes ids at or beyond it
            is refused (it belongs to another model).
        where: how the message names the file (default: its path).
        param: the API parameter the error is about, if any.

    Raises:
        `error`: not a tokenizers file, or ids beyond `vocab_size`; one line naming the file.
    """
    from tokenizers import Tokenizer

    where = where or str(path)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers package raises a bare Exception for a malformed file
        raise error(f"{where}: not a tokenizers file ({str(e).splitlines()[0]})", param=param) from None
    if vocab_size is not None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        largest = max(vocab.values(), default=-1)
        if largest >= vocab_size:
            token = next(t for t, i in vocab.items() if i == largest)
            raise error(f"{where}: makes token ids up to {largest} ({token!r}), but the decoder has {vocab_size} "
                        "(vocab_size): the tokenizer belongs to another model", param=param)
    return tokenizer
