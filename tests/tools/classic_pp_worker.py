"""torchrun target of tests/tools/test_classic_pp.py: STEPS classic-pipeline steps, then each stage's weights.

python tests/forked_torchrun.py --nproc-per-node K tests/tools/classic_pp_worker.py OUT SCHEDULE M STEPS --set ...
Rank k writes OUT/stage_<k>.pt (its blocks' state dict) after the steps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config.loading import e2e_overrides, load_config
from pipeline.data.specs import dataset_spec
from pipeline.performance.profile import resolve_cuts
from pipeline.tools.classic_pp import build_stage, full_batches


def main() -> None:
    out, schedule, microbatches, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sets = sys.argv[6::2]  # after "--set" pairs
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    cpu = torch.device("cpu")
    config = load_config(None, sets)
    e2e = load_config(None, e2e_overrides(sets))
    spec = dataset_spec(config.data, config.model)
    cuts = resolve_cuts(config, spec, cpu)
    stage = build_stage(config, e2e, spec, cuts, rank, size, schedule, microbatches, cpu)  # type: ignore[arg-type]
    batches = full_batches(config, cpu, config.data.batch_size) if rank == 0 else None
    for step in range(1, steps + 1):
        epoch, images, labels = next(batches) if batches is not None else (1, None, None)
        stage.step(epoch, step, steps, images, labels)
    torch.save(stage.module.state_dict(), out / f"stage_{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    os._exit(0)
