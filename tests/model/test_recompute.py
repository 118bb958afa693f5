"""pipeline.model.recompute: checkpointed segments compute what the plain network does, batch norm
statistics move once per step, and DDP over checkpointed replicas ends where plain DDP does."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.data.specs import dataset_spec
from pipeline.errors import BadInput
from pipeline.model.network import build_module, make_layout
from pipeline.model.partition import segment_ranges
from pipeline.model.recompute import checkpointed_body
from pipeline.performance.activations import random_batch
from pipeline.runtime.optim import make_optimizer
from pipeline.runtime.packet import Packet
from pipeline.runtime.worker import ModuleWorker

STEPS, WORLD = 3, 2


def test_segments_are_whole_blocks_that_cover_the_body():
    assert segment_ranges(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert segment_ranges(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_recomputed_segments_update_batch_norm_statistics_once():
    torch.manual_seed(0)
    plain = nn.Sequential(*(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
                            for _ in range(4)))
    recomputed = copy.deepcopy(plain)
    x = torch.randn(3, 4, 5, 5)
    plain(x.clone().requires_grad_()).square().sum().backward()
    out = checkpointed_body(recomputed, x.clone().requires_grad_(), 3)
    out.square().sum().backward()
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        assert torch.equal(a, b), name  # running mean, variance, and one batch tracked: not two
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)
    assert all(layer.track_running_stats for layer in recomputed.modules() if isinstance(layer, nn.BatchNorm2d))


def gloo_group(store: dist.Store, rank: int) -> dist.ProcessGroup:
    """A gloo group of WORLD ranks on threads of this process, without the process-wide default group."""
    group = dist.ProcessGroup(store, rank, WORLD)
    backend = dist.ProcessGroupGloo(store, rank, WORLD, timedelta(seconds=60))
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    return group


def _ddp_states(segments: int) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """WORLD replicas of the tiny E2E network under real DDP (gloo, one thread each), STEPS steps: their
    states, and how often each ran its first block."""
    config = tiny_config("run.mode=ddp", f"precision.checkpoint_segments={segments}")
    spec = dataset_spec(config.data, config.model)
    layout = make_layout(config, spec, [])
    generator = torch.Generator().manual_seed(1)
    batches = [random_batch(spec, config.data.batch_size, generator) for _ in range(STEPS)]
    store = dist.HashStore()

    def replica(rank: int) -> tuple[dict[str, torch.Tensor], int]:
        group = gloo_group(dist.PrefixStore(f"seg{segments}", store), rank)
        module = build_module(config, layout, 0, torch.device("cpu")).train()
        runs = [0]
        module.body[0].register_forward_pre_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
        worker = ModuleWorker(module, config.train, config.precision, torch.device("cpu"),
                              lambda m: DistributedDataParallel(m, process_group=group))
        for images, labels in batches:
            x, y = images.tensor_split(WORLD)[rank], labels.tensor_split(WORLD)[rank]
            worker.train_step(Packet.from_batch(x, y))
        return {name: value.clone() for name, value in module.state_dict().items()}, runs[0]

    with ThreadPoolExecutor(WORLD) as pool:
        done = [future.result(timeout=120) for future in [pool.submit(replica, rank) for rank in range(WORLD)]]
    return [state for state, _ in done], [runs for _, runs in done]


def test_checkpointed_ddp_ends_where_plain_ddp_does() -> None:
    (plain, plain_runs), (recomputed, recomputed_runs) = _ddp_states(0), _ddp_states(3)
    assert plain_runs == [STEPS] * WORLD and recomputed_runs == [2 * STEPS] * WORLD  # recomputed in backward
    for rank in range(WORLD):
        for name, value in plain[rank].items():
            other = recomputed[rank][name]
            if name.endswith("num_batches_tracked"):
                assert value.item() == other.item() == STEPS, name  # once per step, not twice
            else:
                assert (value - other).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("overrides, needs", [
    (("precision.checkpoint_segments=1",), "between 2 and"),
    (("precision.checkpoint_segments=99",), "between 2 and"),
    (("precision.checkpoint_segments=2", "local.modules=2"), "local.modules = 1"),
])
def test_bad_segment_counts_are_refused(overrides: tuple[str, ...], needs: str) -> None:
    with pytest.raises(BadInput, match=needs):
        tiny_config(*overrides)


def test_the_optimizer_sees_the_same_parameters():
    """Recomputation wraps nothing: the module's parameters and state keys are the plain module's."""
    plain = tiny_config()
    recomputed = tiny_config("precision.checkpoint_segments=2")
    spec = dataset_spec(plain.data, plain.model)
    a = build_module(plain, make_layout(plain, spec, []), 0, torch.device("cpu"))
    b = build_module(recomputed, make_layout(recomputed, spec, []), 0, torch.device("cpu"))
    assert list(a.state_dict()) == list(b.state_dict())
    assert len(make_optimizer(a, plain.train).param_groups[0]["params"]) == len(list(b.parameters()))
