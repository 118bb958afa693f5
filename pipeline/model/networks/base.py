"""What every network the trainer can cut is: a flat list of blocks, then a classifier.

A family (a ResNet, a ViT, a VGG, a network a user's factory returns) subclasses ``BlockNet``
and says how to build block i and its classifier. Everything else — each block's output shape,
what a module carries over a link, the heads, decoders and context encoders that fit a feature —
is read off the blocks themselves: ``shape`` builds each on the meta device (no random draws), gives it
uninitialised storage and runs one sample through it, so no family states a formula of its own. A
feature is 4-D (B, C, H, W), 3-D token sequences (B, N, D) or 2-D vectors (B, D); a ``Shape`` is one
sample's, batch left out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from pipeline.errors import BadInput, clip

Shape = tuple[int, ...]  # one sample's tensor: (C, H, W), (N, D) or (D,)


def describe_shape(shape: Shape) -> str:
    names = {3: "maps", 2: "tokens", 1: "vectors"}.get(len(shape), "tensors")
    return f"{names} of shape {list(shape)}"


class BlockNet(ABC):
    """A network as a flat list of blocks (a cut follows any of them but the last) and a classifier."""

    # False: LocalModule initialises every conv and batch norm of the module (resnet.init_weights), as the
    # papers' networks are; True: the blocks keep the initialisation they were built with.
    own_init = False

    def __init__(self, name: str, input_shape: Shape) -> None:
        self.name = name
        self.input_shape = input_shape
        self._shapes: list[Shape] = []

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def build(self, index: int) -> nn.Module:
        """Block ``index``, freshly built (its parameters drawn from the process-wide generator)."""

    def build_range(self, start: int, end: int) -> list[nn.Module]:
        """Blocks [start, end) in order: what one module holds."""
        return [self.build(index) for index in range(start, end)]

    @abstractmethod
    def classifier(self, classes: int) -> nn.Module:
        """What turns the last block's output into class logits (built after the blocks, in the last module)."""

    def shape(self, index: int) -> Shape:
        """Output shape of block ``index`` for one sample; index -1 means the input image."""
        if index < 0:
            return self.input_shape
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name} has blocks 0..{len(self) - 1}, not {index}")
        while len(self._shapes) <= index:
            self._shapes.append(self._probe(len(self._shapes)))
        return self._shapes[index]

    def _probe(self, index: int) -> Shape:
        """Block ``index``'s output shape, from a forward of one sample."""
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            block = self.build(index)
        return output_shape(self.name, index, block, self.shape(index - 1))


def output_shape(name: str, index: int, block: nn.Module, inputs: Shape) -> Shape:
    """What block ``index`` of network ``name``, built on the meta device, makes of one sample of ``inputs``;
    BadInput naming the block where it does not take them or returns no single feature tensor.

    The block runs on uninitialised CPU storage, not on the meta device: the values mean nothing, and
    the first meta-device forward of a process costs seconds of imports, which every process would pay.
    """
    try:
        block = block.to_empty(device="cpu").eval()  # eval: batch norm takes a single 1x1 sample
        with torch.no_grad(), torch.device("cpu"):  # even where the caller builds on the meta device
            output = block(torch.zeros(1, *inputs))
    except Exception as err:  # any layer's refusal of the shape it is given
        raise BadInput(
            f"{name}: block {index} ({type(block).__name__}) does not take the output of "
            f"{'the image' if index == 0 else f'block {index - 1}'} ({describe_shape(inputs)}): "
            f"{clip(str(err).splitlines()[0] if str(err) else type(err).__name__, 200)}; each block must "
            "feed the next"
        ) from err
    if not isinstance(output, torch.Tensor) or output.dim() not in (2, 3, 4) or output.shape[0] != 1:
        got = type(output).__name__ if not isinstance(output, torch.Tensor) else f"a tensor of {list(output.shape)}"
        raise BadInput(f"{name}: block {index} ({type(block).__name__}) returns {got}; a block must return "
                       "one tensor of (batch, channels, height, width), (batch, tokens, width) or (batch, width)")
    return tuple(output.shape[1:])
