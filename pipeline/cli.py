"""Shared command-line plumbing: one-line errors and the exit codes (docs/design.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline.errors import BadInput, StageFailure, first_line

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one BadInput line instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{message} (see {self.prog} --help)")


def run_main(body: Callable[[], None]) -> int:
    try:
        body()
    except BadInput as err:
        print(f"error: {first_line(str(err))}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except StageFailure as err:
        print(f"error: {first_line(str(err))}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    return EXIT_OK
