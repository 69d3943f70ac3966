"""Conventions shared by every command (`python -m convert.<command>`): exit codes, one-line errors, Ctrl-C,
help text, progress bars, and the mapping between the Python API's parameter names and the flags.

How a command module uses it:

    from convert import cli  # the module's first project import (stdlib only; see "Interrupts")

    def build_parser() -> cli.ArgumentParser:
        p = cli.ArgumentParser(prog="python -m convert.<command>", description="...")
        p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")  # help adds "(default: 0)"
        return p

    def main(argv: Sequence[str] | None = None) -> int:
        parser = build_parser()
        args = parser.parse_args(argv)                   # a bad flag: one line, exit 2
        return cli.run_command(lambda: work(args), parser)  # the exit code; errors printed as one line

    if __name__ == "__main__":
        cli.run(main)

Exit codes (`EXIT_*`): 0 success; 1 an error (a bad checkpoint, a failed check or verification, a full disk);
2 a usage error (an unknown or malformed flag, a value out of range, an output location the toolkit refuses:
argparse's errors and `convert.base.errors.UsageError`); 130 an interrupt (Ctrl-C, SIGTERM, SIGHUP).

Messages: every error is one line on stderr, `error: <message>` (`ERROR_PREFIX`); an interrupt prints
`interrupted: <what was left>`. The library raises `ConvertError`s that speak its own language
(`output=/tmp/x: ...`, `pass overwrite=True`, `pass seed=...`); `render(error, parser)` turns them into the
command's (`--output /tmp/x: ...`, `pass --overwrite`, `pass --seed SEED`), the mapping read from the parser
itself: each option's `dest` is the API parameter of the same name (`--max-shard-size` <-> `max_shard_size`), a
`store_true` switch maps `name=True` to its flag, a `store_false` one `name=False`, and a positional argument is
named by its value alone. `run_command` prints anything else without a traceback too (an `OSError` with its file, and, as a last
resort, an internal error with its type), so that no traceback ever reaches a user.

Interrupts: `install_interrupt_guard()` (called by importing this module as the first import of a command run
with `python -m`, and again by `run`) routes SIGINT, SIGTERM and SIGHUP through `signal.set_wakeup_fd` to a
watcher thread. The main thread is never interrupted; the watcher removes the temporary outputs that
`convert.base.outputs.atomic_directory` registered (and the parent directories it created), prints one line and
ends the process with `os._exit(130)`. That works whenever the signal comes: during imports, inside a long
native call such as an XLA compilation (which a KeyboardInterrupt would wait for), and without running the
interpreter's teardown under threads still inside native code (which has crashed with exit 139). A command
says what the line should report with `set_interrupt_note("nothing was uploaded")`. Without the guard
(`main(argv)` called in-process, as the tests do), `run_command` turns a KeyboardInterrupt into the same line
and returns 130; `atomic_directory` has removed its temporary directory by then.

Progress bars: `show_progress(requested)` is True only when stderr is a terminal, so that a log file or a pipe
never receives half-drawn bar lines.

Argument checks shared by the library functions (`require_int`, `require_float`, `require_choice`) raise
`UsageError`s in the API's language, before any work.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
ERROR_PREFIX = "error: "
INTERRUPT_PREFIX = "interrupted"
MAX_MESSAGE = 600  # characters of one error line; a longer message is cut (its start names the culprit)
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# ----------------------------------------------------------------------------------------------------------
# Messages


def flag_names(parser: argparse.ArgumentParser | Mapping[str, str] | None) -> dict[str, str]:
    """API spelling -> command spelling, read from a parser (see the module docstring) or given as a dict.

    Keys are parameter names (`output` -> `--output`; a positional -> "") or whole tokens of a hint: switches
    (`overwrite=True` -> `--overwrite`, `verify=False` -> `--no-verify`) and `name=...` -> `--flag METAVAR`.
    """
    if parser is None:
        return {}
    if isinstance(parser, Mapping):
        return dict(parser)
    names: dict[str, str] = {}
    for action in parser._actions:  # argparse has no public accessor for its actions
        if action.dest in (argparse.SUPPRESS, "help"):
            continue
        if not action.option_strings:
            names[action.dest] = ""
            continue
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            names[f"{action.dest}=True"] = flag
        elif isinstance(action, argparse._StoreFalseAction):
            names[f"{action.dest}=False"] = flag
        else:
            names.setdefault(action.dest, flag)
            names.setdefault(f"{action.dest}=...", f"{flag} {action.metavar or action.dest.upper()}")
    return names


def render(error: BaseException, parser: argparse.ArgumentParser | Mapping[str, str] | None = None) -> str:
    """The one line a command prints for `error` (without the prefix), in the command's spelling."""
    names = flag_names(parser)
    text = " ".join(str(error).split()) or type(error).__name__
    param = getattr(error, "param", None)
    if param and param in names and text.startswith(f"{param}="):
        flag = names[param]
        text = (f"{flag} " if flag else "") + text[len(param) + 1:]
    for token, flag in names.items():
        if "=" in token:
            text = _replace_token(text, token, flag)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE - 40].rstrip() + f" ... ({len(text) - MAX_MESSAGE + 40} more characters)"
    return text


