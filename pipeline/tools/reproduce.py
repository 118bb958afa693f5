"""python -m pipeline.reproduce collect TABLE_DIR RUNS_DIR [--out FILE]

Puts measured results next to the published ones. A table is a folder of row configs
(configs/published/cifar10_resnet32, configs/fashion_mnist, ...): every ``*.toml`` in it is one
row at one K, except ``base.toml`` and files starting with ``_``. A row is named by its file
(``infopro_contrast_k4`` -> method ``infopro_contrast``, K from local.modules).

``collect`` finds every summary.json under RUNS_DIR, matches it to a row by the name of the
folder it lies in (or any folder above it, so RUNS_DIR/ROW/seed1/summary.json counts for ROW),
checks that the run trained that row's network, and writes one Markdown table: rows =
method/context, a "recipe" column (head loss, aux net, decoder, batch, lr, epochs, read from the
row configs) and a "source" column (whose published runs the recipe follows), then one column per
K, cells = measured (mean over runs) / published. ``rows`` lists a table's rows for
launch/reproduce.sh.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli import ArgumentParser, run_main
from pipeline.config.loading import load_config
from pipeline.config.schema import Config
from pipeline.data.specs import DatasetSpec, dataset_spec
from pipeline.errors import BadInput
from pipeline.model.methods.registry import method_named
from pipeline.model.networks.family import NetworkSpec
from pipeline.model.networks.registry import family_named

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pipeline.model.networks.base import BlockNet, Shape

# docs/reference.md, "Published results" (test error %, mean of 5 runs; InfoPro paper, Table 2)
# and "Published memory" (GB on one GPU, minimum needed; Table 3): table -> method -> K -> value.
PUBLISHED: dict[str, dict[str, dict[int, float]]] = {
    "cifar10_resnet32": {
        "e2e": {1: 7.37},
        "greedy_sl": {2: 10.30, 4: 16.07, 8: 21.19, 16: 24.59},
        "dgl": {2: 8.69, 4: 11.48, 8: 14.17, 16: 16.21},
        "infopro_softmax": {2: 8.13, 4: 8.64, 8: 11.40, 16: 14.23},
        "infopro_contrast": {2: 7.76, 4: 8.58, 8: 11.13, 16: 12.75},
    },
    "cifar10_resnet110": {
        "e2e": {1: 6.50},
        "greedy_sl": {2: 8.21, 4: 13.16, 8: 15.61, 16: 18.92},
        "dgl": {2: 7.70, 4: 10.50, 8: 12.46, 16: 13.80},
        "infopro_softmax": {2: 7.01, 4: 7.96, 8: 9.40, 16: 10.78},
        "infopro_contrast": {2: 6.42, 4: 7.30, 8: 8.93, 16: 9.90},
        "infopro_contrast_async": {2: 7.34, 4: 8.39},
    },
    "svhn_resnet110": {
        "e2e": {1: 3.07},
        "infopro_contrast": {2: 3.15, 4: 3.28, 8: 3.62, 16: 3.91},
    },
    "stl10_resnet110": {
        "e2e": {1: 22.27},
        "infopro_contrast": {2: 20.99, 4: 22.73, 8: 25.15, 16: 26.27},
    },
    "memory_cifar10_resnet110": {
        "e2e": {1: 9.40},
        "infopro_star": {2: 5.38, 3: 4.22, 4: 3.52},
    },
    "memory_stl10_resnet110": {
        "e2e": {1: 10.77},
        "infopro_star": {4: 4.08},
    },
    # Top-1 error %, InfoPro* K = 2 (the authors' ImageNet README and Table 4).
    "imagenet": {
        "resnet101_infopro": {2: 21.85},
        "resnet152_infopro": {2: 21.45},
        "resnext101_32x8d_infopro": {2: 20.35},
    },
    # mIoU %, single scale, Cityscapes val (the authors' segmentation README: 40k iterations).
    "cityscapes": {
        "e2e": {1: 79.12},
        "infopro": {2: 79.37},
        "infopro_batch12": {2: 79.99},
        "infopro_crop640": {2: 80.25},
    },
}

# What a table's cells measure: "error" (test error %) unless listed here.
TABLE_METRIC: dict[str, str] = {
    "memory_cifar10_resnet110": "memory",
    "memory_cifar10_resnet32": "memory",
    "memory_stl10_resnet110": "memory",
    "cityscapes": "miou",
}

METRICS = {
    "error": "test error % (measured / published)",
    "memory": "peak memory per device, GiB measured / GB published",
    "miou": "test mIoU % (measured / published)",
}

# Row order and labels; a method not listed here comes after them, in name order.
LABELS: dict[str, str] = {
    "e2e": "E2E",
    "greedy_sl": "Greedy SL",
    "dgl": "DGL",
    "infopro_softmax": "InfoPro softmax",
    "infopro_contrast": "InfoPro contrast",
    "infopro_contrast_async": "InfoPro contrast, asynchronous",
    "infopro_star": "InfoPro* (memory-balanced)",
    "infopro": "InfoPro*",
    "infopro_batch12": "InfoPro*, batch 12",
    "infopro_crop640": "InfoPro*, 640 x 1280 crops",
    "contsup_e": "ContSup E",
    "contsup_r1": "ContSup R1",
    "contsup_r1e": "ContSup R1E",
    "contsup_e_contrast": "ContSup E, contrast",
    "contsup_r1_contrast": "ContSup R1, contrast",
    "contsup_r1e_contrast": "ContSup R1E, contrast",
    "contsup_e_decoder": "ContSup E, decoder",
    "contsup_r1_decoder": "ContSup R1, decoder",
    "contsup_r1e_decoder": "ContSup R1E, decoder",
    "contsup_r2": "ContSup R2",
    "contsup_r4": "ContSup R4",
    "contsup_r7": "ContSup R7 (their R8 at K=8)",
    "contsup_r8": "ContSup R8",
    "contsup_r15": "ContSup R15 (their R16 at K=16)",
}

# ContSup rows that follow one of the ContSup authors' commands (command.sh of
# github.com/Tab-ct/ContSup), by table and method, with the experiments that use it. A ContSup row
# not listed here is this project's own variant and is marked so in the table.
CONTSUP_COMMANDS: dict[str, dict[str, str]] = {
    "cifar10_resnet32": {
        "contsup_e": "Tables 1, 2, 4, Fig. 5",
        "contsup_r1": "Tables 1, 4, Fig. 5",
        "contsup_r1e": "Tables 1, 2, Fig. 5",
        "contsup_e_contrast": "Table 2, Fig. 5",
        "contsup_r1e_contrast": "Table 2, Fig. 5",
    },
    "contsup_ablation_cifar10_resnet32": {
        "contsup_r1_contrast": "Fig. 5",
        "contsup_e_decoder": "Fig. 5",
        "contsup_r1_decoder": "Fig. 5",
        "contsup_r1e_decoder": "Fig. 5",
        "contsup_r2": "Table 4",
        "contsup_r4": "Table 4",
        "contsup_r7": "Table 4",
        "contsup_r8": "Table 4",
        "contsup_r15": "Table 4",
    },
    "cifar10_resnet110": {"contsup_r1e": "Table 3"},
}

# Settings that make a run a different experiment from the row (not just a shorter one).
_IDENTITY = (("model", None), ("local", None), ("data", "name"))
_RECIPE = (("train", None), ("data", "batch_size"))
_K_SUFFIX = re.compile(r"_k(\d+)$")


@dataclass
class Row:
    name: str  # the config file's stem
    method: str  # the stem without its _k<K> suffix
    modules: int
    path: Path
    config: Config
    runs: list[dict[str, Any]] = field(default_factory=list)
    short: bool = False  # some run used a different training recipe (e.g. a smoke run)


def table_rows(table_dir: str | Path) -> list[Row]:
    """The row configs of a table folder, loaded and validated, in table order (method, then K)."""
    folder = Path(table_dir)
    if not folder.is_dir():
        raise BadInput(f"table folder {str(folder)!r} does not exist; pass a folder of row configs "
                       "such as configs/published/cifar10_resnet32 or configs/fashion_mnist")
    rows = []
    for path in sorted(folder.glob("*.toml")):
        if path.name == "base.toml" or path.name.startswith("_"):
            continue
        try:
            config = load_config(path)
        except BadInput as err:
            raise BadInput(f"{path}: {err}") from None
        match = _K_SUFFIX.search(path.stem)
        if match and int(match.group(1)) != config.local.modules:
            raise BadInput(f"{path}: the file name says K={match.group(1)} but local.modules = "
                           f"{config.local.modules}; rename the file or fix the config")
        method = path.stem[: match.start()] if match else path.stem
        rows.append(Row(path.stem, method, config.local.modules, path, config))
    if not rows:
        raise BadInput(f"table folder {str(folder)!r} holds no row configs (*.toml other than base.toml)")
    return sorted(rows, key=lambda row: (_order(row.method), row.modules))


def _sections(config: dict[str, Any], keys: tuple[tuple[str, str | None], ...]) -> dict[str, Any]:
    picked: dict[str, Any] = {}
    for table, key in keys:
        values = config.get(table, {})
        picked[f"{table}.{key}" if key else table] = values.get(key) if key else values
    return picked


def _load_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInput(f"{path} is not a readable summary.json ({err}); delete it or rerun that row") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("config"), dict):
        raise BadInput(f"{path} is not a summary.json written by pipeline.train (no 'config' object)")
    return summary


def _row_for(path: Path, runs_dir: Path, summary: dict[str, Any], by_name: dict[str, Row]) -> Row | None:
    folders = path.parent.relative_to(runs_dir).parts[::-1]  # deepest first
    out_dir = str(summary["config"].get("run", {}).get("out_dir", ""))
    for name in (*folders, Path(out_dir).name):
        if name in by_name:
            return by_name[name]
    return None


def match_runs(rows: list[Row], runs_dir: str | Path) -> list[str]:
    """Attach every summary.json under runs_dir to its row; returns warnings for the others."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise BadInput(f"runs folder {str(root)!r} does not exist; pass the folder the rows wrote "
                       "their outputs to (run.out_dir's parent, e.g. runs/published/cifar10_resnet32)")
    summaries = sorted(root.rglob("summary.json"))
    if not summaries:
        raise BadInput(f"no summary.json under {str(root)!r}; run the table's rows first "
                       "(launch/reproduce.sh TABLE) or pass the folder they wrote to")
    by_name = {row.name: row for row in rows}
    warnings = []
    for path in summaries:
        summary = _load_summary(path)
        row = _row_for(path, root, summary, by_name)
        if row is None:
            warnings.append(f"{path}: matches no row config; ignored")
            continue
        expected = row.config.to_dict()
        got = summary["config"]
        if _sections(got, _IDENTITY) != _sections(expected, _IDENTITY):
            warnings.append(f"{path}: its model/local/data settings differ from {row.path}; ignored")
            continue
        if _sections(got, _RECIPE) != _sections(expected, _RECIPE):
            row.short = True
        row.runs.append(summary)
    if not any(row.runs for row in rows):
        raise BadInput(f"none of the {len(summaries)} summary.json files under {str(root)!r} belongs to a "
                       "row of this table; check TABLE_DIR and RUNS_DIR")
    return warnings


