"""Flax models: `from flax_model import FlaxSpeechEncoderDecoderModel` (imported on first use)."""

from __future__ import annotations

from typing import Any

__all__ = ["FlaxSpeechEncoderDecoderModel", "SpeechEncoderDecoderModule"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one architecture's module does not build the composed model's imports.
    if name in __all__:
        from flax_model import speech_encoder_decoder

        return getattr(speech_encoder_decoder, name)
    raise AttributeError(f"module 'flax_model' has no attribute {name!r}")
