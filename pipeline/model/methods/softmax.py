"""softmax: the head outputs class scores, trained with cross-entropy (DGL, Greedy SL, InfoPro's softmax)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.model.methods.registry import LocalMethod, register_method

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.config.schema import LocalConfig


class Softmax(LocalMethod):
    name = "softmax"
    summary_name = "softmax"

    def head_width(self, classes: int, local: LocalConfig) -> int:
        return classes

    def loss(self, output: Tensor, head_output: Tensor, labels: Tensor) -> Tensor:
        from pipeline.model.losses import cross_entropy  # torch: reading a config imports this module

        return cross_entropy(head_output, labels)


register_method(Softmax())
