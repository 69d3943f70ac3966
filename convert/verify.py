"""Checks that a composed checkpoint is right: both weight files agree, and Flax computes what the reference does.

How logits are judged (`judge_logits`): every float32 implementation is some distance from the exact result,
and that distance grows with the size of the activations (a 24-layer encoder, a decoder whose logits reach
10). So the reference is also run in float64 (PyTorch on the CPU), and each float32 run is measured against
it: the reference's own float32 error is what float32 arithmetic costs on this model and input. The Flax
model passes when its error is at most `factor` (default 8) times that, the reference's error taken as at
least `FLOOR_ULPS` float32 units in the last place of the largest logit (so that a reference that happens to
be almost exact does not make the bound absurdly tight). A real bug (a weight read wrongly, a wrong
activation, a mask off by one) moves logits by orders of magnitude more than rounding does.
""" 

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from convert.base.checkpoint import Checkpoint, numpy_to_torch
from convert.base.composed import SpeechEncoderDecoderConfig, composed_keymap
from convert.base.configs import encoder_input_shape
from convert.base.errors import CheckpointError

FLAX_FILES = ("flax_model.msgpack", "flax_model.msgpack.index.json")
TORCH_FILES = ("model.safetensors", "model.safetensors.index.json")


def compare_weight_files(directory: str | Path) -> dict[str, Any]:
    """Compares `flax_model.msgpack` with `model.safetensors` tensor by tensor through the key table.

    Returns:
        {"tensors": n, "max_abs_diff": float, "mismatched": [keys], "missing": [keys],
        "differences": [{"tensor", "max_abs_diff" (None when incomparable), "why"}]} (bit-exact means no
        mismatches and nothing missing).
    """
    return compare_checkpoints(*open_weight_files(directory))


def open_weight_files(directory: str | Path) -> tuple[Checkpoint, Checkpoint, Any]:
    """Both weight files of a composed directory (refused unless both are there) and its key table."""
    directory = Path(directory)
    flax = Checkpoint(directory, prefer=FLAX_FILES)
    torch_side = Checkpoint(directory, prefer=TORCH_FILES)
    if flax.format != "flax" or torch_side.format != "safetensors":
        raise CheckpointError(f"{directory}: needs both flax_model.msgpack and model.safetensors to compare them")
    config = SpeechEncoderDecoderConfig.from_hf_dict(flax.config, str(directory / "config.json"))
    return flax, torch_side, composed_keymap(config)


class _FileMaps:
    """Copy-on-write memory maps of weight files: a tensor is a view of the page cache (the file was just
    written or read), neither copied nor given new memory; writing to it would not change the file."""

    def __init__(self) -> None:
        self._maps: dict[Path, Any] = {}

    def view(self, checkpoint: Checkpoint, key: str) -> np.ndarray:
        """The tensor `key` of `checkpoint` (a view where it is stored in one run, else read)."""
        where, info = checkpoint.byte_range(key), checkpoint.info(key)
        if where is None or where[2] == 0:
            return checkpoint.get(key)
        path, offset, nbytes = where
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return np.frombuffer(self._maps[path], info.dtype, nbytes // info.dtype.itemsize, offset).reshape(info.shape)

    def release(self, checkpoint: Checkpoint, key: str) -> None:
        """Unmaps the pages of tensor `key` from this process (they stay in the page cache): a comparison that
        walks the whole file then holds one tensor's pages at a time, not the file's."""
        where = checkpoint.byte_range(key)
        if where is None or where[0] not in self._maps or where[2] == 0:
            return
        path, offset, nbytes = where
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        self._maps[path].madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)


