"""pipeline.plan: the layouts, speeds, memory and recommendation predicted from a synthetic profile."""

from __future__ import annotations

import math

import pytest

from pipeline.model.context import ContextPlan
from pipeline.plan import (
    OPTIMIZER_COPIES,
    Cluster,
    allreduce_bytes,
    device_memory_bytes,
    main,
    plan_layout,
    plan_layouts,
    recommend,
)
from pipeline.traffic import LABEL_BYTES
from tests.profiles import synthetic_profile

# 4 blocks of 1 s each at batch 10, 1000 saved bytes each, 100 parameter bytes each; outputs of 100 bytes
PROFILE = synthetic_profile([1.0] * 4, [1000] * 4, parameter_bytes=100, output_bytes=100, image_bytes=30)
LINK = 1e4  # bytes / s


def cluster(devices: int, memory: float = math.inf) -> Cluster:
    return Cluster(devices=devices, memory_bytes=memory, link_bytes_per_s=LINK, queue_depth=2)


def test_every_k_that_divides_n_and_fits_the_network():
    assert [(lay.modules, lay.replicas) for lay in plan_layouts(PROFILE, 0, False, False, 10, cluster(4))] == [
        (1, 4), (2, 2), (4, 1)]
    assert [lay.modules for lay in plan_layouts(PROFILE, 0, False, False, 10, cluster(8))] == [1, 2, 4]  # 8 > 4 blocks
    assert [lay.modules for lay in plan_layouts(PROFILE, 2, False, False, 10, cluster(4))] == [1, 4]  # R2 needs K > 2


def test_ddp_by_hand():
    ddp = plan_layout(PROFILE, ContextPlan(1, 0, False, False), 2, 10, cluster(2))
    assert ddp.batch_per_replica == 5
    ring = allreduce_bytes(400, 2)
    assert ring == 400  # 2 (R - 1) / R of the 400 gradient bytes
    assert ddp.stage_seconds == [pytest.approx(4 * 0.5 + ring / LINK)]  # half the batch: half the compute
    assert ddp.samples_per_s == pytest.approx(10 / (2.0 + ring / LINK))
    assert ddp.link_bytes == 0 and ddp.allreduce_bytes == 400
    # weights, gradients, momentum and DDP's buckets; at batch 5 the input image, four blocks' outputs and
    # their own activations
    assert ddp.memory_bytes == [400 * (OPTIMIZER_COPIES + 1) + 5 * 30 + 5 * 4 * 100 + 4 * 500]


def test_pipeline_by_hand():
    pipe = plan_layout(PROFILE, ContextPlan(2, 0, False, False), 1, 10, cluster(2))
    assert pipe.cuts == [1]
    packet = 10 * (LABEL_BYTES + 100)
    assert pipe.link_bytes == packet and pipe.allreduce_bytes == 0
    assert pipe.stage_seconds == [pytest.approx(2.0 + packet / LINK)] * 2  # heads cost 0 s here
    assert pipe.samples_per_s == pytest.approx(10 / (2.0 + packet / LINK))
    # module 0: 3 pieces (2 blocks, head) of parameters, image input, 2 block outputs, activations, the sent
    # packets queued
    assert pipe.memory_bytes[0] == 300 * OPTIMIZER_COPIES + 10 * 30 + 10 * 2 * 100 + 2000 + 2 * packet


def test_memory_limit_moves_the_cut_and_bounds_the_batch():
    # blocks heavy in memory early: time wants [1], memory a cut after block 0
    profile = synthetic_profile([1.0] * 4, [4000, 1000, 1000, 1000], output_bytes=0, image_bytes=0)
    plan = ContextPlan(2, 0, False, False)
    free = plan_layout(profile, plan, 1, 10, cluster(2))
    assert free.cuts == [1] and free.fits and free.max_batch_per_replica is None
    tight = plan_layout(profile, plan, 1, 10, cluster(2, memory=4500))
    assert tight.cuts == [0] and tight.fits and max(tight.memory_bytes) <= 4500
    # the largest batch: at it every device fits, one more sample and one does not
    largest = tight.max_batch_per_replica
    assert largest == 10  # device 0: 400 bytes a sample, and its 8 label bytes twice in the queue
    memory = [device_memory_bytes(profile, plan, 0, 0, 1, batch, 1, 2) for batch in (largest, largest + 1)]
    assert memory[0] <= 4500 < memory[1]
    nothing = plan_layout(profile, plan, 1, 10, cluster(2, memory=3000))
    assert not nothing.fits and nothing.cuts == [0]  # the least memory it can take


def test_recommendation_is_the_fastest_layout_that_fits():
    layouts = plan_layouts(PROFILE, 0, False, False, 10, cluster(2))
    best, why = recommend(layouts, 10, cluster(2))
    fastest = max(layouts, key=lambda lay: lay.samples_per_s)
    assert best is fastest
    # a network heavy in parameters, and memory that holds the pipeline's stages but not DDP's whole network
    heavy = synthetic_profile([1.0] * 4, [1000] * 4, parameter_bytes=2000, output_bytes=100, image_bytes=30)
    ddp, pipe = plan_layouts(heavy, 0, False, False, 10, cluster(2))
    limit = (max(pipe.memory_bytes) + max(ddp.memory_bytes)) / 2
    assert max(pipe.memory_bytes) < limit < max(ddp.memory_bytes)
    tight = cluster(2, memory=limit)
    best, why = recommend(plan_layouts(heavy, 0, False, False, 10, tight), 10, tight)
    assert best.modules == 2 and "DDP does not fit" in why
    tiny = cluster(2, memory=10)
    best, why = recommend(plan_layouts(PROFILE, 0, False, False, 10, tiny), 10, tiny)
    assert why.startswith("no layout holds batch 10")


def test_cli_prints_a_table_and_a_recommendation(capsys):
    code = main(["--set", "data.name=synthetic", "--set", "model.arch=resnet8", "--set", "data.batch_size=8",
                 "--devices", "2", "--memory-gib", "1", "--link-gbps", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| 1 x 2 (DDP) |" in out and "| 2 x 1 |" in out
    assert "recommended: " in out


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "--devices = 0 must be >= 1"),
    (["--devices", "2", "--memory-gib", "0"], "--memory-gib = 0.0 must be > 0"),
    (["--devices", "2", "--link-gbps", "-1"], "--link-gbps = -1.0 must be > 0"),
])
def test_bad_arguments_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}"