def _replace_token(text: str, token: str, replacement: str) -> str:
    out, start = [], 0
    while (i := text.find(token, start)) >= 0:
        end = i + len(token)
        before_ok = i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_-.")
        after_ok = end == len(text) or not (text[end].isalnum() or text[end] == "_")
        out.append(text[start:i] + (replacement if before_ok and after_ok else token))
        start = end
    return "".join(out) + text[start:]


def print_error(message: str) -> None:
    """Prints `error: message` as one line on stderr (after clearing a progress line on a terminal).

    While the interrupt guard ends the process, nothing is printed (the error is the interrupt's doing: its
    temporary output vanished under the writers): the thread waits for the end instead.
    """
    while _interrupting.is_set():
        time.sleep(1)  # the watcher ends the process with os._exit
    _clear_progress_line()
    print(ERROR_PREFIX + message, file=sys.stderr, flush=True)


def _clear_progress_line() -> None:
    try:
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[2K")
    except (OSError, ValueError):
        pass


# ----------------------------------------------------------------------------------------------------------
# Running a command


def run_command(body: Callable[[], int | None], parser: argparse.ArgumentParser | Mapping[str, str] | None = None
                ) -> int:
    """Runs a command's work and returns its exit code, printing any error as one line (see the module docstring).

    Args:
        body: the work; returns an exit code (None means 0).
        parser: the command's parser (or an explicit name mapping), to render messages with its flags.
    """
    from convert.base.errors import ConvertError, UsageError

    try:
        code = body()
        return EXIT_OK if code is None else int(code)
    except UsageError as e:
        print_error(render(e, parser))
        return EXIT_USAGE
    except ConvertError as e:
        print_error(render(e, parser))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _report_interrupt(_abandon_outputs())
        return EXIT_INTERRUPTED
    except MemoryError:
        print_error("out of memory (the model or the input is too large for this machine)")
        return EXIT_ERROR
    except OSError as e:
        print_error(describe_os_error(e))
        return EXIT_ERROR
    except RecursionError:
        print_error("the input nests too deeply to be read")
        return EXIT_ERROR
    except Exception as e:  # the last resort: a bug, but still one line for the user
        where = _innermost_frame(e)
        print_error(f"internal error: {type(e).__name__}: {render(e, parser)}{where} (please report it; set "
                    "SPEECH_ENCDEC_TRACEBACK=1 to see the traceback)")
        if os.environ.get("SPEECH_ENCDEC_TRACEBACK"):
            raise
        return EXIT_ERROR


def describe_os_error(e: OSError) -> str:
    """`PATH: why` for an OSError from the environment (permissions, a full disk, a missing file)."""
    import errno

    why = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = f"{why}: the disk is full"
    elif e.errno == errno.EFBIG:
        why = f"{why}: the file size limit was reached"
    where = e.filename if e.filename is not None else "a file"
    return f"{where}: {why}"


def _innermost_frame(e: BaseException) -> str:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f" (at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})"


def quiet_library_warnings() -> None:
    """A command's stderr carries its own lines only: libraries' Python warnings (torch's unpickler, numpy's
    casts) would add lines that say nothing about the user's input."""
    import warnings

    warnings.simplefilter("ignore")


def run(main: Callable[[], int | None]) -> NoReturn:
    """`if __name__ == "__main__": cli.run(main)`: guards interrupts, runs `main()`, exits with its code."""
    install_interrupt_guard()
    quiet_library_warnings()
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader went away; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_ERROR
    while _interrupting.is_set():  # a signal came at the very end: the watcher reports it and exits 130
        time.sleep(1)
    sys.exit(EXIT_OK if code is None else code)


# ----------------------------------------------------------------------------------------------------------
# Interrupts

_guard_lock = threading.Lock()
_guard_installed = False
_interrupting = threading.Event()  # set by the watcher when it starts ending the process
_note: str | None = None
_deferred: Callable[[], None] | None = None


def defer_interrupts(on_interrupt: Callable[[], None] | None) -> None:
    """For a command that must finish something before it stops (fine-tuning saves a checkpoint): the next
    signal calls `on_interrupt` (from the watcher thread, so it should only set a flag that the command polls)
    instead of ending the process; a second signal ends it as usual. None restores the default.
    """
    global _deferred
    _deferred = on_interrupt


def set_interrupt_note(note: str | None) -> None:
    """What the interrupt line says after `interrupted: ` (e.g. "nothing was uploaded"); None for nothing.

    A temporary output that the interrupt removes is reported first ("nothing was written to DIR; NOTE").
    """
    global _note
    _note = note


def install_interrupt_guard() -> bool:
    """Routes SIGINT, SIGTERM and SIGHUP to a watcher thread that cleans up and exits 130 (module docstring).

    Only in the main thread of the main interpreter; a second call does nothing. Returns whether the guard is
    active.
    """
    global _guard_installed
    with _guard_lock:
        if _guard_installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            for s in _SIGNALS:
                signal.signal(s, _ignore_in_main_thread)
        except (ValueError, OSError):
            os.close(read_fd)
            os.close(write_fd)
            return False
        threading.Thread(target=_watch, args=(read_fd,), name="interrupt-guard", daemon=True).start()
        _guard_installed = True
        return True


def interrupt_guard_active() -> bool:
    """Whether signals are handled by the watcher (then nothing else may install handlers for them)."""
    return _guard_installed


def _ignore_in_main_thread(signum: int, frame: Any) -> None:
    """The Python-level handler: the watcher thread acts on the signal; the main thread goes on undisturbed."""


def _watch(read_fd: int) -> None:
    global _deferred
    while True:
        try:
            data = os.read(read_fd, 1)
        except InterruptedError:
            continue
        if data and data[0] in {int(s) for s in _SIGNALS}:
            deferred, _deferred = _deferred, None
            if deferred is None:
                break
            deferred()
    _interrupting.set()
    try:
        _report_interrupt(_abandon_outputs())
    finally:
        os._exit(EXIT_INTERRUPTED)


def _abandon_outputs() -> list[Any]:
    outputs = sys.modules.get("convert.base.outputs")  # never imported: no output was started
    if outputs is None:
        return []
    try:
        return list(outputs.abandon_outputs())
    except Exception:  # noqa: BLE001 - the interrupt must end the process whatever happens here
        return []


def _report_interrupt(abandoned: Iterable[Any]) -> None:
    abandoned = list(abandoned)
    parts = [f"nothing was written to {', '.join(str(p) for p in abandoned)}"] if abandoned else []
    if _note and _note not in parts:
        parts.append(_note)  # what the command kept (a checkpoint) or could not know (an upload)
    note = "; ".join(parts)
    line = INTERRUPT_PREFIX + (f": {note}" if note else "") + "\n"
    try:
        clear = "\r\x1b[2K" if os.isatty(2) else ""
        os.write(2, (clear + line).encode())  # not through sys.stderr, whose lock the main thread may hold
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------------
# Help text and parsing


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and adds "(default: X)" to every option whose default is worth
    stating (not None, not False, not already named in its help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == () or default == [] or default is argparse.SUPPRESS
                or "default" in text.lower() or isinstance(action, (argparse._StoreTrueAction,
                                                                    argparse._StoreFalseAction))):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the toolkit's conventions: defaults shown, no abbreviated flags, and a usage error printed
    as one line (`error: ...`, exit 2) instead of the usage block."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print_error(f"{' '.join(message.split())} (see {self.prog} --help)")
        sys.exit(EXIT_USAGE)


# ----------------------------------------------------------------------------------------------------------
# Argument checks for the library functions (UsageError in the API's language)


def require_int(param: str, value: Any, low: int | None = None, high: int | None = None,
                allow_none: bool = False) -> int | None:
    """`value` if it is an integer in [low, high] (bounds optional); else a UsageError naming `param`."""
    from convert.base.errors import bad_argument

    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, "__index__") and not isinstance(value, bool):
            value = int(value.__index__())
        else:
            raise bad_argument(param, value, "is not an integer")
    if low is not None and value < low or high is not None and value > high:
        raise bad_argument(param, value, f"must be {_range_text(low, high)}")
    return value


