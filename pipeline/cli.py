"""Shared command-line plumbing: one-line errors, exit codes (docs/design.md) and the --help layout."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput, Preempted, StageFailure, first_line

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EXIT_PREEMPTED = 3  # stopped by run.stop_signal after a complete checkpoint set: the same command goes on

SET_HELP = (
    "override one config key; repeatable. VALUE is read as TOML (4, 0.1, true, \"text\", [[1, 6]]) and a "
    "bare word as text, e.g. --set local.modules=8 --set run.mode=pipeline --set train.max_steps=100"
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends an option's default to its help, except where there is nothing to show.

    argparse's own ArgumentDefaultsHelpFormatter also prints "(default: None)" and "(default: [])",
    which tell a reader nothing.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None or default is False
                or default is argparse.SUPPRESS or default == []):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one BadInput line instead of usage + exit.

    Abbreviations are off: with them ``--conf`` silently meant ``--config``, and a later option
    sharing a prefix would change what an old command line does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{message} (see {self.prog} --help)")


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help=SET_HELP)


def run_main(body: Callable[[], None]) -> int:
    try:
        body()
    except BadInput as err:
        say_error(f"error: {first_line(str(err))}")
        return EXIT_BAD_INPUT
    except StageFailure as err:
        say_error(f"error: {first_line(str(err))}")
        return EXIT_FAILURE
    except Preempted as err:
        print(first_line(str(err)), file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except KeyboardInterrupt as err:  # its text, where an entry point gave one, says what was saved
        print(f"interrupted{': ' if str(err) else ''}{err}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (... | head): point stdout at nothing so the exit flush cannot raise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    return EXIT_OK


def say_error(line: str) -> None:
    """The failure's one line, on the terminal and in torchrun's report.

    Under torchrun, TORCHELASTIC_ERROR_FILE names this process's error file: its message becomes
    the "Root Cause" of torchrun's failure report, in place of a link to torch's documentation.
    """
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as handle:
                json.dump({"message": line, "timestamp": int(time.time())}, handle)
        except OSError:
            pass  # the terminal has the line already; torchrun's report keeps its own text


def exit_process(code: int) -> None:
    """Leave without C++ static teardown when torch.distributed threads may still exist.

    After a finished run, gloo's teardown at interpreter exit can abort the process
    ("terminate called without an active exception", seen here on 1 run in 3 under DDP),
    turning a successful run into a failed torchrun job.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if "RANK" in os.environ:
        os._exit(code)
    sys.exit(code)


def writable_folder(path: str, option: str = "--out") -> Path:
    """``path``, created where missing (parents too): a tool's output folder, refused in one line naming ``option``
    where it cannot be (a file in the way, no permission) before anything runs."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"{option} {str(folder)!r} cannot be created ({err.strerror}); choose a writable folder"
                       ) from None
    return folder
