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


def clip(text: str, limit: int = 60) -> str:
    """User text quoted in a message, cut short so a pasted megabyte stays a readable line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_log_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "errors" / f"rank_{os.environ.get('RANK', '0')}.log"


@contextlib.contextmanager
def errors_logged(out_dir: str | Path) -> Iterator[None]:
    """Write the full traceback of any failure (with its causes) to OUT_DIR/errors/rank_<k>.log.

    The error that leaves keeps its kind (bad input: exit 2, anything else: exit 1) and becomes
    one line ending with where the log is. A log that cannot be written is left out of the line.
    """
    try:
        yield
    except Preempted:
        raise
    except Exception as err:  # every kind: the log keeps the whole chain, the terminal one line
        where = _write_log(out_dir, err)
        pointer = f" (traceback: {where})" if where is not None else ""
        if isinstance(err, BadInput):
            raise BadInput(first_line(str(err)) + pointer) from err
        text = first_line(str(err))
        if not isinstance(err, StageFailure):
            text = f"{type(err).__name__}: {text}"
        raise StageFailure(text + pointer) from err


def _write_log(out_dir: str | Path, err: BaseException) -> Path | None:
    path = error_log_path(out_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write("".join(traceback.format_exception(err)) + "\n")
    except OSError:
        return None
    return path