def _measure(summary: dict[str, Any], metric: str) -> float | None:
    if metric == "memory":
        peaks = [stage.get("peak_mem_bytes") for stage in summary.get("stages", [])]
        peaks = [peak for peak in peaks if isinstance(peak, (int, float))]
        return max(peaks) / 2**30 if peaks else None
    if metric == "miou":
        miou = summary.get("test_miou")
        return 100.0 * miou if isinstance(miou, (int, float)) else None
    accuracy = summary.get("test_accuracy")
    return 100.0 * (1.0 - accuracy) if isinstance(accuracy, (int, float)) else None


def _cell(row: Row, metric: str, published: float | None) -> str:
    values = [value for value in (_measure(run, metric) for run in row.runs) if value is not None]
    if values:
        mean = sum(values) / len(values)
        measured = f"{mean:.2f}"
        if len(values) > 1:
            spread = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
            measured += f" ± {spread:.2f} (n={len(values)})"
        if row.short:
            measured += " †"
    else:
        measured = "n/a" if row.runs else "not run"
    return f"{measured} / {published:.2f}" if published is not None else f"{measured} / –"


def _order(method: str) -> tuple[int, str]:
    known = list(LABELS)
    return (known.index(method), "") if method in known else (len(known), method)


def _recipe(config: Config) -> str:
    """What a row trains with, in one phrase: the settings that differ between published recipes."""
    local, train = config.local, config.train
    if local.modules == 1:
        head = "end to end"
    else:
        loss = method_named(local.loss).summary_name
        head = f"{loss}, {_aux_heads(config)}, " + ("decoder" if local.reconstruct else "no decoder")
    return f"{head}; batch {config.data.batch_size}, lr {train.lr:g}, {train.epochs} epochs"


