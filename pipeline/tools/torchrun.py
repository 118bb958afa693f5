"""The command line that starts one of the package's modules from a tool: in this interpreter, alone or under
torchrun on this machine. The benchmarks and the self-test launch their runs with it."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def set_arguments(sets: Sequence[str]) -> list[str]:
    """A --set KEY=VALUE pair per override."""
    return [argument for item in sets for argument in ("--set", item)]


def config_arguments(config_path: str | None, sets: Sequence[str] = ()) -> list[str]:
    """--config FILE (where one is given), then the overrides."""
    return (["--config", config_path] if config_path else []) + set_arguments(sets)


def torchrun_command(processes: int, module: str, arguments: Sequence[str]) -> list[str]:
    """``python -m module arguments`` in ``processes`` processes on this machine (torchrun --standalone)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", module, *arguments]


def module_command(processes: int, module: str, arguments: Sequence[str]) -> list[str]:
    """``python -m module arguments``: one process runs in this interpreter, more under torchrun."""
    if processes == 1:
        return [sys.executable, "-m", module, *arguments]
    return torchrun_command(processes, module, arguments)
