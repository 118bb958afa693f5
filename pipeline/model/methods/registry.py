"""The local methods ``local.loss`` can name: what a module's auxiliary head outputs and how it is scored.

LocalModule sizes its head with the method's ``head_width`` and trains with its ``loss``; config
validation lists ``method_names()``; summaries and ``python -m pipeline.reproduce`` call it by
``summary_name``; checkpoints record its ``identity_keys``. Adding a method is one file that
subclasses ``LocalMethod`` and calls ``register_method``, imported before the config naming it is loaded.

Nothing here or in the built-in methods imports torch when loaded: reading a config (the launchers
do, many times) validates local.loss and must not pay for torch. Their losses import it when called.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from pipeline.errors import BadInput, clip

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.config.schema import LocalConfig


class LocalMethod(ABC):
    """How a local module's auxiliary head is trained (not the last module's: that is the real classifier)."""

    name: ClassVar[str]  # the local.loss value
    summary_name: ClassVar[str]  # summary.json's "loss", the recipe column of the reproduce tables
    # The local.* keys that change its result (besides the head's own: aux, aux_widen, aux_hidden); checkpoints
    # record them and config warns when one is set for a method that does not read it.
    identity_keys: ClassVar[tuple[str, ...]] = ()
    # A method of its own (PredSim): summaries name a run with it, no context and no decoder, by summary_name;
    # otherwise it is a head loss of DGL / Greedy SL and the run is named after its head.
    standalone: ClassVar[bool] = False

    @abstractmethod
    def head_width(self, classes: int, local: LocalConfig) -> int:
        """What the auxiliary head outputs per sample (class scores, or a feature of local.aux_feature_dim)."""

    @abstractmethod
    def loss(self, output: Tensor, head_output: Tensor, labels: Tensor) -> Tensor:
        """The module's local loss: ``output`` is the module's own output h, ``head_output`` the head's on it,
        ``labels`` one class per sample. A scalar in fp32, with no host sync (it runs on every step)."""


_METHODS: dict[str, LocalMethod] = {}


def register_method(method: LocalMethod) -> LocalMethod:
    """Make ``method`` nameable by local.loss (a later registration of a name replaces the earlier one)."""
    _METHODS[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))


def method_named(name: str) -> LocalMethod:
    if name not in _METHODS:
        raise BadInput(f"local.loss = {clip(name)!r} is not allowed; allowed: {', '.join(method_names())}")
    return _METHODS[name]
