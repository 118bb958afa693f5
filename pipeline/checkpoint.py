"""Per-module checkpoints that every mode writes and reads (DESIGN.md).

checkpoints/module_<k>.pt holds module k's parameters and buffers (body, head, decoder,
context encoders), its optimizer state and the run position. Written to a temporary file
then renamed, so a crash never leaves half a checkpoint; read with weights_only=True.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import BadInput
from pipeline.runners.loop import Position
from pipeline.worker import ModuleWorker

FORMAT = 1


def checkpoint_path(run_dir: str | Path, module: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"module_{module}.pt"


def save(run_dir: str | Path, worker: ModuleWorker, position: Position, identity: dict[str, Any]) -> Path:
    path = checkpoint_path(run_dir, worker.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "identity": identity,
        "module_index": worker.index,
        "position": position.to_dict(),
        "state": worker.state_dict(),
    }
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return path


def load(run_dir: str | Path, worker: ModuleWorker, identity: dict[str, Any]) -> Position:
    """Restore ``worker`` from run_dir; the identity (network, cut, method) must match."""
    path = checkpoint_path(run_dir, worker.index)
    if not path.is_file():
        raise BadInput(
            f"run.resume: no checkpoint {path}; point run.resume at the out_dir of an earlier run "
            f"with the same local.modules"
        )
    try:
        payload = torch.load(path, map_location=worker.device, weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise BadInput(f"run.resume: {path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BadInput(f"run.resume: {path} is not a checkpoint of this trainer (format {FORMAT})")
    saved = payload["identity"]
    for key, value in identity.items():
        if saved.get(key) != value:
            raise BadInput(
                f"run.resume: {path} was written with {key} = {saved.get(key)!r} but this run has "
                f"{value!r}; resume with the config that wrote it"
            )
    try:
        worker.load_state_dict(payload["state"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise BadInput(f"run.resume: {path} does not fit module {worker.index} ({err})") from None
    return Position(**payload["position"])


def identity_of(config: Any, cuts: list[int]) -> dict[str, Any]:
    """What must agree between the run that wrote a checkpoint and the run resuming it."""
    local = config.local
    return {
        "arch": config.model.arch,
        "dataset": config.data.name,
        "modules": local.modules,
        "cuts": list(cuts),
        "context": local.context,
        "loss": local.loss,
        "aux": local.aux,
        "reconstruct": local.reconstruct,
        "batch_size": config.data.batch_size,
        "seed": config.run.seed,
    }
