"""The plain-PyTorch reference: `from torch_reference import SpeechEncoderDecoderModel` (imported on first use)."""

from __future__ import annotations

from typing import Any

__all__ = ["SpeechEncoderDecoderModel"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one architecture's module does not build the composed model's imports.
    if name in __all__:
        from torch_reference import speech_encoder_decoder

        return getattr(speech_encoder_decoder, name)
    raise AttributeError(f"module 'torch_reference' has no attribute {name!r}")
