"""torchrun --nproc-per-node K*R -m pipeline.sync_probe --out DIR [--set KEY=VALUE ...]

Host syncs in one training step of a K x R job, for the self-test. Each rank trains its own
module as the pipeline does (DDP over its replicas, SyncBatchNorm where pipeline.sync_batchnorm,
autocast and channels_last as the config says), its input made by the modules before it on the
same rank, so no link is involved: the couriers are threads of their own and their header read
is a sync by design. After two warm-up steps (allocator, cuDNN's algorithm choice) one step runs
under ``torch.cuda.set_sync_debug_mode("warn")`` and every sync it makes is recorded, with the
file that asked for it. Each rank writes DIR/sync_rank{R}.json. On CPU nothing is counted
(``syncs`` is null): the run checks the plumbing only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from pipeline.cli import ArgumentParser, add_set_argument, exit_process, run_main
from pipeline.config.loading import load_config
from pipeline.data.loader import make_loaders
from pipeline.model.network import make_layout
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.data_parallel import DataParallel
from pipeline.runtime.packet import Packet
from pipeline.runtime.topology import from_env, process_groups
from pipeline.runtime.worker import make_worker

WARM_UP_STEPS = 2
SYNC_BATCHNORM_FILE = "torch/nn/modules/_functions.py"  # where torch's SyncBatchNorm forward lives


def probe(out: Path, sets: list[str]) -> None:
    config = load_config(None, sets)
    topology = from_env("pipeline", config.run, config.pipeline, config.local.modules, config.precision.amp)
    device = topology.device
    train, _ = make_loaders(config.data, config.model, config.run.seed, device, processes=topology.replicas)
    layout = make_layout(config, train.spec, resolve_cuts(config, train.spec, device))
    with process_groups(topology, config.pipeline.timeout_s):
        parallel = DataParallel(topology, config.pipeline.sync_batchnorm)
        before = [make_worker(config, layout, index, device) for index in range(topology.stage)]
        worker = make_worker(config, layout, topology.stage, device, wrap=parallel.wrap)
        batches = train.batches(1, 0, parallel.part)

        def step() -> torch.Tensor:
            images, labels = next(batches)
            packet = Packet.from_batch(images, labels)
            for earlier in before:
                made = earlier.eval_step(packet)
                assert isinstance(made, Packet)
                packet = made
            return worker.train_step(packet)[1]

        for _ in range(WARM_UP_STEPS):
            step()
        syncs: list[str] | None = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    loss = step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = [f"{Path(w.filename).as_posix()}:{w.lineno}" for w in seen
                     if "synchroniz" in str(w.message).lower()]
        else:
            loss = step()
        sync_bn = sum(isinstance(module, torch.nn.SyncBatchNorm) for module in worker.trainable.modules())
        record = {"rank": topology.rank, "stage": topology.stage, "replica": topology.replica,
                  "loss": float(loss), "syncs": syncs, "sync_batchnorm_layers": sync_bn}
        (out / f"sync_rank{topology.rank}.json").write_text(json.dumps(record) + "\n")


def from_sync_batchnorm(site: str) -> bool:
    """Whether a recorded sync was asked for by torch's SyncBatchNorm (its count mask)."""
    return site.rsplit(":", 1)[0].endswith(SYNC_BATCHNORM_FILE)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.sync_probe", description=__doc__.split("\n\n")[1])
        parser.add_argument("--out", required=True, help="where each rank writes sync_rank{R}.json")
        add_set_argument(parser)
        args = parser.parse_args(argv)
        probe(Path(args.out), args.set)

    return run_main(body)


if __name__ == "__main__":
    exit_process(main())
