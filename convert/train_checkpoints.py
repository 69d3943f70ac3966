"""A fine-tuning run's checkpoints (orbax): saved with a sha256 manifest, verified before they are restored,
nothing partial left behind by a failed or interrupted save, and a checkpoint directory checked before any work."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convert import cli
from convert.base.errors import CheckpointError, OutputError, UsageError


def save_checkpoint(manager: Any, state: Any, meta: dict[str, Any]) -> None:
    """Saves the train state and the run's history at `state.step` (unless that step is saved already), waits for
    it, and records the sha256 of every file it wrote (`convert.base.integrity`), checked when it is restored. A
    sharded state is saved as it lies: each process writes the shards its devices hold.

    Raises:
        OutputError: the checkpoint could not be written (a full disk, a write error): one line naming the step's
            directory and why; what orbax had started is removed, and the message says which earlier checkpoint
            is kept. Orbax's own logging of the failure is kept off stderr.
    """
    import orbax.checkpoint as ocp

    from convert.base.integrity import write_manifest
    from flax_model.sharding import is_writer, sync_processes

    step = int(state.step)
    if manager.latest_step() == step:
        return
    directory = Path(manager.directory)
    try:
        # Made here, before orbax starts its writer threads: when orbax itself fails to make it, the threads wait
        # for a signal that never comes and hold the process at exit for orbax's 5-minute timeout.
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_orbax():
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)))
            manager.wait_until_finished()
        sync_processes("checkpoint saved")
        if is_writer():
            write_manifest(directory / str(step))
        sync_processes("checkpoint manifest written")
    except KeyboardInterrupt:
        _settle(manager)
        remove_partial_step(directory, step)
        raise
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise ValueError, OSError, RuntimeError...
        _settle(manager)
        remove_partial_step(directory, step)
        raise OutputError(f"{directory / str(step)}: the checkpoint of step {step} could not be written "
                          f"({_write_failure(e)}); what was written of it was removed; "
                          f"{_kept_checkpoint(directory, step)}") from None


def restore_checkpoint(manager: Any, state: Any, where: Path, verify: bool = True) -> tuple[Any, dict[str, Any]]:
    """The latest checkpoint's (state, history), restored with the shapes, dtypes and shardings of `state` (a
    state on a mesh comes back on that mesh, each process reading its devices' shards). Its files are checked
    against the sha256 recorded when it was saved first (`verify=False`: already checked).

    Raises:
        CheckpointError: the checkpoint's files differ from what was saved (naming the step directory and the
            file), or the checkpoint does not fit `state` (another model or other settings).
    """
    import jax
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if verify:
        verify_checkpoint(where, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        with quiet_orbax():
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise CheckpointError(f"{where}: the checkpoint at step {step} does not fit this model and these settings "
                              f"({str(e).splitlines()[0][:200]})") from None
    return restored.state, dict(restored.meta)


def verify_checkpoint(directory: Path, step: int) -> None:
    """Refuses the checkpoint of `step` in `directory` unless its files are those saved (sha256 manifest); the
    message names the step directory and says which earlier checkpoint could be resumed from instead."""
    from convert.base.integrity import check_manifest

    try:
        check_manifest(Path(directory) / str(step))
    except CheckpointError as e:
        earlier = sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit() and int(p.name) < step)
        advice = (f"move {Path(directory) / str(step)} away to resume from step {earlier[-1]}, the checkpoint before"
                  if earlier else "no earlier checkpoint is there: start again without resume")
        raise CheckpointError(f"{e}; nothing was resumed ({advice})") from None


def checkpoint_manager(directory: Path) -> Any:
    """An orbax manager of the run's checkpoints (the two latest kept). The directory is made by the first save,
    not before: a run refused or failing before it saves leaves nothing behind."""
    import orbax.checkpoint as ocp

    with quiet_orbax():
        return ocp.CheckpointManager(directory.resolve(),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=2, create=False))


class quiet_orbax:  # noqa: N801 - a context manager, named as one reads it
    """Keeps orbax's logging (absl: warnings about slow saves, a traceback per failed thread) off stderr while it
    works: the toolkit reports a failure itself, in one line."""

    def __enter__(self) -> None:
        import logging

        self._logger = logging.getLogger("absl")
        self._level = self._logger.level
        self._logger.setLevel(logging.CRITICAL + 1)

    def __exit__(self, *exc: Any) -> None:
        self._logger.setLevel(self._level)


def _write_failure(error: BaseException) -> str:
    """Why a checkpoint write failed, in a few words: the OS's reason when orbax or tensorstore gives its code."""
    import errno
    import os
    import re

    if isinstance(error, OSError):
        return cli.describe_os_error(error).split(": ", 1)[-1]
    text = " ".join(str(error).split())
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        number = int(code.group(1))
        full = " (the disk is full)" if number in (errno.ENOSPC, errno.EDQUOT) else ""
        return os.strerror(number) + full
    return f"{type(error).__name__}: {text[:160]}"


