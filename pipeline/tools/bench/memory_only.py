"""``--memory-only``: E2E's and each module's activation memory at the config's cuts, counted in one process
without a timed run (what a network too large to time on this machine is compared by). Torch and the model
load with this module: the command line imports it only once its arguments are checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config.cuts import cut_notation, written_cuts
from pipeline.config.loading import e2e_overrides, load_config
from pipeline.data.specs import dataset_spec
from pipeline.errors import BadInput
from pipeline.performance.activations import module_activation_bytes
from pipeline.performance.profile import resolve_cuts
from pipeline.tools.bench.report import write_report

MIB = 1 << 20


def memory_report(config_path: str | None, sets: list[str], batch: int | None, out_dir: Path) -> dict[str, Any]:
    """E2E's and each module's activation memory at the config's cuts, at ``batch`` per device."""
    local = load_config(config_path, sets)
    if local.local.modules < 2:
        raise BadInput(f"--memory-only compares local modules with E2E, but local.modules = {local.local.modules}; "
                       "use a config with local.modules >= 2")
    base = load_config(config_path, e2e_overrides(sets))
    batch = local.data.batch_size if batch is None else batch
    if batch < 1:
        raise BadInput(f"--batch = {batch} must be >= 1")
    spec = dataset_spec(local.data, local.model)
    cuts = resolve_cuts(local, spec, torch.device("cpu"))
    e2e = module_activation_bytes(base, spec, [], batch)[0]
    modules = module_activation_bytes(local, spec, cuts, batch)
    height, width = spec.image_shape
    report = {
        "config": config_path, "overrides": sets, "memory_only": True, "arch": local.model.arch,
        "dataset": local.data.name, "image": [height, width], "batch_per_device": batch,
        "modules": local.local.modules, "cut_points": written_cuts(cuts, local.arch),
        "e2e_activation_mem_bytes": e2e, "module_activation_mem_bytes": modules,
        "largest_stage_activation_over_e2e": round(max(modules) / e2e, 3),
    }
    notation = cut_notation(local.arch)
    write_report(out_dir, "bench", report, lambda written: memory_table(written, notation))
    return report


def memory_table(report: dict[str, Any], notation: str) -> str:
    """bench.md of --memory-only: E2E's activation memory and each module's, cut points in ``notation``."""
    (height, width), modules = report["image"], report["module_activation_mem_bytes"]
    return "\n".join([
        f"{report['arch']} on {report['dataset']}, {height} x {width} images, batch {report['batch_per_device']} per "
        "device: activation memory (what autograd keeps for backward)",
        "",
        f"| run | cut points ({notation}) | activation mem per module (MiB) | largest / E2E |",
        "|---|---|---|---|",
        f"| e2e | - | {report['e2e_activation_mem_bytes'] / MIB:.0f} | 1.000 |",
        f"| K = {report['modules']} | {report['cut_points']} | {' / '.join(f'{m / MIB:.0f}' for m in modules)} | "
        f"{report['largest_stage_activation_over_e2e']:.3f} |",
        "",
    ])
