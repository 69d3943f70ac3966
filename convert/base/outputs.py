"""Where outputs may go, and how they appear: one policy for every writer of the toolkit.

Every output (a composed or fine-tuned model directory, a `save_pretrained` directory, a JSON-lines file of
transcripts) follows the same rules:

* `check_output_location` / `check_output_file` refuse, before any work, a location that could lose a file the
  toolkit did not write: what the run reads (sources, models, audio, manifests, generation configs, the Hugging
  Face cache), the current or home directory, a symbolic link, something of another kind, an existing output
  without `overwrite`, and (directories) an existing directory the toolkit did not write.
* One writer per output: `atomic_directory` and `atomic_file` hold a lock (`.<name>.lock` beside the output,
  `flock`, released when the process ends whatever happens) for the whole write; a second run writing to the same
  path fails at once with one line naming the process that holds it.
* The output is written under a temporary name beside it (`.<name>.partial-<pid>-<n>`) and appears in one rename
  when complete. A new output is created exclusively (`renameat2(RENAME_NOREPLACE)`): if something else appeared
  at its path meanwhile, that is left alone and the run fails; an existing one is swapped in one step
  (`RENAME_EXCHANGE`) and only if it is still the one that was checked.
* A failure or an interrupt (Ctrl-C, SIGTERM, SIGHUP) removes the temporary output, the lock and the parent
  directories the run created. `convert.cli`'s interrupt watcher calls `abandon_outputs` from its own thread.
* An OSError of the output location (a full disk, a file size limit, a read-only file system) becomes one line
  (`OutputError`) naming the output, which says that nothing was written.
* Updating a directory in place (`keep=`, for `save_pretrained`): the entries the caller does not own are carried
  into the new directory as hard links (never copied, changed or removed), so the swap replaces only the owned
  files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convert.base.errors import ConvertError, OutputError, UsageError

TOOLKIT_MARKER = "compose_report.json"  # every directory this toolkit writes holds it (see atomic_directory)
TOOLKIT_NAME = "speech-encdec-flax"
# errno values that mean "the output location cannot take the data", whatever file the error names.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
Sources = Sequence[tuple[str, "str | Path | None"]]


# ----------------------------------------------------------------------------------------------------------
# Outputs in progress (what an interrupt removes)


@dataclass
class _Output:
    target: Path
    created: list[Path]  # parent directories this run created, outermost first
    tmp: Path | None = None
    lock: _Lock | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)


_OUTPUTS: dict[int, _Output] = {}
# Held while an output is committed (renamed into place) or abandoned: an interrupt never sees half of either.
_OUTPUTS_LOCK = threading.RLock()
_output_ids = iter(range(1, 2**62))


def abandon_outputs() -> list[Path]:
    """Removes every temporary output in progress (its lock, and the parent directories its run created); returns
    their targets. Called by `convert.cli`'s interrupt watcher from another thread, just before the process ends."""
    with _OUTPUTS_LOCK:
        outputs = list(_OUTPUTS.values())
        _OUTPUTS.clear()
        for output in outputs:
            _discard(output)
    return [output.target for output in outputs if output.tmp is not None]


