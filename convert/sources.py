"""The sources of a composition and what every composition mode shares: resolving a source (a directory, a Hub repo
id or a built-in name) and opening its checkpoint, the arguments' checks, the initialiser of the leaves no source
has, and the streaming of source tensors (cast on the way in, checked finite) into the writers.

`convert.compose` (the cross-attention mode) and `convert.compose_prefix` (the prefix mode) both build on it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert import cli
from convert.base.checkpoint import Checkpoint
from convert.base.configs import HFConfig, read_json
from convert.base.errors import (CheckpointError, ConvertError, KeyMapError, UnsupportedConfig, UsageError,
                                 bad_argument, with_param)
from convert.base.hub import resolve_source
from convert.base.keymap import Entry
from convert.base.params import check_layer_counts
from convert.base.registry import spec_for
from convert.base.spec import ArchSpec
from convert.base.writing import TensorSpec

BUILTIN_DIR = Path(__file__).parent / "builtin"


BUILTIN_SOURCES = ("the toolkit's built-in sources", BUILTIN_DIR)


DEFAULT_FACTOR = 8.0  # = convert.verify.DEFAULT_FACTOR, which imports more than --help needs


DTYPES = {"float32": np.dtype(np.float32), "bfloat16": None, "float16": np.dtype(np.float16)}


# Files copied from the sources when present: the decoder's tokenizer, the encoder's feature extractor.
DECODER_EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                       "special_tokens_map.json", "added_tokens.json", "sentencepiece.bpe.model")


ENCODER_EXTRA_FILES = ("preprocessor_config.json",)


def check_extra_files(encoder: Source, decoder: Source) -> Any:
    """Refuses, before any work, a file of the sources that composing copies and that is not what it claims to be
    (see `check_part_files`), in one line naming the source and the file; returns the decoder's tokenizer (None
    without a tokenizer.json)."""
    from convert.base.tokenizer_file import TOKENIZER_FILE

    try:
        check_part_files(encoder.path, encoder.config, None, None)
    except ConvertError as e:
        raise with_param(e, "encoder", encoder.spec) from None
    return check_part_files(None, None, decoder.path, decoder.config.vocab_size,
                            where=f"decoder={decoder.spec}: {TOKENIZER_FILE}", param="decoder")


def check_part_files(encoder_dir: Path | None, encoder_config: Any, decoder_dir: Path | None, vocab_size: int | None,
                     where: str | None = None, param: str | None = None) -> Any:
    """Refuses the encoder's `preprocessor_config.json` unless each of its fields is valid for the encoder, and the
    decoder's `tokenizer.json` unless it is a tokenizers file making no id beyond `vocab_size` (each when
    present; a directory of None is skipped). `where`, `param`: how a tokenizer error names the file. Returns the
    tokenizer read (None when there is none)."""
    from convert.base.audio import PREPROCESSOR_FILE, feature_extractor_config
    from convert.base.tokenizer_file import TOKENIZER_FILE, read_tokenizer

    if encoder_dir is not None and (encoder_dir / PREPROCESSOR_FILE).is_file():
        feature_extractor_config(encoder_dir, encoder_config)
    if decoder_dir is None or not (decoder_dir / TOKENIZER_FILE).is_file():
        return None
    return read_tokenizer(decoder_dir / TOKENIZER_FILE, CheckpointError, vocab_size, where=where, param=param)


# How a leaf that no source has is initialised, by its name: (regex, initialiser). kernels and embeddings
# draw from N(0, std) with the decoder's initialiser scale; biases start at 0, norm scales at 1.
INIT_RULES: tuple[tuple[str, str], ...] = (
    (r".*/kernel$", "normal"),
    (r".*/embedding$", "normal"),
    (r".*/bias$", "zeros"),
    (r".*/scale$", "ones"),
)


def builtin_sources() -> dict[str, tuple[str, ...]]:
    """The built-in tiny checkpoints by role, from what `convert/builtin/` holds and the specs' roles."""
    found: dict[str, list[str]] = {"encoder": [], "decoder": []}
    for directory in sorted(BUILTIN_DIR.iterdir()) if BUILTIN_DIR.is_dir() else ():
        if (directory / "config.json").is_file():
            found[spec_for(read_json(directory / "config.json"), str(directory)).role].append(directory.name)
    return {role: tuple(names) for role, names in found.items()}


