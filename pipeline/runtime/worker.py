"""One module with its optimizer: the training and evaluation step of every mode (the stage loop calls them).

In sequential mode one process calls these steps module after module; a pipeline stage calls the
same steps on what its inbox delivers. That sharing is what makes the two equal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.config.schema import Config, PrecisionConfig, TrainConfig
from pipeline.data.contract import mix_seed
from pipeline.model.local_module import Layout, LocalModule
from pipeline.model.network import build_module
from pipeline.runtime.optim import LearningRate, make_optimizer
from pipeline.runtime.packet import Packet
from pipeline.runtime.scoring import Accuracy, Scoring, scoring_for


def make_worker(config: Config, layout: Layout, index: int, device: torch.device,
                wrap: Callable[[nn.Module], nn.Module] | None = None) -> ModuleWorker:
    """Module ``index`` of the config's network, built from its seed, with its optimizer."""
    module = build_module(config, layout, index, device)
    return ModuleWorker(module, config.train, config.precision, device, wrap, seed=config.run.seed,
                        scoring=scoring_for(layout.spec))


class ModuleWorker:
    def __init__(self, module: LocalModule, train: TrainConfig, precision: PrecisionConfig, device: torch.device,
                 wrap: Callable[[nn.Module], nn.Module] | None = None, seed: int = 0,
                 scoring: Scoring | None = None) -> None:
        self.index = module.index
        self.seed = seed
        self.step = 1  # the training step about to run: set by at_step
        self.device = device
        self.module = module
        # What the training step calls: the module itself, or a wrapper such as DDP around it.
        self.trainable = wrap(module) if wrap is not None else module
        self.optimizer = make_optimizer(module, train)
        self.channels_last = precision.channels_last
        self.amp = precision.amp == "bf16"
        self.total_steps = 1  # the run's length in steps, for per-step schedules: set by assemble
        self.scoring = scoring or Accuracy()  # how the last module's test predictions count
        self.rate = LearningRate(self.optimizer, train)

    @property
    def lr(self) -> float:
        return self.rate.value

    @property
    def last(self) -> bool:
        return self.module.last

    def at_step(self, epoch: int, step: int) -> None:
        """Set the rate for the step about to run (1-based, counted from the start of training)."""
        self.step = step
        self.rate.at_step(epoch, step, self.total_steps)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _prepare(self, packet: Packet) -> Packet:
        if not self.channels_last:
            return packet
        def fmt(tensor: torch.Tensor) -> torch.Tensor:  # a layout of maps: token sequences and vectors stay
            return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor
        image = None if packet.image is None else fmt(packet.image)
        return Packet(packet.labels, fmt(packet.features), image, [fmt(t) for t in packet.register])

    def train_step(self, packet: Packet) -> tuple[Packet | None, torch.Tensor]:
        """Forward, local loss, backward, own optimizer step; returns (packet for k+1, loss)."""
        packet = self._prepare(packet)
        if not self.module.training:  # switching walks every submodule: only on a change
            self.module.train()
        if self.module.dropouts:  # masks from (run.seed, module, step), whichever process or thread runs it
            self.module.reseed(mix_seed(self.seed, self.index, self.step))
        with self._autocast():
            inputs, output, loss = self.trainable(packet)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        following = None if self.last else self.module.next_packet(packet, inputs, output)
        return following, loss.detach()

    @torch.no_grad()
    def eval_step(self, packet: Packet) -> Packet | torch.Tensor:
        """The packet for module k+1, or on the last module what the batch adds to the test counts
        (correct predictions; a confusion matrix for segmentation: pipeline/runtime/scoring.py)."""
        packet = self._prepare(packet)
        if self.module.training:
            self.module.eval()
        with self._autocast():
            inputs, output = self.module.features(packet)
            if self.last:
                return self.scoring.count(self.module.logits(output, packet.labels), packet.labels)
        return self.module.next_packet(packet, inputs, output)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rate.restore()