def _aux_heads(config: Config) -> str:
    """The auxiliary heads a row's modules train with, as its family's parts name them (a token head for a
    ViT, local.aux on a map): those at its cuts, or at every block a balanced partition may cut after."""
    import torch  # the rows and their configs are read without it

    from pipeline.performance.profile import resolve_cuts  # torch, as above

    local = config.local

    def shapes() -> Iterator[Shape]:
        # read only by parts that name their heads by the feature: an image folder's spec may read the folder
        spec = dataset_spec(config.data, config.model)
        net = _network(config.arch, spec, config.model.deep_stem)
        ends = (resolve_cuts(config, spec, torch.device("cpu")) if isinstance(local.partition, list)
                or local.partition == "equal" else range(len(net) - 1))
        for end in ends:
            yield net.shape(end)

    return " / ".join(family_named(config.arch.family).parts().aux_head_names(shapes(), local))


@functools.lru_cache(maxsize=16)
def _network(arch: NetworkSpec, spec: DatasetSpec, deep_stem: bool) -> BlockNet:
    """The row's network, one per table (its rows share it, and the shapes it probed)."""
    from pipeline.model.network import make_net  # torch, as above

    return make_net(arch, spec, deep_stem)


def _method_recipe(rows: list[Row]) -> str:
    # The rows of one method differ only in K and the K-dependent loss weights, unless a config
    # says otherwise; then every variant is listed rather than one picked.
    return " / ".join(dict.fromkeys(_recipe(row.config) for row in rows))


