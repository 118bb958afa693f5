"""Per-module checkpoints that every mode writes and reads (docs/design.md, "Outputs").

checkpoints/module_<k>.pt holds module k's parameters and buffers (body, head, decoder,
context encoders), its optimizer state and the run position. Written to a temporary file
then renamed, so a crash never leaves half a checkpoint; read with weights_only=True.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
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
        # torch's text runs to a dozen lines of advice about weights_only: its first line says what failed.
        raise BadInput(f"run.resume: {path} is not a readable checkpoint ({type(err).__name__}: "
                       f"{_first_line(err)}); point run.resume at the out_dir of a run of this trainer") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BadInput(f"run.resume: {path} is not a checkpoint of this trainer (format {FORMAT})")
    position = _check_structure(path, payload, worker)
    saved = payload["identity"]
    for key, value in identity.items():
        if saved.get(key) != value:
            raise BadInput(
                f"run.resume: {path} was written with {key} = {saved.get(key)!r} but this run has "
                f"{value!r}; resume with the config that wrote it"
            )
    try:
        worker.load_state_dict(payload["state"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        raise BadInput(f"run.resume: {path} does not fit module {worker.index} ({_one_line(err)})") from err
    return position


_PAYLOAD_KEYS = frozenset({"format", "identity", "module_index", "position", "state"})  # what save writes
_POSITION_KEYS = frozenset(field.name for field in fields(Position))
_LONGEST_DETAIL = 300  # characters of torch's text kept in a message; the full text stays in __cause__


def _check_structure(path: Path, payload: dict[Any, Any], worker: ModuleWorker) -> Position:
    """The run position, once the payload has exactly the structure ``save`` writes.

    weights_only guarantees only plain containers and tensors: a hand-edited or foreign file can
    still hold any shape of them, and must fail here with its name rather than deep in a runner.
    """
    def bad(problem: str) -> BadInput:
        return BadInput(f"run.resume: {path} is damaged ({problem}); point run.resume at the out_dir of a "
                        f"run of this trainer, or start afresh without run.resume")

    missing, extra = sorted(_PAYLOAD_KEYS - payload.keys()), sorted(map(str, payload.keys() - _PAYLOAD_KEYS))
    if missing or extra:
        raise bad(f"missing keys {missing}, unexpected keys {extra}")
    if not isinstance(payload["identity"], dict) or not all(isinstance(key, str) for key in payload["identity"]):
        raise bad(f"identity is a {type(payload['identity']).__name__}, not a table of settings")
    if type(payload["module_index"]) is not int or payload["module_index"] != worker.index:
        raise bad(f"module_index = {payload['module_index']!r} in the file of module {worker.index}")
    position = payload["position"]
    if (not isinstance(position, dict) or position.keys() != _POSITION_KEYS
            or not all(type(value) is int and value >= 0 for value in position.values())):
        raise bad(f"position = {position!r} is not {{{', '.join(sorted(_POSITION_KEYS))}}} of whole numbers >= 0")
    state = payload["state"]
    expected = worker.state_dict().keys()
    if not isinstance(state, dict) or state.keys() != expected or not all(isinstance(v, dict) for v in state.values()):
        raise bad(f"state is not a table of {', '.join(sorted(expected))} tables")
    return Position(**position)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_UNPICKLER = "WeightsUnpickler error:"


def _first_line(err: BaseException) -> str:
    """The first line of err's text, without terminal colour codes.

    torch's weights_only refusal opens with advice to load the file unsafely and names what it
    refused only further down: keep its opening sentence and the first sentence of that reason.
    """
    text = _ANSI_ESCAPE.sub("", str(err)).strip()
    line = text.split("\n", 1)[0].strip()
    if _UNPICKLER in text:
        reasons = [part.strip() for part in text.split(_UNPICKLER, 1)[1].splitlines() if part.strip()]
        if reasons:
            line = f"{line.split('.', 1)[0]}. {reasons[0].split('. ', 1)[0].rstrip('.')}."
    return line[:_LONGEST_DETAIL] or type(err).__name__


def _one_line(err: BaseException) -> str:
    """All of err's text on one line (load_state_dict lists each mismatched key on its own line)."""
    text = " ".join(str(err).split())
    return text if len(text) <= _LONGEST_DETAIL else text[: _LONGEST_DETAIL - 3] + "..."


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
