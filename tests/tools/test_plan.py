"""pipeline.plan: the layouts, speeds, memory and recommendation predicted from a synthetic profile."""

from __future__ import annotations

import math
import re

import pytest

from pipeline.model.context import ContextPlan
from pipeline.model.networks.family import NetworkSpec
from pipeline.performance.device import OPTIMIZER_COPIES, allreduce_bytes, device_memory_bytes
from pipeline.performance.traffic import LABEL_BYTES
from pipeline.tools.plan import (
    Cluster,
    main,
    plan_checkpointed,
    plan_layout,
    plan_layouts,
    recommend,
    table,
)
from tests.model.networks.user_networks import MAPS_THEN_VECTORS
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


def test_checkpointed_ddp_by_hand():
    """Blocks of 0.3 s forward: the fewest segments that fit, their memory, and the recompute in the step."""
    profile = synthetic_profile([1.0] * 4, [1000] * 4, parameter_bytes=100, output_bytes=100, image_bytes=30,
                                forward_s=0.3)
    state = 400 * (OPTIMIZER_COPIES + 1)
    plain = plan_layout(profile, ContextPlan(1, 0, False, False), 2, 10, cluster(2))
    assert plain.memory_bytes == [state + 4150]
    tight = cluster(2, memory=5000)
    layout = plan_checkpointed(profile, 2, 10, tight)
    # 2 segments at batch 5: the image held for segment 0, then segment 1 (blocks 2-3) as without recomputation:
    # its input and two outputs (5 x 300) and its own 1000; recomputing segment 0 needs less (150 + 1500)
    assert layout.checkpoint_segments == 2 and layout.fits
    assert layout.memory_bytes == [state + 150 + 1500 + 1000]
    assert layout.recompute_s == pytest.approx(2 * 0.3 * 0.5)  # blocks 0-1's forward at half the batch
    assert layout.stage_seconds == [pytest.approx(2.0 + 0.3 + allreduce_bytes(400, 2) / LINK)]
    assert layout.max_batch_per_replica == (5000 - state) // 530  # 150 + 1500 + 1000 bytes at 5: 530 a sample
    # the planner offers it where DDP does not fit; no pipeline fits 5000 either, so it is the recommendation
    layouts = plan_layouts(profile, 0, False, False, 10, tight)
    assert [lay.name for lay in layouts] == ["DDP", "DDP checkpointed over 2 segments", "2 x 1"]
    best, why = recommend(layouts, 10, tight)
    assert best is layouts[1] and "with activation checkpointing it does" in why and "no pipeline fits" in why
    assert "recomputes 300.0 ms of forward per step" in why
    row = table(layouts, NetworkSpec("resnet8", "cifar", 4, (1, 1, 1))).splitlines()[3]
    assert row.startswith("| 1 x 2 (DDP, checkpointed over 2 segments) | - | 5 (") and row.endswith("| 300.0 |")


def test_a_faster_pipeline_is_recommended_over_checkpointed_ddp_and_says_so():
    heavy = synthetic_profile([1.0] * 4, [1000] * 4, parameter_bytes=2000, output_bytes=100, image_bytes=30,
                              forward_s=0.3)
    limit = cluster(2, memory=35000)  # DDP needs 36150; checkpointed over 2 segments 34650; the stages less
    ddp, checkpointed, pipe = plan_layouts(heavy, 0, False, False, 10, limit)
    assert not ddp.fits and checkpointed.fits and pipe.fits
    best, why = recommend([ddp, checkpointed, pipe], 10, limit)
    assert best is pipe and pipe.samples_per_s > checkpointed.samples_per_s
    assert "DDP checkpointed over 2 segments fits but is slower" in why
    # with less memory not even checkpointing fits DDP: the recommendation says so
    tighter = cluster(2, memory=30000)
    ddp, checkpointed, pipe = plan_layouts(heavy, 0, False, False, 10, tighter)
    assert not checkpointed.fits and pipe.fits
    assert "not even with activation checkpointing" in recommend([ddp, checkpointed, pipe], 10, tighter)[1]


def test_a_k_whose_modules_cannot_be_built_is_not_planned():
    from dataclasses import replace

    from pipeline.performance.cost import UNFIT

    no_e = replace(PROFILE, image_encoders=[UNFIT] * 4)  # no ContSup E encoder reaches any block's output
    assert [lay.modules for lay in plan_layouts(no_e, 0, True, False, 10, cluster(4))] == [1]
    assert [lay.modules for lay in plan_layouts(no_e, 0, False, False, 10, cluster(4))] == [1, 2, 4]


@pytest.mark.parametrize("arch", ["vit_tiny", "vgg11_bn", MAPS_THEN_VECTORS])
def test_other_networks_are_planned_with_block_index_cuts(arch, capsys):
    code = main(["--set", "data.name=synthetic", "--set", f"model.arch={arch}", "--set", "data.batch_size=2",
                 "--set", "run.device=cpu", "--devices", "2", "--link-gbps", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| layout K x R | cuts (block index) |" in out and "| 1 x 2 (DDP) | - |" in out
    assert re.search(r"\| 2 x 1 \| \d+ \|", out), out  # one flat block index, not a [stage, block] pair


def test_cli_prints_a_table_and_a_recommendation(capsys):
    code = main(["--set", "data.name=synthetic", "--set", "model.arch=resnet8", "--set", "data.batch_size=8",
                 "--devices", "2", "--memory-gib", "1", "--link-gbps", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| 1 x 2 (DDP) |" in out and "| 2 x 1 |" in out
    assert "| layout K x R | cuts ([stage, block]) |" in out and re.search(r"\| 2 x 1 \| \[\d, \d\] \|", out), out
    assert "recommended: " in out


def test_checkpointed_row_on_request_whether_or_not_ddp_fits(capsys):
    layouts = plan_layouts(PROFILE, 0, False, False, 10, cluster(2), checkpoint_segments=4)
    assert [lay.name for lay in layouts] == ["DDP", "DDP checkpointed over 4 segments", "2 x 1"]
    assert layouts[1].recompute_s == 0.0 and layouts[1].fits  # the synthetic blocks' forward is free
    code = main(["--set", "data.name=synthetic", "--set", "model.arch=resnet8", "--set", "data.batch_size=8",
                 "--devices", "2", "--link-gbps", "10", "--checkpoint-segments", "3"])
    assert code == 0 and "| 1 x 2 (DDP, checkpointed over 3 segments) | - | 4 (-) |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "--devices = 0 must be >= 1"),
    (["--devices", "2", "--checkpoint-segments", "1"],
     "--checkpoint-segments = 1 must be between 2 and the 16 blocks of resnet32"),
    (["--devices", "2", "--memory-gib", "0"], "--memory-gib = 0.0 must be > 0"),
    (["--devices", "2", "--link-gbps", "-1"], "--link-gbps = -1.0 must be > 0"),
])
def test_bad_arguments_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}"
