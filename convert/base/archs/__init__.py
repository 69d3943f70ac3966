"""One module per architecture: its config class, key table, source rules and `SPEC` (see convert.base.spec)."""