def register_cleanup(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Runs `cleanup` if the process is interrupted before the returned function is called (which unregisters
    it): e.g. removing a checkpoint library's temporary directory. Returns the unregister function."""
    key = next(_output_ids)
    with _OUTPUTS_LOCK:
        _OUTPUTS[key] = _Output(Path(), [], cleanups=[cleanup])

    def unregister() -> None:
        with _OUTPUTS_LOCK:
            _OUTPUTS.pop(key, None)

    return unregister


def _discard(output: _Output) -> None:
    for cleanup in output.cleanups:
        try:
            cleanup()
        except Exception:  # noqa: BLE001 - cleaning up must go on
            pass
    if output.tmp is not None:
        _remove_path(output.tmp)
    if output.lock is not None:
        output.lock.release()
    remove_created(output.created)


class _Interrupted(BaseException):
    """Raised from SIGTERM/SIGHUP so that a killed run cleans up like Ctrl-C does."""


# ----------------------------------------------------------------------------------------------------------
# Where an output may go


def check_output_location(target: str | Path, *, overwrite: bool = False, sources: Sources = (),
                          param: str = "output", needed_bytes: int | None = None, update: bool = False) -> Path:
    """Refuses, before any work, an output directory that could lose a file this toolkit did not write.

    Refused (UsageError): a symbolic link; the current directory, the home directory, or a directory that
    contains either; a directory that is, contains or lies inside a source (symbolic links resolved) or the
    Hugging Face cache (whose snapshots are sources); something that is not a directory; a non-empty directory
    without `overwrite`; with `overwrite`, a non-empty directory this toolkit did not write (no
    `compose_report.json` in it). Refused (OutputError): a location whose parent cannot be created or written,
    and, when `needed_bytes` is given, a disk without that much free space.

    Args:
        target: the output directory.
        overwrite: whether an existing directory this toolkit wrote may be replaced.
        sources: (what, path) of everything the run reads, e.g. ("the encoder source", path): directories or
            files (a file is protected from being the output or lying inside it).
        param: the parameter naming the output, for messages (`output=...`).
        needed_bytes: the size of what will be written, to compare with the free space.
        update: the writer replaces only its own files in an existing directory (the messages say so).

    Returns:
        The target with symbolic links in its parents resolved.
    """
    target, refuse, resolved = _unlinked(target, param, "directory")
    _refuse_protected(resolved, refuse)
    _refuse_sources(resolved, sources, refuse)
    if target.exists() and not target.is_dir():
        refuse("exists and is not a directory")
    if target.is_dir() and _non_empty(target):
        if not overwrite:
            refuse("directory exists and is not empty (pass overwrite=True to replace its model files; the other "
                   "files are kept)" if update else "directory exists and is not empty (pass overwrite=True to "
                   "replace it)")
        if not (target / TOOLKIT_MARKER).is_file():
            refuse(f"exists and was not written by this toolkit (it has no {TOOLKIT_MARKER}); overwrite=True "
                   "replaces only a directory this toolkit wrote: remove it yourself or choose another")
    parent = _writable_parent(resolved, refuse)
    if needed_bytes:
        try:
            usage = shutil.disk_usage(parent)
        except OSError:
            usage = None
        free = usage.free if usage is not None and usage.total else None  # /proc and the like report 0 of 0
        if free is not None and free < needed_bytes:
            refuse(f"needs {_size(needed_bytes)} but the disk holding {parent} has {_size(free)} free", OutputError)
    return resolved


def check_output_file(target: str | Path, *, overwrite: bool = False, sources: Sources = (),
                      param: str = "output") -> Path:
    """Refuses, before any work, an output file that could replace something it should not.

    Refused (UsageError): a symbolic link; a directory, a device or anything but a regular file; an existing
    file without `overwrite`; a file the run reads (`sources`: files, compared by path and by identity, so a hard
    link counts) or one inside a directory the run reads whole (a model, the Hugging Face cache). Refused
    (OutputError): a location whose parent cannot be created or written.

    Returns:
        The target with symbolic links in its parents resolved.
    """
    target, refuse, resolved = _unlinked(target, param, "file")
    if target.is_dir():
        refuse("is a directory; name a file")
    if target.exists() and not target.is_file():
        refuse("exists and is not a regular file (a device, a pipe or a socket is never replaced)")
    _refuse_sources(resolved, sources, refuse, as_file=True)
    if target.exists() and not overwrite:
        refuse("exists (pass overwrite=True to replace it)")
    _writable_parent(resolved, refuse)
    return resolved


def check_work_directory(target: str | Path, *, sources: Sources = (), param: str | None = None) -> Path:
    """Refuses, before any work, a directory a run writes into as it goes (fine-tuning's checkpoints) where that
    could touch what is not the run's: the current or home directory or one containing either, a directory that
    is, contains or lies inside what the run reads or its other outputs (`sources`) or the Hugging Face cache,
    something that is not a directory (UsageError), a location that cannot be created (OutputError). A symbolic
    link to a directory is followed (the checks apply to where it leads). `param` None: the messages name the
    path alone (a default location no option named).

    Returns:
        The directory with symbolic links resolved.
    """
    target = Path(target).expanduser()
    refuse = _refuser(target, param)
    resolved = Path(os.path.realpath(target))
    _refuse_protected(resolved, refuse)
    _refuse_sources(resolved, sources, refuse)
    if os.path.lexists(target) and not target.is_dir():
        refuse("exists and is not a directory")
    _writable_parent(resolved, refuse)
    return resolved


def _unlinked(target: str | Path, param: str, kind: str) -> tuple[Path, Callable[..., None], Path]:
    """(the output's path, its `refuse`, the path with links in its parents resolved); a symbolic link is refused
    (replacing it would not replace what it points to)."""
    target = Path(target).expanduser()
    refuse = _refuser(target, param)
    if target.is_symlink():
        refuse(f"is a symbolic link (to {os.readlink(target)}); name the {kind} itself")
    return target, refuse, Path(os.path.realpath(target))


def _refuser(target: Path, param: str | None) -> Callable[..., None]:
    """`refuse(why, kind=UsageError)`: raises the one-line error about `target` (named as `_label` says)."""
    def refuse(why: str, kind: type = UsageError) -> None:
        raise kind(f"{_label(param, target)}: {why}", param=param)
    return refuse


def _refuse_protected(resolved: Path, refuse: Callable[..., None]) -> None:
    """Refuses the current or the home directory, or a directory that contains either."""
    for what, path in (("the current directory", Path(os.path.realpath(os.getcwd()))),
                       ("your home directory", Path(os.path.realpath(Path.home())))):
        if resolved == path:
            refuse(f"is {what}; name a new directory for the output")
        if resolved in path.parents:
            refuse(f"contains {what} ({path}); name a new directory for the output")


def _refuse_sources(resolved: Path, sources: Sources, refuse: Callable[..., None], as_file: bool = False) -> None:
    """Refuses an output that is, contains or (for a directory source) lies inside what the run reads."""
    identity = _identity(resolved)
    for what, path in [*sources, ("the Hugging Face cache", _hub_cache())]:
        if path is None:
            continue
        path = Path(os.path.realpath(Path(path).expanduser()))
        same = resolved == path or (identity is not None and identity == _identity(path))
        if same:
            if as_file:
                refuse(f"is {what} ({path}); the output must not replace what the run reads")
            refuse(f"is {what} ({path}); name a new directory")
        if resolved in path.parents:
            refuse(f"contains {what} ({path}); the output must not hold what the run reads or writes")
        if path in resolved.parents:
            refuse(f"lies inside {what} ({path}); the output must be outside what the run reads or writes")


def _writable_parent(resolved: Path, refuse: Callable[..., None]) -> Path:
    existing = next((p for p in [resolved, *resolved.parents] if os.path.lexists(p)), Path("/"))
    if existing != resolved and not existing.is_dir():
        refuse(f"cannot be created: {existing} is not a directory", OutputError)
    parent = existing if existing != resolved else resolved.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        refuse(f"cannot be created: {parent} is on a read-only file system" if read_only
               else f"cannot be created: no permission to write in {parent}", OutputError)
    return parent


def input_sources(what: str, paths: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(what, path) for each distinct existing path, e.g. `input_sources("an audio file", files)`."""
    seen: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if p.exists():
            seen.setdefault(p, None)
    return [(what, p) for p in seen]


def _hub_cache() -> Path | None:
    try:
        from convert.base.hub import hub_cache_dir

        return hub_cache_dir()
    except Exception:  # noqa: BLE001 - without huggingface_hub there is no cache to protect
        return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _non_empty(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is not None


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


# ----------------------------------------------------------------------------------------------------------
# One writer per output


class _Lock:
    """An exclusive `flock` on `.<name>.lock` beside an output; the kernel releases it when the process ends.

    Held per process and path: taking it again in the same process (a run that claims its output early, then
    writes it) counts up instead of failing.
    """

    _held: dict[Path, _Lock] = {}

    def __init__(self, path: Path, fd: int):
        self.path, self._fd, self._count = path, fd, 1

    @classmethod
    def take(cls, target: Path, param: str | None) -> _Lock:
        import fcntl

        path = Path(os.path.abspath(target.parent)) / f".{target.name}.lock"
        with _OUTPUTS_LOCK:
            if path in cls._held:
                cls._held[path]._count += 1
                return cls._held[path]
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                    os.close(fd)
                    who = f" (process {holder})" if holder.isdigit() else ""
                    raise OutputError(f"{_label(param, target)}: another run{who} is writing it now; wait for it to "
                                      "finish or choose another location", param=param) from None
                if _identity(path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                    break
                os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
            try:  # who holds it, for the other run's message; a full disk only loses that detail
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
            cls._held[path] = lock = cls(path, fd)
            return lock

    def release(self) -> None:
        with _OUTPUTS_LOCK:
            if self._fd is None:
                return
            self._count -= 1
            if self._count:
                return
            self._held.pop(self.path, None)
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still holding it: whoever opens the path next creates a new file
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def claimed(target: str | Path, param: str | None = "output") -> Iterator[None]:
    """Holds `target`'s lock for a whole run (e.g. fine-tuning, long before its output is written), so that a
    second run writing there fails at once; `atomic_directory` / `atomic_file` in the same process take it again
    freely. The parent directory must exist or be creatable (it is created, and removed again if left empty)."""
    target = Path(target).expanduser()
    created = make_directories(target.parent)
    output = _Output(target, created)
    key = next(_output_ids)
    with _OUTPUTS_LOCK:
        _OUTPUTS[key] = output
    try:
        output.lock = _Lock.take(target, param)
        yield
    finally:
        _abandon(key, output)


def _label(param: str | None, target: Path) -> str:
    """How a message names an output: `param=PATH` (the commands show the flag), or the path alone when no
    option named it (a default location)."""
    return f"{param}={target}" if param else str(target)


# ----------------------------------------------------------------------------------------------------------
# Renames that never replace what they should not

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux's renameat2; False when the C library or the file system lacks it (the caller falls back)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _rename_new(src: Path, dst: Path) -> None:
    """Renames `src` to `dst` only where nothing is (an empty directory in the way is taken away first).

    Raises:
        FileExistsError: something is at `dst`; it is left as it is.
    """
    if dst.is_dir() and not dst.is_symlink():
        try:
            dst.rmdir()  # an empty directory made for the output
        except OSError:
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if src.is_dir():
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)  # never over a non-empty directory
    else:
        os.link(src, dst)  # fails when dst exists
        os.unlink(src)


def _swap(src: Path, dst: Path) -> None:
    """Exchanges `src` and `dst` (in one step where the system allows it): `src` then holds the old `dst`."""
    if _renameat2(src, dst, _RENAME_EXCHANGE):
        return
    old = dst.with_name(dst.name + ".swap")
    os.rename(dst, old)
    os.rename(src, dst)
    os.rename(old, src)


# ----------------------------------------------------------------------------------------------------------
# Writing an output


def make_directories(directory: Path) -> list[Path]:
    """Creates `directory` and its missing parents; returns those created, outermost first."""
    missing = []
    for p in [directory, *directory.parents]:
        if p.exists():
            break
        missing.append(p)
    created = []
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:
            continue
        created.append(p)
    return created


def remove_created(created: Sequence[Path]) -> None:
    """Removes the parent directories a run created, innermost first, each only while it is empty."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break


def _remove_path(path: Path) -> None:
    """Removes a temporary file or directory, even while another thread still creates files in it."""
    if not os.path.lexists(path):
        return
    if not path.is_dir() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()
        return
    trash = path.with_name(path.name + ".trash")
    try:
        path.rename(trash)  # files opened by their old path from now on fail instead of landing in it
    except OSError:
        trash = path
    for _ in range(5):
        shutil.rmtree(trash, ignore_errors=True)
        if not os.path.lexists(trash):
            return


def _default_handler(s: signal.Signals) -> bool:
    return signal.getsignal(s) in (signal.default_int_handler, signal.SIG_DFL)


@contextlib.contextmanager
def _output(target: Path, param: str, make_tmp: Callable[[Path], None], commit: Callable[[Path], None],
            recheck: Callable[[], None]) -> Iterator[Path]:
    """The life of one output: parents, lock, temporary path, the caller's writing, commit or removal."""
    received: list[str] = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        raise _Interrupted(received[-1])

    # Installed before the temporary output exists, so that no signal can leave it behind; only over Python's
    # defaults (a command's interrupt guard, or a notebook's handler, is left alone).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                    if _default_handler(s)}
        for s in previous:
            signal.signal(s, on_signal)
    key = next(_output_ids)
    output = None
    try:
        try:
            created = make_directories(target.parent)
        except OSError as e:
            raise OutputError(f"{param}={target}: cannot be created ({e.strerror or type(e).__name__})",
                              param=param) from None
        output = _Output(target, created)
        with _OUTPUTS_LOCK:
            _OUTPUTS[key] = output
        output.lock = _Lock.take(target, param)
        recheck()  # another run may have finished it between the caller's check and the lock
        tmp = target.parent / f".{target.name}.partial-{os.getpid()}-{key}"
        with _OUTPUTS_LOCK:
            output.tmp = tmp
            make_tmp(tmp)
        yield tmp
        if received:
            # The handler's exception was raised where Python only prints exceptions (a gc callback, such
            # as JAX's, or a __del__) and the work went on: it is an interrupt all the same.
            raise _Interrupted(received[0])
        with _OUTPUTS_LOCK:
            if _OUTPUTS.pop(key, None) is None:  # abandoned by an interrupt meanwhile
                raise _Interrupted("SIGINT")
            try:
                commit(tmp)
            finally:
                _discard(output)  # the lock; and the old output, which the commit left at the temporary path
    except _Interrupted as e:
        _abandon(key, output)
        raise KeyboardInterrupt(str(e)) from None
    except OSError as e:
        _abandon(key, output)
        if output is not None and (e.errno in _OUTPUT_ERRNOS or _inside(e.filename, target.parent)):
            raise OutputError(f"{param}={target}: cannot be written ({_os_reason(e)}); nothing was written",
                              param=param) from None
        raise
    except ConvertError as e:
        _abandon(key, output)
        if output is not None and output.tmp is not None and "nothing was written" not in str(e):
            e.args = (f"{e}; nothing was written to {target}", *e.args[1:])
        raise
    except BaseException:
        _abandon(key, output)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _abandon(key: int, output: _Output | None) -> None:
    with _OUTPUTS_LOCK:
        _OUTPUTS.pop(key, None)
        if output is not None:
            _discard(output)


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False, *, sources: Sources = (), param: str = "output",
                     needed_bytes: int | None = None, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yields a fresh temporary directory next to `target`; on success it becomes `target` in one rename.

    `check_output_location` runs first (no source, working or home directory is ever written to or replaced;
    an existing directory is replaced only with `overwrite` and only when this toolkit wrote it). The directory
    written gets a `compose_report.json` (a stub naming the toolkit, unless the caller wrote the report or `keep`
    carries the old one over), which marks it as the toolkit's. See the module docstring for the lock, the
    exclusive commit, interrupts and errors.

    Args:
        keep: for an update in place: which entries (by name) of an existing `target` to carry over into the new
            directory, unless the caller wrote an entry of that name. None: the old directory goes whole.
    """
    target = Path(target).expanduser()
    check = lambda: check_output_location(target, overwrite=overwrite, sources=sources, param=param,  # noqa: E731
                                          needed_bytes=needed_bytes, update=keep is not None)
    check()
    state: dict[str, tuple[int, int] | None] = {}

    def recheck() -> None:
        check()
        state["existing"] = _identity(target) if target.is_dir() and _non_empty(target) else None

    def commit(tmp: Path) -> None:
        existing = state["existing"]
        if existing is not None and keep is not None:
            _carry_over(target, tmp, keep)
        if not (tmp / TOOLKIT_MARKER).exists():
            (tmp / TOOLKIT_MARKER).write_text(json.dumps({"written_by": TOOLKIT_NAME}) + "\n")
        # Replacing: `tmp` then holds the old directory, removed with the lock.
        _publish(tmp, target, existing, param, lambda: (target / TOOLKIT_MARKER).is_file(), _swap)

    with _output(target, param, lambda tmp: tmp.mkdir(), commit, recheck) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(target: str | Path, overwrite: bool = False, *, sources: Sources = (),
                param: str = "output") -> Iterator[Path]:
    """Yields a temporary file path next to `target` (the file exists, empty); on success it becomes `target` in
    one rename (flushed to disk first). `check_output_file` runs first; see the module docstring for the rest.
    A failure's message (a ConvertError's) gets "; nothing was written to TARGET"."""
    target = Path(target).expanduser()
    check = lambda: check_output_file(target, overwrite=overwrite, sources=sources, param=param)  # noqa: E731
    check()
    state: dict[str, tuple[int, int] | None] = {}

    def recheck() -> None:
        check()
        state["existing"] = _identity(target) if target.is_file() else None

    def make(tmp: Path) -> None:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))

    def commit(tmp: Path) -> None:
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _publish(tmp, target, state["existing"], param, lambda: True, os.replace)

    with _output(target, param, make, commit, recheck) as tmp:
        yield tmp


def _publish(tmp: Path, target: Path, existing: tuple[int, int] | None, param: str,
             still_ours: Callable[[], bool], replace: Callable[[Path, Path], None]) -> None:
    """Puts `tmp` at `target`: exclusively when nothing was there when the run began (`existing` None), else with
    `replace`, only while `target` is still the one checked then (same identity, `still_ours()`).

    Raises:
        OutputError: something else took the path meanwhile; it is left as it is.
    """
    if existing is None:
        try:
            _rename_new(tmp, target)
        except FileExistsError:
            raise OutputError(f"{param}={target}: appeared while this run wrote, and was left as it is",
                              param=param) from None
        return
    if _identity(target) != existing or not still_ours():
        raise OutputError(f"{param}={target}: was replaced or changed while this run wrote, and was left as it is",
                          param=param)
    replace(tmp, target)


def _carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Hard-links the entries of `old` that `keep` names (and `new` lacks) into `new`, folders recreated."""
    with os.scandir(old) as entries:
        for entry in entries:
            if keep(entry.name) and not os.path.lexists(new / entry.name):
                _link_tree(Path(entry.path), new / entry.name)


def _link_tree(src: Path, dst: Path) -> None:
    mode = os.lstat(src).st_mode
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISDIR(mode):
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
        shutil.copystat(src, dst)
    else:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)  # a file system without hard links


def _inside(filename: object, directory: Path) -> bool:
    if not isinstance(filename, (str, os.PathLike)):
        return False
    path = Path(os.path.abspath(filename))
    return path == directory.absolute() or directory.absolute() in path.parents


def _os_reason(e: OSError) -> str:
    why = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{why}: the disk is full"
    if e.errno == errno.EFBIG:
        return f"{why}: a file size limit was reached"
    return why