def _settle(manager: Any) -> None:
    """Waits for orbax's background writers after a failed save, so that nothing writes once the partial step is
    removed (their own failure was reported already)."""
    try:
        with quiet_orbax():
            manager.wait_until_finished()
    except Exception:  # noqa: BLE001, S110 - the save's failure is the one to report
        pass


def remove_partial_step(directory: Path, step: int) -> None:
    """Removes what a failed or interrupted save of `step` left: orbax's temporary directory, and a step
    directory without the manifest that marks it complete. Nothing else is touched."""
    from convert.base.integrity import MANIFEST

    if not directory.is_dir():
        return
    for path in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(path, ignore_errors=True)
    final = directory / str(step)
    if final.is_dir() and not (final / MANIFEST).is_file():
        shutil.rmtree(final, ignore_errors=True)


def _kept_checkpoint(directory: Path, failed: int) -> str:
    from convert.base.integrity import MANIFEST

    steps = sorted(int(p.name) for p in (directory.iterdir() if directory.is_dir() else ())
                   if p.name.isdigit() and int(p.name) != failed and (p / MANIFEST).is_file())
    if steps:
        return f"the last good checkpoint, step {steps[-1]}, is kept in {directory} (continue with resume=True)"
    return "there is no earlier checkpoint"


# Orbax's temporary names for a checkpoint being written (`3.orbax-checkpoint-tmp-1712345678`).
_ORBAX_TMP = re.compile(r".*\.orbax-checkpoint-tmp.*")


def check_checkpoint_directory(directory: Path, *, sources: Sequence[tuple[str, Any]], resume: bool,
                               param: str | None) -> None:
    """Refuses, before any work, a checkpoint directory that could mix with or lose what is not a checkpoint.

    Refused (UsageError): the current or home directory (or one containing either), a directory that is,
    contains or lies inside what the run reads or its output (`sources`), something that is not a directory, a
    directory holding anything but this toolkit's checkpoints (step directories), and, without `resume`, one
    holding checkpoints of an earlier run. `param` names the option when the directory was given (None: the
    default, named by its path alone).
    """
    from convert.base.outputs import check_work_directory

    check_work_directory(directory, sources=sources, param=param)
    if not directory.is_dir():
        return
    where = f"{param}={directory}" if param else str(directory)
    entries = sorted(os.scandir(directory), key=lambda e: e.name)
    foreign = [e.name for e in entries if not (e.is_dir(follow_symlinks=False) and e.name.isdigit())
               and not _ORBAX_TMP.fullmatch(e.name)]
    if foreign:
        raise UsageError(f"{where}: holds {foreign[0]}, which is not a checkpoint of this toolkit; name a new or empty "
                         "directory for the checkpoints", param=param)
    steps = [int(e.name) for e in entries if e.name.isdigit()]
    if steps and not resume:
        raise UsageError(f"{where}: holds checkpoints of an earlier run (up to step {max(steps)}); pass resume=True "
                         "to continue it, or remove the directory", param=param)