def _source(table: str, method: str) -> str:
    """Whose published runs the method's recipe follows."""
    commands = CONTSUP_COMMANDS.get(table, {})
    if method in commands:
        return f"ContSup authors' command ({commands[method]})"
    if method.startswith("contsup"):
        return "this project's variant (no ContSup command)"
    if table in PUBLISHED or table in TABLE_METRIC:
        return "InfoPro paper and code"
    return "this project"


def render(table: str, rows: list[Row], metric: str) -> str:
    # The published figures are in the table's own metric; another metric has none to compare.
    native = TABLE_METRIC.get(table, "error")
    published = PUBLISHED.get(table, {}) if metric == native else {}
    columns = sorted({row.modules for row in rows})
    methods = sorted({row.method for row in rows}, key=_order)
    cells = {(row.method, row.modules): row for row in rows}
    lines = [
        f"### {table}: {METRICS[metric]}",
        "",
        "| method | recipe | source | " + " | ".join(f"K={k}" for k in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for method in methods:
        entries = []
        for k in columns:
            row = cells.get((method, k))
            entries.append(_cell(row, metric, published.get(method, {}).get(k)) if row else "")
        recipe = _method_recipe([row for row in rows if row.method == method])
        lines.append(f"| {LABELS.get(method, method)} | {recipe} | {_source(table, method)} | "
                     + " | ".join(entries) + " |")
    notes = []
    if any(row.short and row.runs for row in rows):
        notes.append("† trained with a different recipe than the row's config (train.* or batch size "
                     "overridden, e.g. a shortened run): not comparable to the published figure.")
    if metric == "memory":
        notes.append("Measured: the largest peak_mem_bytes over the run's processes (GPU allocator peak; "
                     "CPU: peak resident set).")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def collect(table_dir: str | Path, runs_dir: str | Path, metric: str = "auto") -> tuple[str, list[str]]:
    """The Markdown table for one table folder and the runs under runs_dir, plus warnings."""
    rows = table_rows(table_dir)
    warnings = match_runs(rows, runs_dir)
    table = Path(table_dir).resolve().name
    if metric == "auto":
        metric = TABLE_METRIC.get(table, "error")
    return render(table, rows, metric), warnings


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m pipeline.reproduce",
                            description="Compare measured runs with the published tables (docs/reference.md).")
    commands = parser.add_subparsers(dest="command", required=True)
    collect_cmd = commands.add_parser("collect", help="write the Markdown table of one table folder's runs")
    collect_cmd.add_argument("table_dir", metavar="TABLE_DIR",
                             help="folder of row configs, e.g. configs/published/cifar10_resnet32")
    collect_cmd.add_argument("runs_dir", metavar="RUNS_DIR",
                             help="folder holding the rows' outputs (searched for summary.json)")
    collect_cmd.add_argument("--out", metavar="FILE", help="write the table here as well as to stdout")
    collect_cmd.add_argument("--metric", choices=("auto", *METRICS), default="auto",
                             help="what the cells show (auto: memory for memory_* tables, mIoU for cityscapes, "
                                  "else test error)")
    rows_cmd = commands.add_parser("rows", help="list a table's rows: name, K and config path, tab-separated")
    rows_cmd.add_argument("table_dir", metavar="TABLE_DIR")
    return parser


def _main(argv: list[str] | None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "rows":
        for row in table_rows(args.table_dir):
            print(f"{row.name}\t{row.modules}\t{row.path}")
        return
    text, warnings = collect(args.table_dir, args.runs_dir, args.metric)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
        except OSError as err:
            raise BadInput(f"--out {args.out!r}: cannot write it ({err})") from None
    print(text, end="")


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
