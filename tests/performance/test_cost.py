"""pipeline.performance.cost: what a profile predicts for a module, and the balanced cuts, on synthetic profiles."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.errors import BadInput
from pipeline.model.context import ContextPlan
from pipeline.performance.cost import (
    UNFIT,
    NetworkProfile,
    Piece,
    end_to_end_activation_bytes,
    partition_cuts,
    received_bytes,
    stage_activation_bytes,
    stage_seconds,
)
from pipeline.performance.traffic import LABEL_BYTES
from tests.profiles import synthetic_profile

R0 = ContextPlan(2, 0, False, False)


def test_stage_seconds_add_every_piece_of_the_step_and_the_transfers():
    profile = synthetic_profile([1.0, 2.0, 3.0, 4.0], [0] * 4, head_s=0.5, update_s=0.01, output_bytes=100,
                                copy_bytes_per_s=1e4)
    sent = 10 * (LABEL_BYTES + 100)  # batch 10: labels and block 1's output
    # module 0 = blocks 0, 1: two blocks and the head, each with its optimizer step, and the packet it sends
    assert stage_seconds(profile, R0, 0, 0, 2, 10, 1e4) == pytest.approx(3.0 + 0.5 + 3 * 0.01 + sent / 1e4)
    # module 1 (last) = blocks 2, 3: the classifier (0 s here) instead of a head, the packet it receives
    assert stage_seconds(profile, R0, 1, 2, 4, 10, 1e4) == pytest.approx(7.0 + 2 * 0.01 + sent / 1e4)
    # half the batch: compute halves, optimizer steps do not
    assert stage_seconds(profile, R0, 1, 2, 4, 5, 1e4) == pytest.approx(3.5 + 2 * 0.01 + sent / 2 / 1e4)


def test_contexts_add_their_encoders_and_what_travels():
    encoder = Piece(0.25, 0.0, 7, 0)
    profile = synthetic_profile([1.0] * 4, [0] * 4, output_bytes=100, image_bytes=30,
                                image_encoder=encoder, input_encoder=encoder)
    e = ContextPlan(3, 0, True, False)
    r1e = ContextPlan(3, 1, True, False)
    r2 = ContextPlan(3, 2, False, False)
    assert received_bytes(profile, e, 1, 1, 10) == 10 * (LABEL_BYTES + 100 + 30)  # h and the image
    assert received_bytes(profile, r1e, 2, 2, 10) == 10 * (LABEL_BYTES + 100 + 30 + 100)  # + module 1's input
    assert received_bytes(profile, r1e, 1, 1, 10) == 10 * (LABEL_BYTES + 100 + 30)  # module 0's input is the image
    # R2: the inputs of modules 1 (block 0's output) and 0 (the image)
    assert received_bytes(profile, r2, 2, 2, 10) == 10 * (LABEL_BYTES + 100 + 100 + 30)
    # cuts unknown: module 1 is taken at its earliest start (block 1), known: where it starts
    assert received_bytes(profile, ContextPlan(3, 1, False, False), 2, 3, 10) == 10 * (LABEL_BYTES + 100 + 100)
    assert received_bytes(profile, ContextPlan(3, 1, False, False), 2, 3, 10, starts=[0, 2, 3]) == (
        10 * (LABEL_BYTES + 100 + 100))
    assert received_bytes(profile, r2, 0, 0, 10) == 0
    # module 2 of R1E: blocks, the E encoder and one R encoder, saved bytes likewise
    assert stage_seconds(profile, r1e, 2, 2, 4, 10, 1e30) == pytest.approx(2.0 + 0.25 + 0.25)
    # its features, the image and the register entry it reads, its two blocks' outputs, what each encoder keeps
    assert stage_activation_bytes(profile, r1e, 2, 2, 4, 10) == 10 * (100 + 30 + 100 + 2 * 100) + 7 + 7


def test_activation_bytes_count_each_shared_tensor_once_and_scale_with_the_batch():
    profile = synthetic_profile([0.0] * 4, [1000, 2000, 3000, 4000], head_bytes=500, output_bytes=100,
                                image_bytes=30)
    # the input, the outputs of blocks 0 and 1 (kept by what reads them), each piece's own bytes
    assert stage_activation_bytes(profile, R0, 0, 0, 2, 10) == 10 * (30 + 2 * 100) + 1000 + 2000 + 500
    assert stage_activation_bytes(profile, R0, 1, 2, 4, 10) == 10 * (100 + 2 * 100) + 3000 + 4000
    assert stage_activation_bytes(profile, R0, 1, 2, 4, 20) == 20 * (100 + 2 * 100) + 2 * 7000
    assert end_to_end_activation_bytes(profile, 10) == 10 * (30 + 4 * 100) + 10000


def test_a_block_output_counts_where_the_block_or_its_reader_keeps_it():
    """A max pool keeps its input, not its output; a ReLU keeps its output; a pool reader keeps nothing."""
    pool_out = Piece(0.0, 0.0, 0, 0, keeps_input=True, keeps_output=False)
    relu_out = Piece(0.0, 0.0, 0, 0, keeps_input=True, keeps_output=True)
    reader = Piece(0.0, 0.0, 0, 0, keeps_input=False)
    profile = synthetic_profile([0.0] * 3, [0] * 3, output_bytes=100, image_bytes=30)
    plan = ContextPlan(1, 0, False, False)

    def with_blocks(*blocks: Piece, classifier: Piece) -> NetworkProfile:
        return replace(profile, blocks=list(blocks), classifier=classifier)

    # block 0's output is read by block 1 (keeps its input): counted; block 1's by a classifier that does not
    assert stage_activation_bytes(with_blocks(pool_out, pool_out, classifier=reader), plan, 0, 0, 2, 1) == 30 + 100
    assert stage_activation_bytes(with_blocks(pool_out, relu_out, classifier=reader), plan, 0, 0, 2, 1) == 30 + 200
    # a first block that does not keep its input: the module's input is not kept at all
    assert stage_activation_bytes(with_blocks(reader, relu_out, classifier=reader), plan, 0, 0, 2, 1) == 200


def test_balanced_is_the_fastest_cut_under_the_memory_cap(make_config):
    # time wants the cut after block 2; memory piles up early, so under a cap the cut moves forward.
    # Cuts [0] | [1] | [2] | [3]: seconds 1|5, 2|4, 3|3, 4|2; bytes 5000|6000, 7500|3500, 9500|1500, 10500|500
    profile = synthetic_profile([1.0, 1.0, 1.0, 1.0, 2.0], [5000, 2500, 2000, 1000, 500], output_bytes=0,
                                image_bytes=0)
    def cuts(*overrides):
        return partition_cuts(make_config("local.modules=2", *overrides), profile)

    assert cuts("local.partition=balanced-time") == [2]
    assert cuts("local.partition=balanced-memory") == [0]
    assert cuts("local.partition=balanced", "local.memory_cap=0.7") == [1]  # 7700 bytes
    assert cuts("local.partition=balanced", "local.memory_cap='7600B'") == [1]
    assert cuts("local.partition=balanced", "local.memory_cap='7499B'") == [0]
    assert cuts("local.partition=balanced", "local.memory_cap=0.6") == [0]
    assert cuts("local.partition=balanced", "local.memory_cap=0") == [2]  # no cap: balanced-time


def test_balanced_cuts_leave_out_modules_that_cannot_be_built(make_config):
    # Cuts [0] | [1] | [2] | [3]: seconds 1|5, 2|4, 3|3, 5|1; the best starts module 1 at block 3, where (say) the
    # block before outputs vectors that no ContSup E encoder reaches: the next best cut builds
    profile = synthetic_profile([1.0, 1.0, 1.0, 2.0, 1.0], [1000] * 5, output_bytes=0, image_bytes=0)
    no_e_at_3 = replace(profile, image_encoders=[UNFIT if start == 3 else piece
                                                 for start, piece in enumerate(profile.image_encoders)])

    def cuts(profile, *overrides):
        return partition_cuts(make_config("local.modules=2", *overrides), profile)

    assert cuts(profile, "local.partition=balanced-time", "local.context=E") == [2]
    assert cuts(no_e_at_3, "local.partition=balanced-time", "local.context=E") == [1]
    assert cuts(no_e_at_3, "local.partition=balanced-time", "local.context=R0") == [2]  # no E: it builds
    assert cuts(no_e_at_3, "local.partition=balanced", "local.memory_cap=0.9", "local.context=E") == [1]
    nowhere = replace(profile, image_encoders=[UNFIT] * 5)
    with pytest.raises(BadInput, match=r"^local.partition = 'balanced-memory': every cut of resnet8 into 2 modules "
                                       r"has a module whose local head, decoder or context encoders \(local.context = "
                                       r"'E', local.reconstruct = false\) do not fit .* local.context = 'R0' or "
                                       r"local.reconstruct = false$"):
        cuts(nowhere, "local.partition=balanced-memory", "local.context=E")


def test_balanced_names_the_smallest_cap_that_fits(make_config):
    profile = synthetic_profile([1.0] * 4, [1000] * 4, output_bytes=0, image_bytes=0)
    config = make_config("local.modules=2", "local.partition=balanced", "local.memory_cap=0.4")
    with pytest.raises(BadInput, match=r"^local.memory_cap = 0.4 .*smallest cap that fits is 0.500 of E2E .*"
                                       r"raise local.memory_cap or use more modules$"):
        partition_cuts(config, profile)