class _WeightComparison:
    """The tensor-by-tensor comparison of the two weight files, fed one pair at a time (`compare_weight_files`
    reads both files for it; the verification feeds it while it loads the reference)."""

    def __init__(self) -> None:
        self.mismatched: list[str] = []
        self.missing: list[str] = []
        self.differences: list[dict[str, Any]] = []
        self.max_diff = 0.0
        self.seen: set[str] = set()
        self.scratch = _Scratch()

    def only_in(self, name: str, file: str) -> None:
        self.missing.append(name)
        self.differences.append({"tensor": name, "max_abs_diff": None, "why": f"only in {file}"})

    def compare(self, key: str, a: np.ndarray, b: np.ndarray) -> None:
        """`a`: the msgpack tensor in the PyTorch layout (a view is fine), `b`: the safetensors tensor."""
        self.seen.add(key)
        if a.shape == b.shape and a.dtype == b.dtype and _same_bits(a, b, self.scratch):
            return
        self.mismatched.append(key)
        if a.shape != b.shape:
            why, diff = f"shape {list(a.shape)} in Flax, {list(b.shape)} in safetensors", float("inf")
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                d = np.abs(a.astype(np.float64) - b.astype(np.float64)) if a.size else np.zeros(1)
            diff = float(np.nanmax(d)) if np.any(~np.isnan(d)) else float("nan")
            why = f"{int(np.count_nonzero(d))} of {a.size} values differ"
            if a.dtype != b.dtype:
                why += f" (dtype {a.dtype} in Flax, {b.dtype} in safetensors)"
            if np.isnan(d).any():
                why += " (NaN in one file)"
        self.max_diff = max(self.max_diff, diff) if not np.isnan(diff) else self.max_diff
        self.differences.append({"tensor": key, "max_abs_diff": diff, "why": why})

    def result(self) -> dict[str, Any]:
        return {"tensors": len(self.seen), "max_abs_diff": self.max_diff, "mismatched": self.mismatched,
                "missing": self.missing, "differences": self.differences}


_TILE = 256  # a transposed comparison goes tile by tile: 2 x 256 x 256 elements stay in cache
_ROWS_BLOCK = 1 << 20  # elements compared at a time otherwise: a bounded temporary
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}  # bit patterns as integers PyTorch can copy


