"""Errors raised for bad input: each carries one line naming the file or flag and what is wrong."""


class ConvertError(Exception):
    """Base class: a one-line, user-facing message (no traceback needed to understand it)."""


class CheckpointError(ConvertError):
    """A checkpoint file or directory is missing, corrupt, or does not match its config."""


class UnsupportedConfig(ConvertError):
    """A config.json asks for something this toolkit does not implement."""


class KeyMapError(ConvertError):
    """Tensor names or shapes that do not fit the architecture's key table."""


class HubError(ConvertError):
    """The Hugging Face Hub could not be reached or did not have what was asked for."""
