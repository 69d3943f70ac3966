"""Errors raised for bad input: each carries one line naming the file, tensor or parameter and what is wrong.

Messages speak the Python API's language: a parameter is named as `name=value` at the start of the message
(`output=/tmp/x: ...`, `seed=-1: ...`) and the error records it in `.param`; a hint names a switch as
`overwrite=True`. The commands translate both into their flags (`--output /tmp/x: ...`, `--overwrite`) with
`convert.cli.render`, so that neither side's messages name the other's spelling.
"""

from __future__ import annotations

from typing import Any


class ConvertError(Exception):
    """Base class: a one-line, user-facing message (no traceback needed to understand it).

    Args:
        message: the whole line. When `param` is given it starts with `f"{param}={value}: "`.
        param: the API parameter the message is about (the commands map it to their flag), or None.
    """

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param


class UsageError(ConvertError):
    """An argument is wrong by itself (out of range, not one of the choices, in conflict with another, an
    output location the toolkit refuses), found before any work. The commands exit 2 for it."""


class CheckpointError(ConvertError):
    """A checkpoint file or directory is missing, corrupt, or does not match its config."""


class UnsupportedConfig(ConvertError):
    """A config.json asks for something this toolkit does not implement."""


class KeyMapError(ConvertError):
    """Tensor names, shapes, dtypes or values that do not fit the architecture's key table."""


class HubError(ConvertError):
    """The Hugging Face Hub could not be reached or did not have what was asked for."""


class OutputError(ConvertError):
    """The output location cannot be written (permissions, a full disk, a file in the way)."""


def bad_argument(param: str, value: Any, why: str) -> UsageError:
    """`UsageError(f"{param}={value}: {why}", param=param)`: the one way to refuse an argument's value."""
    return UsageError(f"{param}={value}: {why}", param=param)


def with_param(error: ConvertError, param: str, value: Any) -> ConvertError:
    """The same error (same class) about `param`: `param=value: message`. A message that already starts with the
    value (a path, or a file inside it) keeps its text, the value becoming `param=value`."""
    message = str(error)
    value = str(value)
    if value and message.startswith(value) and message[len(value):][:1] in (":", "/"):
        return type(error)(f"{param}={message}", param=param)
    return type(error)(f"{param}={value}: {message}", param=param)
