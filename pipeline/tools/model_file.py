"""An exported model file (python -m pipeline.export's default format) and ``load_model``.

One torch.save'd table: ``format``, the inference network's state dict (``state``: pipeline/model/
inference.py's keys), and what rebuilds and feeds it — the run's config tables, its dataset spec, the
cuts, the step it was taken at, the class names where the dataset has them, and how the run's
evaluation prepared an image. Read with weights_only=True: plain containers and tensors only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pipeline.config.loading import config_from_dict
from pipeline.config.schema import Config
from pipeline.data.image_file import Preprocess
from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput, clip, os_error_behind, os_reason
from pipeline.model.inference import InferenceNet, build_inference_net
from pipeline.model.network import make_layout
from pipeline.runtime.checkpoint import load_error_line, save_tensors

FORMAT = "localpipe-model/1"
_SPEC_FIELDS = frozenset(field.name for field in fields(DatasetSpec))


@dataclass(frozen=True)
class Recipe:
    """Everything but the weights: what rebuilds the network, and what its inputs and outputs mean."""

    config: dict[str, Any]  # the run's config tables (Config.to_dict)
    spec: DatasetSpec
    cuts: list[int]
    step: int  # the training step of the checkpoint set it came from
    class_names: list[str] | None
    preprocess: Preprocess

    def build_config(self, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        return config_from_dict(self.config, overrides, training=False)


def save_model(path: str | Path, net: InferenceNet, recipe: Recipe) -> Path:
    """Write the model file atomically (a temporary file renamed onto ``path``)."""
    target = Path(path)
    payload = {
        "format": FORMAT,
        "config": recipe.config,
        "spec": {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(recipe.spec).items()},
        "cuts": list(recipe.cuts),
        "step": recipe.step,
        "class_names": recipe.class_names,
        "preprocess": {key: list(value) if isinstance(value, tuple) else value
                       for key, value in recipe.preprocess.to_dict().items()},
        "state": net.state_dict(),
    }
    write(target, lambda temporary: save_tensors(payload, temporary))
    return target


def write(target: Path, save: Callable[[Path], object]) -> None:
    """save(temporary) then rename onto ``target``; an unwritable place is BadInput naming --out."""
    # The suffix stays last: torch.export.save wants a .pt2 name.
    temporary = target.with_name(f"{target.stem}.tmp{os.getpid()}{target.suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save(temporary)
        os.replace(temporary, target)
    except Exception as err:
        temporary.unlink(missing_ok=True)
        cause = os_error_behind(err)  # torch's zip writer reports a full disk as a RuntimeError around it
        if cause is None:
            raise
        raise BadInput(f"--out {clip(str(target), 200)!r} cannot be written ({os_reason(cause)}); choose a "
                       f"writable path with room") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _not_a_model(path: Path, problem: str) -> BadInput:
    return BadInput(f"{clip(str(path), 200)!r} {problem}; pass a file written by python -m pipeline.export "
                    f"(its default format), or a run's out_dir")


def read_model(path: str | Path) -> tuple[InferenceNet, Recipe]:
    """The network (eval mode, on the CPU) and recipe of a model file; anything else is BadInput."""
    where = Path(path)
    if not where.is_file():
        raise _not_a_model(where, "is not a file")
    try:
        payload = torch.load(where, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        raise _not_a_model(where, f"is not readable ({type(err).__name__}: {load_error_line(err)})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _not_a_model(where, f"is not a model file of this trainer (format {FORMAT})")
    try:
        spec_values = dict(payload["spec"])
        if spec_values.keys() != _SPEC_FIELDS:
            raise KeyError("spec")
        values: dict[str, Any] = {key: tuple(value) if isinstance(value, list) else value
                                  for key, value in spec_values.items()}
        spec = DatasetSpec(**values)
        recipe = Recipe(dict(payload["config"]), spec, [int(cut) for cut in payload["cuts"]], int(payload["step"]),
                        payload["class_names"], Preprocess.from_dict(payload["preprocess"]))
        state = payload["state"]
    except (KeyError, TypeError, ValueError) as err:
        raise _not_a_model(where, f"is damaged ({type(err).__name__}: {clip(str(err), 120)})") from err
    config = recipe.build_config()
    net = build_inference_net(make_layout(config, spec, recipe.cuts), config.local)
    try:
        net.load_state_dict(state, assign=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise _not_a_model(where, f"does not fit its own network ({clip(' '.join(str(err).split()), 200)})") from err
    return net.eval(), recipe


def load_model(path: str | Path) -> InferenceNet:
    """The exported network in ``path`` as an nn.Module in eval mode, on the CPU."""
    return read_model(path)[0]