BUILTINS = builtin_sources()


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPES[name])


@dataclasses.dataclass
class Source:
    """One resolved source: where it came from and its opened checkpoint."""

    role: str  # "encoder" or "decoder"
    spec: str  # what the user passed
    path: Path
    repo_id: str | None
    revision: str | None
    checkpoint: Checkpoint
    arch: ArchSpec
    config: HFConfig


def resolve(spec: str, role: str, revision: str | None = None) -> tuple[Path, str | None, str | None]:
    """A built-in name, a local directory or a Hub repo id -> (local directory, repo id, revision)."""
    if revision is not None and Path(spec).expanduser().is_dir():
        raise bad_argument(f"{role}_revision", revision, f"applies to a Hub repo id, but {spec} is a local directory")
    if not Path(spec).exists():
        if spec in BUILTINS[role]:
            if revision is not None:
                raise bad_argument(f"{role}_revision", revision, f"applies to a Hub repo id, but {spec} is a "
                                                                 f"built-in {role}")
            return BUILTIN_DIR / spec, None, None
        other = "decoder" if role == "encoder" else "encoder"
        if spec in BUILTINS[other]:
            raise UnsupportedConfig(f"{spec} is a built-in {other}, not an {role} "
                                    f"(built-in {role}s: {', '.join(BUILTINS[role])})")
    resolved = resolve_source(spec, revision, what=role)
    return resolved.path, resolved.repo_id, resolved.revision