def require_float(param: str, value: Any, low: float | None = None, high: float | None = None,
                  allow_none: bool = False, low_inclusive: bool = True, high_inclusive: bool = True) -> float | None:
    """`value` as a float if it is a finite number in the range (each bound inclusive unless said otherwise)."""
    from convert.base.errors import bad_argument

    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise bad_argument(param, value, "is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise bad_argument(param, value, "must be a finite number")
    too_low = low is not None and (number < low if low_inclusive else number <= low)
    too_high = high is not None and (number > high if high_inclusive else number >= high)
    if too_low or too_high:
        raise bad_argument(param, value, f"must be {_range_text(low, high, low_inclusive, high_inclusive)}")
    return number


def require_choice(param: str, value: Any, choices: Sequence[Any]) -> Any:
    """`value` if it is one of `choices`; else a UsageError listing them."""
    from convert.base.errors import bad_argument

    if value not in choices:
        raise bad_argument(param, value, f"is not one of {', '.join(map(str, choices))}")
    return value


def _range_text(low: float | None, high: float | None, low_inclusive: bool = True, high_inclusive: bool = True
                ) -> str:
    lower = None if low is None else f"at least {low}" if low_inclusive else f"above {low}"
    upper = None if high is None else f"at most {high}" if high_inclusive else f"below {high}"
    if lower and upper:
        return f"from {low} to {high}" if low_inclusive and high_inclusive else f"{lower} and {upper}"
    return lower or upper or ""


def show_progress(requested: bool = True) -> bool:
    """Whether to draw progress bars: asked for, and stderr is a terminal (never half-drawn lines in a log)."""
    try:
        return bool(requested) and sys.stderr.isatty()
    except (AttributeError, ValueError, OSError):
        return False


# A command run as `python -m convert.<command>` imports this module first: guarding from here on covers its
# remaining imports (jax, torch) too. Imported any other way (a library user, the tests), nothing happens here.
_main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
if getattr(_main_spec, "name", "").startswith("convert.") and threading.current_thread() is threading.main_thread():
    install_interrupt_guard()
    quiet_library_warnings()
