"""Loading Hugging Face checkpoints into the reference modules, with HF's exact key names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from convert.base.checkpoint import Checkpoint, numpy_to_torch
from convert.base.errors import CheckpointError
from convert.base.keymap import SourceRules


@dataclasses.dataclass
class LoadReport:
    """What a load did: keys loaded, keys dropped (with why), tied keys filled from their source."""

    loaded: list[str]
    dropped: list[tuple[str, str]]
    tied: list[tuple[str, str]]


def load_checkpoint_into(
    module: nn.Module,
    checkpoint: Checkpoint,
    source_rules: SourceRules = SourceRules(),
    tied: Mapping[str, str] | None = None,
    prefix: str = "",
) -> LoadReport:
    """Loads `checkpoint` into `module` with `strict=True` semantics.

    Args:
        module: the reference module; its state_dict keys are HF's canonical names.
        checkpoint: the source checkpoint (PyTorch-style key names).
        source_rules: renames/drops from raw source names to the canonical ones.
        tied: {key: source_key} for parameters that share storage (e.g. a tied LM head); they are not
            expected in the file and are filled from their source.
        prefix: a prefix added to every canonical key before matching the module (e.g. "decoder.").

    Raises:
        CheckpointError: naming the checkpoint and every missing, unexpected or mis-shaped key.
    """
    if checkpoint.format == "flax":
        raise CheckpointError(f"{checkpoint.directory}: holds Flax weights only; convert them first")
    canonical, dropped = source_rules.canonicalize(checkpoint.keys())
    expected = module.state_dict()
    tied = dict(tied or {})
    problems: list[str] = []
    state: dict[str, str] = {}  # module key -> source key; read only once every name and shape fits
    for name, src in canonical.items():
        key = prefix + name
        if key not in expected:
            problems.append(f"unexpected {src}")
            continue
        info = checkpoint.info(src)
        if tuple(info.shape) != tuple(expected[key].shape):
            problems.append(f"{src}: shape {list(info.shape)} does not match the config "
                            f"(expected {list(expected[key].shape)})")
            continue
        state[key] = src
    for key, source in tied.items():
        if key in state:
            dropped.append((canonical.get(key[len(prefix):], key), f"tied to {source}"))
        state.pop(key, None)
    missing = [k for k in expected if k not in state and k not in tied]
    if missing:
        problems.append(f"missing {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if problems:
        raise CheckpointError(f"{checkpoint.directory}: does not fit the model: " + "; ".join(problems))
    targets = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, src in state.items():  # one tensor at a time: the checkpoint is never held next to the module
            targets[key].copy_(numpy_to_torch(checkpoint.get(src)).to(targets[key].dtype))
    return LoadReport(loaded=sorted(state), dropped=dropped, tied=sorted(tied.items()))
