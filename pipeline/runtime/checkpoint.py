"""Checkpoints that every mode writes and reads: complete sets, one file per module.

checkpoints/step_<N>/module_<k>.pt holds module k's parameters and buffers (body, head, decoder,
context encoders), its optimizer state and the run position at step N. Each file is written to
a temporary file then renamed. Each stage saves before it passes the epoch end on, so when the
epoch end reaches the last module (of replica 0) every module has saved step N, and that
process writes checkpoints/step_<N>/COMPLETE last. A set without its marker is never resumed
from, so a crash or a full disk between two modules' saves leaves the previous complete set in
charge. The newest run.keep_checkpoints complete sets are kept; files are read with
weights_only=True.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.errors import BadInput, StageFailure, writing
from pipeline.model.methods.registry import method_named
from pipeline.model.networks.registry import family_named
from pipeline.runtime.run_order import Position

if TYPE_CHECKING:  # the worker builds modules, whose pretrained weights may come from a checkpoint set
    from pipeline.runtime.worker import ModuleWorker

FORMAT = 1
MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step_(\d+)")
_TEMPORARY = ".tmp"  # every temporary file's name holds this; a finished file's never does
COMMIT_POLL_S = 0.5  # how often commit looks again for a module file not yet visible


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step}"


def module_file(set_dir: str | Path, module: int) -> Path:
    return Path(set_dir) / f"module_{module}.pt"


def _step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every step_<N> folder under run_dir/checkpoints, by step."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if path.is_dir() and (match := _STEP_DIR.fullmatch(path.name))]
    return sorted(found)


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The COMPLETE marker of a set folder (step, position, modules, identity); None if missing or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(step: int, path: Path) -> bool:
    marker = read_marker(path)
    return marker is not None and marker.get("step") == step


def complete_sets(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoint sets of run_dir, oldest first: (step, folder)."""
    return [(step, path) for step, path in _step_dirs(run_dir) if _is_complete(step, path)]


def find_set(run_dir: str | Path, step: int = 0) -> Path:
    """The folder of run_dir's complete set at ``step`` (0: the newest); incomplete sets are ignored."""
    sets = complete_sets(run_dir)
    if not sets:
        raise BadInput(
            f"run.resume: no complete checkpoint in {checkpoints_dir(run_dir)}; point run.resume at the out_dir "
            f"of an earlier run (a run writes one at each epoch end and when it stops)"
        )
    if step == 0:
        return sets[-1][1]
    for saved, path in sets:
        if saved == step:
            return path
    raise BadInput(
        f"run.resume_step = {step}: {checkpoints_dir(run_dir)} holds complete checkpoints at steps "
        f"{[saved for saved, _ in sets]} only; choose one of them, or 0 for the newest"
    )


def newest_module_file(run_dir: str | Path, module: int) -> Path:
    """Module ``module``'s file in run_dir's newest complete set."""
    return module_file(find_set(run_dir), module)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(temporary) then rename onto path; on failure nothing is left behind."""
    temporary = path.with_name(f"{path.name}{_TEMPORARY}{os.getpid()}")
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            write(temporary)
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_tensors(payload: Any, temporary: Path) -> None:
    """torch.save through a Python file: a failed write keeps its OSError (reason) in the chain.

    Given a path, torch's zip writer writes natively and reports a full disk as "unexpected pos".
    """
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)


def save(run_dir: str | Path, worker: ModuleWorker, position: Position, identity: dict[str, Any]) -> Path:
    """Write module worker.index's file into the set of ``position.step`` (not complete until commit)."""
    path = module_file(step_dir(run_dir, position.step), worker.index)
    payload = {
        "format": FORMAT,
        "identity": identity,
        "module_index": worker.index,
        "position": position.to_dict(),
        "state": worker.state_dict(),
    }
    _atomic_write(path, lambda temporary: save_tensors(payload, temporary))
    return path


def commit(run_dir: str | Path, position: Position, modules: int, identity: dict[str, Any], keep: int,
           config: dict[str, Any], schedule: dict[str, Any], wait_s: float = 0.0) -> Path:
    """Once every module's file of ``position.step`` is written: mark the set complete, drop old ones.

    Called by one process, the one that holds the last module of replica 0, when the epoch end
    (or a mid-epoch save point) reaches it: every module before it saved first. The marker records
    the result-changing config (``config.result_config``), by which a restarted job knows its own
    sets, and the run's ``schedule`` settings (optim.schedule_settings), which a resumed run
    compares with its own. Sets older than the newest ``keep`` complete ones, and unfinished sets
    older than this one, are removed. A file another node wrote may not show yet on a shared file
    system (NFS caches directory attributes for up to a minute): missing files are looked for again
    for up to ``wait_s`` before the set fails.
    """
    folder = step_dir(run_dir, position.step)
    deadline = time.monotonic() + wait_s
    missing = [module for module in range(modules) if not module_file(folder, module).is_file()]
    while missing and time.monotonic() < deadline:
        time.sleep(COMMIT_POLL_S)
        missing = [module for module in missing if not module_file(folder, module).is_file()]
    if missing:
        raise StageFailure(f"checkpoint {folder} lacks modules {missing} when the last one saved; "
                           f"its set is left incomplete (resume uses the previous one)")
    marker = {"step": position.step, "position": position.to_dict(), "modules": list(range(modules)),
              "identity": identity, "config": config, "schedule": schedule}
    path = folder / MARKER
    _atomic_write(path, lambda temporary: temporary.write_text(json.dumps(marker, indent=2) + "\n"))
    kept = {step for step, _ in complete_sets(run_dir)[-keep:]}
    for step, old in _step_dirs(run_dir):
        if step < position.step and step not in kept:
            _remove_set(old)
    return path


