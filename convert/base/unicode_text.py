"""Text that is no valid Unicode (what a JSON escape can write and no encoder or tokenizer reads)."""

from __future__ import annotations


def not_unicode(text: str) -> str | None:
    """What makes `text` no valid Unicode (a lone surrogate, as a JSON escape like "\\ud800" can write: UTF-8
    cannot encode it, and the tokenizer cannot read it), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"is not valid Unicode text: a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} "
                "(UTF-8 cannot encode it)")
    return None
