"""Errors that reach the user as one line and an exit code; their full story goes to a log file."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from pathlib import Path


class BadInput(Exception):
    """A problem with what the user gave us (config, data path, arguments, checkpoint).

    The command-line entry points print the message alone and exit with code 2, so the
    message must name the problem and the fix.
    """


class StageFailure(Exception):
    """Training failed on one process; the message names the rank and module."""


class StuckPeer(StageFailure):
    """A neighbour let a deadline pass: it is stopped, wedged or dead. ``peer`` is its rank."""

    def __init__(self, message: str, peer: int) -> None:
        super().__init__(message)
        self.peer = peer


class Preempted(Exception):
    """The run stopped at run.stop_signal after a complete checkpoint set; not a failure (exit code 3)."""


def first_line(text: str) -> str:
    """Torch's messages run over many lines: the terminal gets the first that says something."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def require(ok: bool, message: str) -> None:
    """A rule about user input: BadInput with ``message`` (the problem and the fix) where it does not hold."""
    if not ok:
        raise BadInput(message)


def clip(text: str, limit: int = 60) -> str:
    """User text quoted in a message, cut short so a pasted megabyte stays a readable line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cannot_write(path: Path, err: OSError) -> StageFailure:
    """A full or read-only disk: one line naming the path and the OS's reason (err.strerror)."""
    return StageFailure(f"cannot write {path}: {os_reason(err)}; free space (or fix permissions) there, then run the "
                        f"same command again: it resumes from the last complete checkpoint")


def os_reason(err: OSError) -> str:
    return (err.strerror or type(err).__name__).lower()


def os_error_behind(err: BaseException) -> OSError | None:
    """The OSError a failed write raised: err itself, or the one in its chain.

    torch's zip writer turns the OSError of the file object it writes to into a RuntimeError
    ("[enforce fail at inline_container.cc:...] unexpected pos ..."), with the OSError as its context.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Any failure of the file system inside the block becomes cannot_write(path, its reason)."""
    try:
        yield
    except StageFailure:
        raise  # already says what failed
    except Exception as err:
        cause = os_error_behind(err)
        if cause is None:
            raise
        raise cannot_write(path, cause) from err


def error_log_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "errors" / f"rank_{os.environ.get('RANK', '0')}.log"


@contextlib.contextmanager
def errors_logged(out_dir: str | Path) -> Iterator[None]:
    """Write the full traceback of any failure (with its causes) to OUT_DIR/errors/rank_<k>.log.

    The error that leaves keeps its kind (bad input: exit 2, anything else: exit 1) and becomes
    one line ending with where the log is, or why it could not be written.
    """
    try:
        yield
    except Preempted:
        raise
    except Exception as err:  # every kind: the log keeps the whole chain, the terminal one line
        pointer = f" ({_write_log(out_dir, err)})"
        if isinstance(err, BadInput):
            raise BadInput(first_line(str(err)) + pointer) from err
        text = first_line(str(err))
        if not isinstance(err, StageFailure):
            text = f"{type(err).__name__}: {text}"
        raise StageFailure(text + pointer) from err


def _write_log(out_dir: str | Path, err: BaseException) -> str:
    """Where the traceback went, or why it could not be written."""
    path = error_log_path(out_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write("".join(traceback.format_exception(err)) + "\n")
    except OSError as failure:
        return f"no traceback saved: cannot write {path}: {os_reason(failure)}"
    return f"traceback: {path}"