def _remove_set(folder: Path) -> None:
    """Rename the folder out of the step_<N> namespace first: a kill halfway through the removal must not
    leave a set whose marker outlives some of its module files (the rest goes at the next start)."""
    doomed = folder.with_name(f"{folder.name}{_TEMPORARY}-removed-{os.getpid()}")
    try:
        os.replace(folder, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def clear_for_start(run_dir: str | Path, start_step: int) -> list[Path]:
    """Before a run writes: remove temporary files, unfinished sets and sets past where it starts.

    A set newer than the run's start belongs to a history this run replaces (a resume from an
    older step into the same folder); an unfinished one is what a crash left. Returns what went.
    """
    removed = []
    root = checkpoints_dir(run_dir)
    for leftover in root.glob(f"*{_TEMPORARY}*") if root.is_dir() else []:  # a removal a kill cut short
        shutil.rmtree(leftover, ignore_errors=True)
    for step, path in _step_dirs(run_dir):
        if step > start_step or not _is_complete(step, path):
            _remove_set(path)
            removed.append(path)
            continue
        for stale in path.iterdir():
            if _TEMPORARY in stale.name:
                stale.unlink(missing_ok=True)
    return removed


def load(set_dir: str | Path, worker: ModuleWorker, identity: dict[str, Any]) -> Position:
    """Restore ``worker`` from its file in the set ``set_dir``; the identity (network, cut, method) must match."""
    path = module_file(set_dir, worker.index)
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
                       f"{load_error_line(err)}); point run.resume at the out_dir of a run of this trainer") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BadInput(f"run.resume: {path} is not a checkpoint of this trainer (format {FORMAT})")
    position = _check_structure(path, payload, worker)
    saved = payload["identity"]
    for key, value in identity.items():
        # A key the file lacks was not recorded by the version that wrote it (a method's own keys, such as
        # contrast's aux_feature_dim, came later): the tensors' shapes, checked above, still guard it.
        if key in saved and saved[key] != value:
            raise BadInput(
                f"run.resume: {path} was written with {key} = {saved.get(key)!r} but this run has "
                f"{value!r}; resume with the config that wrote it"
            )
    try:
        worker.load_state_dict(payload["state"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        raise BadInput(f"run.resume: {path} does not fit module {worker.index} ({_one_line(err)})") from err
    return position


def module_weights(set_dir: str | Path, module: int) -> dict[str, torch.Tensor]:
    """Module ``module``'s parameters and buffers in the complete set ``set_dir``, on the CPU (no optimizer
    state): what using a trained network needs of its file."""
    path = module_file(set_dir, module)
    fix = "export from a complete set written by this trainer (RUN_DIR, or RUN_DIR/checkpoints/step_<N>)"
    if not path.is_file():
        raise BadInput(f"{path} is missing although its set is marked complete; {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise BadInput(f"{path} is not a readable checkpoint ({type(err).__name__}: {load_error_line(err)}); "
                       f"{fix}") from err
    state = payload.get("state") if isinstance(payload, dict) else None
    weights = state.get("module") if isinstance(state, dict) else None
    if (not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("module_index") != module
            or not isinstance(weights, dict)
            or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in weights.items())):
        raise BadInput(f"{path} is not module {module}'s file of this trainer's checkpoint (format {FORMAT}); {fix}")
    return weights


_PAYLOAD_KEYS = frozenset({"format", "identity", "module_index", "position", "state"})  # what save writes
_POSITION_KEYS = frozenset(field.name for field in fields(Position))
_LONGEST_DETAIL = 300  # characters of torch's text kept in a message; the full text stays in __cause__


def _check_structure(path: Path, payload: dict[Any, Any], worker: ModuleWorker) -> Position:
    """The run position, once the payload has exactly the structure ``save`` writes.

    weights_only guarantees only plain containers and tensors: a hand-edited or foreign file can
    still hold any shape of them, and must fail here with its name rather than deep in a run.
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


def load_error_line(err: BaseException) -> str:
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
        # the network as its family records it: model.arch and the family (resnet50 names a CIFAR and an
        # ImageNet network; a factory is its "package.module:factory")
        **family_named(config.arch.family).identity(config.arch),
        "dataset": config.data.name,
        "modules": local.modules,
        "cuts": list(cuts),
        "context": local.context,
        "loss": local.loss,
        **{key: getattr(local, key) for key in method_named(local.loss).identity_keys},
        "aux": local.aux,
        "reconstruct": local.reconstruct,
        "batch_size": config.data.batch_size,
        "seed": config.run.seed,
    }
