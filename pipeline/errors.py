"""Errors that reach the user as one line and an exit code, never a traceback."""


class BadInput(Exception):
    """A problem with what the user gave us (config, data path, arguments, checkpoint).

    The command-line entry points print the message alone and exit with code 2, so the
    message must name the problem and the fix.
    """


class StageFailure(Exception):
    """Training failed on one process; the message names the rank and module."""