class _Scratch:
    """One buffer reused for every transposed tensor of a comparison: PyTorch's blocked transposing copy into
    it, then an in-order comparison, is twice as fast as comparing tile by tile (and the buffer's memory is
    touched once). Made only where PyTorch is already imported (importing it from a second thread races)."""

    def __init__(self) -> None:
        import sys

        self._torch = sys.modules.get("torch")
        self._buffer = np.empty(0, np.int64)

    def in_order(self, a: np.ndarray) -> np.ndarray | None:
        """A C-ordered copy of the strided integer array `a`, in the reused buffer (None without PyTorch)."""
        if self._torch is None:
            return None
        if self._buffer.nbytes < a.nbytes:
            self._buffer = np.empty(-(-a.nbytes // 8), np.int64)
        out = self._buffer.view(np.uint8)[:a.nbytes].view(a.dtype).reshape(a.shape)
        self._torch.from_numpy(out).copy_(self._torch.from_numpy(a))
        return out


def _same_bits(a: np.ndarray, b: np.ndarray, scratch: _Scratch | None = None) -> bool:
    """Bit-for-bit equality (NaN payloads and signed zeros included) without copying either array.

    `a` may be a strided view (a Flax kernel in the PyTorch layout): it is copied in order into `scratch`'s
    buffer when one is given, else a transposed matrix is compared in square tiles, whose strided reads stay in
    cache (element by element, it is over 10x slower).
    """
    bits = _SIGNED.get(a.dtype.itemsize)
    if bits is None:
        return a.tobytes() == b.tobytes()
    a, b = a.view(bits), b.view(bits)
    if not a.flags.c_contiguous and scratch is not None and a.size > _TILE:
        ordered = scratch.in_order(a)
        if ordered is not None:
            a = ordered
    if a.ndim == 2 and not a.flags.c_contiguous:
        rows, cols = a.shape
        return all(np.array_equal(a[i:i + _TILE, j:j + _TILE], b[i:i + _TILE, j:j + _TILE])
                   for i in range(0, rows, _TILE) for j in range(0, cols, _TILE))
    if a.ndim == 0 or a.size <= _ROWS_BLOCK:
        return bool(np.array_equal(a, b))
    rows = max(1, _ROWS_BLOCK // (a.size // a.shape[0]))
    return all(np.array_equal(a[i:i + rows], b[i:i + rows]) for i in range(0, a.shape[0], rows))


def seeded_inputs(config: SpeechEncoderDecoderConfig, seed: int = 0, seconds: float = 1.0,
                  decoder_length: int = 8) -> dict[str, np.ndarray]:
    """A padded batch of 2 utterances (the second 60% as long) and decoder ids starting with the start token.

    The inputs are standard-normal samples [2, N], or feature frames [2, S, F] for an encoder that reads features
    (`EncoderConfig.input_kind`), `seconds` long at the encoder's `inputs_per_second`."""
    rng = np.random.default_rng(seed)
    encoder = config.encoder
    n = max(int(encoder.inputs_per_second * seconds), 8 * encoder.min_input_length)
    shape = encoder_input_shape(encoder, 2, n)
    audio = rng.standard_normal(shape).astype(np.float32)
    mask = np.ones(shape[:2], np.int32)
    mask[1, int(n * 0.6):] = 0
    audio[1, int(n * 0.6):] = 0.0
    vocab = config.decoder.vocab_size
    ids = rng.integers(0, vocab, (2, decoder_length)).astype(np.int64)
    ids[:, 0] = config.decoder_start_token_id
    return {"inputs": audio, "attention_mask": mask, "decoder_input_ids": ids}


def load_both(directory: str | Path) -> tuple[Any, Any]:
    """The Flax model (from its msgpack when present) and the PyTorch reference (from safetensors when
    present), both in float32 whatever the saved dtype."""
    return load_flax(directory), load_torch(directory)


def load_flax(directory: str | Path, prefer: tuple[str, ...] | None = None) -> Any:
    """The Flax model in float32 (from its msgpack when present, else from the weight file `prefer` names)."""
    import jax.numpy as jnp
    from flax import traverse_util

    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel, param_shapes

    if prefer is None:
        model = FlaxSpeechEncoderDecoderModel.from_pretrained(directory)
    else:
        from convert.base.checkpoint import new_array
        from convert.base.params import plan_checkpoint

        # Each leaf is read from a memory map of the file straight into its float32 array: one pass, no
        # intermediate array in the stored dtype (new memory costs more than copying on a VM).
        checkpoint, maps, flat = Checkpoint(directory, prefer=prefer), _FileMaps(), {}
        config, plan = plan_checkpoint(checkpoint, param_shapes)
        for entry in plan.entries:
            stored = entry.transform.to_flax(maps.view(checkpoint, entry.source), contiguous=False)
            float_leaf = np.issubdtype(stored.dtype, np.floating) or stored.dtype == ml_dtypes.bfloat16
            flat[entry.target] = new_array(stored.shape, np.float32 if float_leaf else stored.dtype)
            np.copyto(flat[entry.target], stored, casting="unsafe")
            maps.release(checkpoint, entry.source)
        model = FlaxSpeechEncoderDecoderModel(config, traverse_util.unflatten_dict(flat, sep="/"))
    params, model.params = traverse_util.flatten_dict(model.params, sep="/"), None
    converted = 0
    for path in params:  # leaf by leaf, so that a bfloat16 model is not held next to its float32 copy
        if params[path].dtype != jnp.float32:
            params[path] = jnp.asarray(params[path]).astype(jnp.float32)
            converted += 1
            if converted % 32 == 0:  # the freed half-size buffers cannot hold float32 ones: return them
                params[path].block_until_ready()
                release_free_memory()
    model.params = traverse_util.unflatten_dict(params, sep="/")
    return model


def load_torch(directory: str | Path, prefer: tuple[str, ...] | None = None) -> Any:
    """The PyTorch reference in float32 (from safetensors when present, else from the file `prefer` names)."""
    from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel
    from torch_reference.speech_encoder_decoder import from_pretrained as torch_from_pretrained

    if prefer is None or Checkpoint(directory, prefer=prefer).format != "flax":
        return torch_from_pretrained(directory)[0].float().eval()  # reads safetensors first, as `prefer` asks
    # Flax weights chosen explicitly: through the key table, as torch_reference does for Flax-only directories.
    from convert.base.checkpoint import numpy_to_torch
    from convert.base.composed import composed_tied_keys
    from convert.base.params import load_params, params_to_torch_state, read_config

    config = read_config(Checkpoint(directory, prefer=prefer))
    model = SpeechEncoderDecoderModel(config).eval()
    shapes = _reference_flax_shapes(model)
    state = params_to_torch_state(config, load_params(directory, shapes, prefer=prefer).params)
    missing = model.load_state_dict({k: numpy_to_torch(v) for k, v in state.items()}, strict=False).missing_keys
    lacking = sorted(set(missing) - set(composed_tied_keys(config)))
    if lacking:
        raise CheckpointError(f"{directory}: the Flax weights lack {', '.join(lacking[:5])}")
    return model.float().eval()


def _reference_flax_shapes(model: Any) -> Any:
    from convert.base.composed import composed_keymap, composed_tied_keys

    def shapes_of(config: Any) -> dict[str, tuple[int, ...]]:
        keymap, tied = composed_keymap(config), composed_tied_keys(config)
        out = {}
        for key, tensor in model.state_dict().items():
            if key in tied:
                continue
            path, transform = keymap.to_flax(key)
            out[path] = transform.flax_shape(tuple(tensor.shape))
        return out

    return shapes_of


DEFAULT_FACTOR = 8.0
FLOOR_ULPS = 4
VERIFY_SECONDS = 0.25  # of seeded audio per utterance: verification stays cheap next to loading the model
_EPS32 = float(np.finfo(np.float32).eps)


def logits_difference(flax_model: Any, torch_model: Any, batch: dict[str, np.ndarray]) -> float:
    """max |Δlogits| between the two models on one batch (teacher forcing)."""
    return float(np.max(np.abs(flax_logits(flax_model, batch) - torch_logits(torch_model, batch))))


def flax_logits(flax_model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(flax_model(**batch).logits)


def torch_logits(torch_model: Any, batch: dict[str, np.ndarray], dtype: Any = None) -> np.ndarray:
    """The reference's logits; with `dtype=torch.float64` the audio is fed in that dtype too (the model must
    have been converted with `.double()`)."""
    import torch

    mask = batch.get("attention_mask")
    inputs = torch.from_numpy(batch["inputs"])
    if dtype is not None:
        inputs = inputs.to(dtype)
    with torch.no_grad():
        return torch_model(
            inputs, None if mask is None else torch.from_numpy(mask),
            torch.from_numpy(batch["decoder_input_ids"]),
        ).logits.numpy()


def reference_logits(torch_model: Any, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 logits, float64 logits) of the reference (see `float64_logits`). A model holding weights in a
    narrower dtype (`load_torch_mapped(..., keep_dtype=True)`) runs in float32 the same way, each module's
    weights upcast (exactly) while it runs."""
    import torch

    if all(t.dtype == torch.float32 for t in _tensors(torch_model)):
        return torch_logits(torch_model, batch), float64_logits(torch_model, batch)
    return _converted_logits(torch_model, batch, torch.float32), float64_logits(torch_model, batch)


def float64_logits(torch_model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The reference's logits computed in float64, holding little more memory than the float32 model.

    Each module's own weights are converted to float64 only while that module runs (forward hooks); their
    float32 storage is put back after, so the peak is the float32 model plus one module's weights in float64,
    not a float64 copy of the whole model. The float64 copies go into one buffer sized for the largest module,
    used as a stack (modules nest): new memory is touched once, not once per module (on a VM, first touches of
    memory cost more than the copies). Should a weight be used outside its module's call (a dtype error), the
    whole model is converted instead, and left in float64.
    """
    import torch

    return _converted_logits(torch_model, batch, torch.float64)


def _converted_logits(torch_model: Any, batch: dict[str, np.ndarray], dtype: Any) -> np.ndarray:
    """The reference's logits with every module's own floating-point weights in `dtype` while it runs (see
    `float64_logits`); the audio is fed in `dtype` too."""
    import torch

    owned = {module: [t for t in _tensors(module, recurse=False) if t.dtype != dtype]
             for module in torch_model.modules()}
    owned = {module: tensors for module, tensors in owned.items() if tensors}
    largest = max((sum(t.numel() for t in tensors) for tensors in owned.values()), default=0)
    arena = torch.empty(largest, dtype=dtype)
    top = [0]  # the stack's top in `arena`
    kept: dict[int, Any] = {}  # the original storage of each tensor while its module runs in `dtype`
    running: dict[Any, list[int]] = {}  # module -> [calls under way, stack top before its first]

    def convert(module: Any, args: Any) -> None:
        if module in running:  # called again inside itself: keeps its first conversion
            running[module][0] += 1
            return
        running[module] = [1, top[0]]
        for t in owned[module]:
            if id(t) in kept:  # shared with a module under way: already converted
                continue
            kept[id(t)] = t.data
            n = t.numel()
            if top[0] + n <= largest:
                t.data = arena[top[0]:top[0] + n].view(t.shape).copy_(t.data)
                top[0] += n
            else:
                t.data = t.data.to(dtype)

    def back(module: Any, args: Any, out: Any) -> None:
        state = running.get(module)
        if state is None:
            return
        state[0] -= 1
        if state[0]:
            return
        del running[module]
        for t in owned[module]:
            if id(t) in kept:
                t.data = kept.pop(id(t))  # the original storage: nothing new is allocated
        top[0] = state[1]

    handles = []
    for module in owned:
        handles.append(module.register_forward_pre_hook(convert))
        handles.append(module.register_forward_hook(back))
    try:
        return torch_logits(torch_model, batch, dtype=dtype)
    except RuntimeError:  # a weight used outside its module's call: the plain way, memory permitting
        for handle in handles:
            handle.remove()
        handles = []
        for module in owned:
            for t in owned[module]:
                if id(t) in kept:
                    t.data = kept.pop(id(t))
        running.clear()
        del arena
        torch_model.to(dtype)
        return torch_logits(torch_model, batch, dtype=dtype)
    finally:
        for handle in handles:
            handle.remove()


def _tensors(module: Any, recurse: bool = True) -> list[Any]:
    """A module's floating-point parameters and buffers."""
    found = [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]
    return [t for t in found if t.is_floating_point()]


def judge_logits(flax32: np.ndarray, ref32: np.ndarray, ref64: np.ndarray, factor: float = DEFAULT_FACTOR
                 ) -> dict[str, Any]:
    """Flax's float32 logits judged against the float64 reference, next to the reference's own float32 error.

    Returns:
        {"flax_error", "reference_error", "bound", "factor", "logit_scale", "max_abs_logits_diff" (Flax vs
        the float32 reference), "where" (utterance, position, token of Flax's largest error, with both
        values), "passed", "reason" (why it failed, or None)}.
    """
    if flax32.shape != ref64.shape:
        return {"passed": False, "reason": f"logits shapes differ: Flax {list(flax32.shape)}, reference "
                f"{list(ref64.shape)}", "flax_error": float("inf"), "reference_error": float("nan"),
                "bound": float("nan"), "factor": factor, "logit_scale": float("nan"),
                "max_abs_logits_diff": float("inf"), "where": None}
    exact = ref64.astype(np.float64)
    flax_diff = np.abs(flax32.astype(np.float64) - exact)
    ref_err = float(np.max(np.abs(ref32.astype(np.float64) - exact))) if exact.size else 0.0
    scale = float(np.max(np.abs(exact))) if exact.size else 0.0
    floor = FLOOR_ULPS * _EPS32 * max(scale, 1.0)
    bound = factor * max(ref_err, floor)
    reason = None
    if not np.all(np.isfinite(exact)):
        reason = "the float64 reference gives NaN or Inf logits"
    elif not np.all(np.isfinite(flax32)):
        reason = "Flax gives NaN or Inf logits"
    flax_err = float(np.max(flax_diff)) if flax_diff.size else 0.0
    where = None
    if flax_diff.size:
        flat = int(np.nanargmax(np.where(np.isnan(flax_diff), np.inf, flax_diff)))
        index = np.unravel_index(flat, flax_diff.shape)
        where = {"utterance": int(index[0]), "position": int(index[1]), "token": int(index[2]),
                 "flax": float(flax32[index]), "float64": float(exact[index])}
    if reason is None and not flax_err <= bound:
        reason = (f"Flax is {flax_err:.2e} from the float64 reference, more than {factor:g} x the float32 "
                  f"reference's own {max(ref_err, floor):.2e}")
    return {
        "flax_error": flax_err,
        "reference_error": ref_err,
        "bound": bound,
        "factor": factor,
        "logit_scale": scale,
        "max_abs_logits_diff": float(np.max(np.abs(flax32 - ref32))) if flax32.size else 0.0,
        "where": where,
        "passed": reason is None,
        "reason": reason,
    }


def describe_judgement(j: dict[str, Any]) -> str:
    """One line: the figures of `judge_logits` and where Flax's largest error sits."""
    if j.get("where") is None:
        return j.get("reason") or "no logits"
    w = j["where"]
    return (f"Flax {j['flax_error']:.2e} vs reference float32 {j['reference_error']:.2e} from float64 "
            f"(bound {j['bound']:.2e} = {j['factor']:g} x, logits up to {j['logit_scale']:.3g}); largest at "
            f"utterance {w['utterance']}, position {w['position']}, token {w['token']} "
            f"(Flax {w['flax']:.6g}, float64 {w['float64']:.6g})")


def release_free_memory() -> None:
    """Hands the heap's free pages back to the system (glibc keeps freed blocks of a few MB otherwise, and
    the PyTorch model loaded next would come on top of the Flax model just freed)."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: nothing to do
        pass


def verify_directory(directory: str | Path, factor: float = DEFAULT_FACTOR, seed: int = 0,
                     seconds: float = VERIFY_SECONDS) -> dict[str, Any]:
    """Both weight files agree bit for bit, and Flax's logits pass `judge_logits` on a short seeded input.

    The models are loaded one after the other, never side by side: the reference first (from
    `model.safetensors`), run in float32 and float64, then the Flax model (from `flax_model.msgpack`). Two
    background threads share the work with them: one compiles the Flax forward from the shapes alone (no
    weight is needed for that), the other compares the weight files through memory maps of the page cache.

    Returns:
        `judge_logits`'s figures plus "seed", "weight_files_identical", "differing_tensors" (up to 20) and
        "passed" (both checks).
    """
    import gc

    import torch  # noqa: F401 - here, before the threads: two threads importing one module can race

    directory = Path(directory)
    flax_file, torch_file, keymap = open_weight_files(directory)  # refuses a directory without both, first
    config = SpeechEncoderDecoderConfig.from_hf_dict(torch_file.config, str(directory / "config.json"))
    batch = seeded_inputs(config, seed, seconds=seconds)
    compiled = compiling_forward(config, batch)
    comparing = InBackground(compare_checkpoints, flax_file, torch_file, keymap)
    with settling(compiled, comparing):
        with torch_threads(1):  # 24 frames: one thread is as fast, and the other core has the background work
            torch_model = load_torch_mapped(directory, keep_dtype=True)
            ref32, ref64 = reference_logits(torch_model, batch)
        del torch_model
        gc.collect()
        release_free_memory()
        flax_model = load_flax(directory, prefer=FLAX_FILES)  # numpy leaves: the compiled call takes them uncopied
        flax32 = forward_logits(compiled.result(), flax_model, batch)
        del flax_model
        gc.collect()
        release_free_memory()
        files = comparing.result()
    judgement = judge_logits(flax32, ref32, ref64, factor)
    identical = not files["mismatched"] and not files["missing"]
    return {
        **judgement,
        "seed": seed,
        "weight_files_identical": identical,
        "differing_tensors": (files["mismatched"] + files["missing"])[:20],
        "passed": identical and judgement["passed"],
    }


def load_torch_mapped(directory: str | Path, keep_dtype: bool = False) -> Any:
    """The PyTorch reference in float32 from `model.safetensors`, its tensors views of the file's pages
    (`keep_dtype`: a bfloat16 or float16 file's weights stay in that dtype, uncopied, for `reference_logits`).

    The model is built on the meta device and handed the tensors (no random initialisation to overwrite, no
    copy of a float32 file, no new memory), with the checks of an ordinary load: every tensor of the model
    given, none unknown, each of its shape. A model that keeps a tensor no file holds (none today) is loaded
    the ordinary way.

    Raises:
        CheckpointError: `model.safetensors` lacks a tensor of the model, has an unknown one, or a wrong shape.
    """
    import torch

    from convert.base.composed import composed_tied_keys
    from torch_reference.speech_encoder_decoder import SpeechEncoderDecoderModel

    checkpoint = Checkpoint(directory, prefer=TORCH_FILES)
    if checkpoint.format != "safetensors":
        return load_torch(directory, prefer=TORCH_FILES)
    config = SpeechEncoderDecoderConfig.from_hf_dict(checkpoint.config, str(Path(directory) / "config.json"))
    with torch.device("meta"):
        model = SpeechEncoderDecoderModel(config)
    expected, tied = model.state_dict(), composed_tied_keys(config)
    state, problems, maps = {}, [], _FileMaps()
    for key in checkpoint.keys():
        info = checkpoint.info(key)
        if key in tied:  # a tied copy some writers keep: the tie gives it from its source, as an ordinary load
            continue
        if key not in expected:
            problems.append(f"unexpected {key}")
        elif tuple(info.shape) != tuple(expected[key].shape):
            problems.append(f"{key}: shape {list(info.shape)} does not match the config (expected "
                            f"{list(expected[key].shape)})")
        else:
            tensor = numpy_to_torch(maps.view(checkpoint, key))
            keep = keep_dtype and tensor.is_floating_point() and expected[key].is_floating_point()
            state[key] = tensor if keep else tensor.to(expected[key].dtype)
    missing = [k for k in expected if k not in state and k not in tied]
    if missing:
        problems.append(f"missing {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if problems:
        raise CheckpointError(f"{checkpoint.directory}: does not fit the model: " + "; ".join(problems))
    for key, source in tied.items():
        state[key] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer no file holds
        return load_torch(directory, prefer=TORCH_FILES)
    return model.eval()


def compare_checkpoints(flax: Checkpoint, torch_side: Checkpoint, keymap: Any) -> dict[str, Any]:
    """`compare_weight_files` on checkpoints already opened."""
    comparison, maps = _WeightComparison(), _FileMaps()
    for path in flax.keys():
        found = keymap.to_torch(path)
        if found is None or found[0] not in torch_side:
            comparison.only_in(path, "flax_model.msgpack")
            continue
        key, transform = found
        comparison.compare(key, transform.to_torch(maps.view(flax, path), contiguous=False),
                           maps.view(torch_side, key))
        maps.release(flax, path)
        maps.release(torch_side, key)
    for k in torch_side.keys():
        if k not in comparison.seen:
            comparison.only_in(k, "model.safetensors")
    return comparison.result()


class InBackground:
    """`fn(*args)` in a daemon thread; `result()` waits for it and returns its value or raises its error."""

    def __init__(self, fn: Any, *args: Any):
        import threading

        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=f"verify-{fn.__name__}",
                                        daemon=True)
        self._thread.start()

    def _run(self, fn: Any, args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # noqa: BLE001 - raised again in the thread that asks for the result
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def settle(self) -> None:
        """Waits for the thread to end, its value and error dropped."""
        self._thread.join()


@contextlib.contextmanager
def settling(*tasks: InBackground | None) -> Iterator[None]:
    """On an error in the block, waits for `tasks` to end before it propagates: a process that exits while a thread
    is still inside XLA or PyTorch aborts ("terminate called without an active exception", exit 134) instead of
    giving its one-line error."""
    try:
        yield
    except BaseException:
        for task in tasks:
            if task is not None:
                task.settle()
        raise


# One forward on 24 frames: XLA's optimisation passes cost more than they save (compilation 3.2 -> 2.3 s of CPU
# for wav2vec2-large + BART-large); the computation is the same, only its fusion and code generation differ.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiling_forward(config: SpeechEncoderDecoderConfig, batch: dict[str, np.ndarray]) -> InBackground:
    """`compile_forward` started in a background thread (`.result()` waits for the executable). JAX, Flax and
    the model code are imported first, in this thread: two threads importing jax at once can each find it
    half-initialised."""
    import flax_model.speech_encoder_decoder  # noqa: F401 - imports jax and flax

    return InBackground(compile_forward, config, batch)


def compile_forward(config: SpeechEncoderDecoderConfig, batch: dict[str, np.ndarray]) -> Any:
    """The composed Flax forward (teacher forcing, logits) compiled for `batch`'s shapes and float32 parameters,
    from the config alone: nothing needs to be loaded first."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from flax_model.speech_encoder_decoder import SpeechEncoderDecoderModule, param_shapes

    module = SpeechEncoderDecoderModule(config)
    params = traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in param_shapes(config).items()}, sep="/")
    args = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _forward_args(batch)]

    def forward(params: Any, inputs: Any, mask: Any, ids: Any) -> Any:
        return module.apply({"params": params}, inputs, mask, ids)

    return jax.jit(forward).lower(params, *args).compile(compiler_options=COMPILER_OPTIONS)


def forward_logits(compiled: Any, flax_model: Any, batch: dict[str, np.ndarray]) -> np.ndarray:
    """`flax_model`'s logits for `batch` through `compile_forward`'s executable (through the model's own jitted
    call when its parameters are not the float32 tree the executable was compiled for)."""
    import jax

    if all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(flax_model.params)):
        try:
            return np.asarray(compiled(flax_model.params, *_forward_args(batch)))
        except (TypeError, ValueError):  # a tree or a shape the compilation did not see
            pass
    return flax_logits(flax_model, batch)


def _forward_args(batch: dict[str, np.ndarray]) -> list[np.ndarray | None]:
    """The composed module's positional inputs, in the dtypes the Flax model feeds it (no mask: None)."""
    mask = batch.get("attention_mask")
    return [batch["inputs"].astype(np.float32), None if mask is None else mask.astype(np.int32),
            batch["decoder_input_ids"].astype(np.int32)]


class torch_threads:
    """Runs a block with PyTorch's intra-op thread count set to `n` (restored after)."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(min(self.n, self.before))

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.before)