def open_source(spec: str, role: str, revision: str | None = None) -> Source:
    """Resolves and opens one source; any problem is a one-line error naming the parameter (`encoder=...`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise bad_argument(role, repr(spec), f"is not a source (a directory, a Hub repo id or a built-in {role})")
    try:
        path, repo_id, resolved_revision = resolve(spec, role, revision)
        checkpoint = Checkpoint(path)
        where = str(checkpoint.directory / "config.json")
        arch = spec_for(checkpoint.config, where, role=role)
        config = arch.config(checkpoint.config, where)
        config = arch.adapt_config(config, checkpoint)
        check_layer_counts(checkpoint, config)  # before any shape is traced for the config's counts
    except UsageError:
        raise
    except ConvertError as e:
        raise with_param(e, role, spec) from None
    return Source(role, spec, Path(path), repo_id, resolved_revision, checkpoint, arch, config)


def is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype).name == "bfloat16"


def init_leaf(path: str, shape: tuple[int, ...], std: float, seed: int, dtype: np.dtype,
              rules: tuple[tuple[str, str], ...] = ()) -> np.ndarray:
    """A leaf no source has, drawn deterministically from (seed, path): the same seed gives the same bytes.

    numpy's PCG64 seeded with (seed, crc32(path)): independent of the order leaves are drawn in, and cheap
    (no JAX random-number kernels to compile for a handful of tensors). `rules` (an architecture's `init_rules`,
    over the whole path) are tried before INIT_RULES.
    """
    kind = next((k for pattern, k in (*rules, *INIT_RULES) if re.match(pattern, path)), None)
    if kind is None:
        raise KeyMapError(f"{path}: no initialiser for this kind of parameter")
    if kind == "zeros":
        return np.zeros(shape, dtype)
    if kind == "ones":
        return np.ones(shape, dtype)
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype)


@dataclasses.dataclass
class ComposeResult:
    output: Path
    report: dict[str, Any]


MAX_SEED = 2**32 - 1


def check_arguments(seed: Any, dtype: Any, verify_factor: Any, **flags: Any) -> tuple[np.dtype, int, float]:
    """Refuses, before anything is read, an argument of `compose` that is wrong by itself: the seed, dtype and
    verification factor (returned checked, the dtype as numpy's), and the keyword `flags`: booleans
    (`overwrite`, `verify`, `progress`), token ids (`..._token_id`, None or >= 0) and revisions (`..._revision`,
    None or a non-empty string).

    Raises:
        UsageError: naming the argument.
    """
    cli.require_choice("dtype", dtype, list(DTYPES))
    seed = cli.require_int("seed", seed, 0, MAX_SEED)
    verify_factor = cli.require_float("verify_factor", verify_factor, 0.0, None, low_inclusive=False)
    for name, value in flags.items():
        if name.endswith("_token_id"):
            cli.require_int(name, value, 0, None, allow_none=True)
        elif name.endswith("_revision"):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise bad_argument(name, repr(value), "is not a revision (a branch, tag or commit)")
        elif not isinstance(value, bool):
            raise bad_argument(name, value, "is not True or False")
    return _dtype(dtype), seed, verify_factor


def stream_leaves(specs: Sequence[TensorSpec], sources: dict[str, tuple[Source, Entry]], dtype_name: str,
                  progress: bool, initialise: Any = None):
    """(path, array) of every leaf of `specs` in order, one at a time: a source tensor, cast to the leaf's dtype on
    the way in and checked finite (its transform applied as a strided view: the writers tile transposes out), or
    `initialise(spec)` for a leaf no source has. A progress bar on a terminal."""
    from tqdm import tqdm

    scratch: list[np.ndarray] = []  # one reusable buffer for the finiteness check
    total = sum(s.nbytes for s in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="composing", disable=not cli.show_progress(progress),
              file=sys.stderr, leave=False) as bar:
        for spec in specs:
            if spec.name in sources:
                src, entry = sources[spec.name]
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by tensor
                    array = src.checkpoint.get(entry.source, spec.dtype)  # cast on the way in, if at all
                _check_finite(array, src, entry.source, dtype_name, scratch)
                array = entry.transform.to_flax(array, contiguous=False)
            else:
                array = initialise(spec)
            yield spec.name, array
            bar.update(spec.nbytes)


_FINITE_CHUNK = 1 << 22  # elements checked at a time: no full-size boolean array next to a large tensor


def local_path(spec: Any, role: str) -> Path | None:
    """The directory a source names before resolving it (a local directory or a built-in), else None."""
    if not isinstance(spec, str) or not spec.strip():
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    return BUILTIN_DIR / spec if spec in BUILTINS.get(role, ()) else None


# Exponent bits of the 2-byte floats: all ones is Inf or NaN. Masking the bits runs ~10 GB/s where
# np.isfinite on bfloat16 and float16 runs ~1 GB/s (they are not native numpy loops).
_EXPONENT_MASKS = {"bfloat16": 0x7F80, "float16": 0x7C00}


def _all_finite(flat: np.ndarray, scratch: list[np.ndarray]) -> bool:
    mask = _EXPONENT_MASKS.get(flat.dtype.name)
    if mask is None or flat.ndim != 1:
        return bool(np.isfinite(flat).all())
    if not scratch or scratch[0].size < flat.size:
        scratch[:] = [np.empty(flat.size, np.uint16)]
    bits = scratch[0][:flat.size]
    np.bitwise_and(flat.view(np.uint16), mask, out=bits)
    return bool(bits.max() != mask) if bits.size else True


def _check_finite(array: np.ndarray, src: Source, key: str, dtype_name: str,
                  scratch: list[np.ndarray] | None = None) -> None:
    """Refuses a tensor with NaN or Inf values (also values that overflow the output dtype), by name."""
    # The tensor as read is contiguous (a view then); a strided one is checked whole rather than copied.
    flat = array.reshape(-1) if array.flags.c_contiguous else array
    scratch = [] if scratch is None else scratch
    chunks = range(0, flat.size, _FINITE_CHUNK) if flat.ndim == 1 else [None]
    for start in chunks:
        if _all_finite(flat if start is None else flat[start:start + _FINITE_CHUNK], scratch):
            continue
        original = src.checkpoint.get(key)
        with np.errstate(invalid="ignore"):
            bad_source = int(np.count_nonzero(~np.isfinite(original.astype(np.float32))))
        if bad_source:
            nan = int(np.count_nonzero(np.isnan(original.astype(np.float32))))
            raise KeyMapError(f"{src.role}={src.spec}: tensor {key} holds {bad_source} non-finite value(s) "
                              f"({nan} NaN, {bad_source - nan} Inf)", param=src.role)
        largest = float(np.max(np.abs(original.astype(np.float64))))
        raise KeyMapError(f"{src.role}={src.spec}: tensor {key} has values up to {largest:.3g}, beyond what "
                          f"{dtype_name} can hold (choose another dtype)", param=src.role)


class VerificationFailed(ConvertError):
    """The composed model's Flax logits are further from the float64 reference than float32 rounding explains."""
