"""configs/ and launch/: every config validates, every script's --dry-run prints the right command."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config.loading import load_config
from pipeline.config.schema import Config
from pipeline.config.validation import ineffective_keys

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
LAUNCH = REPO / "launch"
SCRIPTS = ["single_node.sh", "multi_node.sh", "slurm.sbatch", "quickstart.sh", "reproduce.sh"]
def is_row(path: str) -> bool:
    """A results row (a config of one table), not a base, a recipe or the quickstart."""
    name = Path(path).name
    return name not in ("base.toml", "recipe.toml", "quickstart.toml") and not name.startswith("_")


def is_published(path: str) -> bool:
    return path.startswith("configs/published/")


# ------------------------------------------------------------------------------------ configs


def test_config_tree_is_there(shipped_configs: dict[str, Config]) -> None:
    assert (CONFIGS / "quickstart.toml").is_file()
    assert len(list((CONFIGS / "fashion_mnist").glob("*.toml"))) == 6  # base + 5 rows
    assert len([path for path in shipped_configs if is_row(path)]) >= 80


def test_row_names_match_their_settings(check_shipped: Callable[..., int]) -> None:
    assert check_shipped(check_row_name, is_row) >= 80


def check_row_name(path: str, config: Config) -> None:
    stem, table = Path(path).stem, Path(path).parent.relative_to("configs")
    assert config.run.out_dir == f"runs/{table.as_posix()}/{stem}", "run.out_dir = runs/<table>/<row>"
    if "_k" in stem:
        assert stem.endswith(f"_k{config.local.modules}")
    if stem == "e2e":
        assert config.local.modules == 1
    if stem.startswith("greedy_sl"):
        assert (config.local.context, config.local.aux, config.local.reconstruct) == ("R0", "0c1f", False)
    if stem.startswith("dgl"):
        assert (config.local.context, config.local.aux, config.local.reconstruct) == ("R0", "1c2f", False)
    if stem.startswith("infopro_softmax"):
        assert (config.local.loss, config.local.reconstruct) == ("softmax", True)
    if stem.startswith(("infopro_contrast", "infopro_star")):
        assert (config.local.loss, config.local.reconstruct, config.local.context) == ("contrast", True, "R0")
    if stem.startswith("contsup_"):
        expected = stem.split("_")[1].upper()
        assert config.local.context == expected
    if stem.startswith("infopro_contrast_async"):
        assert config.run.mode == "pipeline"
        # DGL's asynchronous setting: buffers of 30 batches, priority-LIFO, no reuse limit
        assert (config.pipeline.schedule, config.pipeline.buffer_batches, config.pipeline.max_reuse) == \
            ("buffered", 30, 0)
    else:
        assert config.pipeline.schedule == "lockstep"


def test_quickstart() -> None:
    config = load_config(CONFIGS / "quickstart.toml")
    assert (config.data.name, config.model.arch, config.data.batch_size) == ("fashion_mnist", "resnet32", 128)
    local, train = config.local, config.train
    assert (local.modules, local.context, local.loss, local.aux) == (4, "R1E", "softmax", "1c2f")
    assert (train.epochs, train.lr, train.schedule) == (1, 0.1, "cosine-step")
    assert ineffective_keys(config) == []  # the first command a user runs prints no warning
    assert (config.run.mode, config.run.out_dir, config.run.log_every) == ("sequential", "runs/quickstart", 10)


def test_fashion_mnist_set_shares_one_budget() -> None:
    rows = {path.stem: load_config(path) for path in (CONFIGS / "fashion_mnist").glob("*.toml") if path.stem != "base"}
    assert set(rows) == {"e2e", "greedy_sl", "contsup_e", "contsup_r1", "contsup_r1e"}
    budgets = {repr((c.train, c.data, c.model)) for c in rows.values()}
    assert len(budgets) == 1, "every row trains with the same budget"
    one = rows["e2e"]
    assert (one.train.epochs, one.data.batch_size, one.train.lr, one.train.schedule) == (1, 128, 0.1, "cosine-step")
    assert all(ineffective_keys(row) == [] for row in rows.values())
    assert one.data.name == "fashion_mnist" and one.model.arch == "resnet32"
    assert rows["e2e"].local.modules == 1
    greedy = rows["greedy_sl"].local
    assert (greedy.modules, greedy.context, greedy.aux) == (16, "R0", "0c1f")
    for name, context in (("contsup_e", "E"), ("contsup_r1", "R1"), ("contsup_r1e", "R1E")):
        local = rows[name].local
        assert (local.modules, local.context, local.aux) == (16, context, "1c2f")


PUBLISHED_DIR = CONFIGS / "published"


def test_published_rows_use_the_reference_recipe(check_shipped: Callable[..., int]) -> None:
    assert check_shipped(check_recipe, lambda path: is_published(path) and Path(path).name != "recipe.toml") >= 120


def check_recipe(path: str, config: Config) -> None:
    train = config.train
    if config.data.name == "cityscapes":  # the authors' MMSegmentation recipe: poly over 40k iterations
        assert (train.momentum, train.nesterov, train.weight_decay) == (0.9, False, 5e-4)
        assert (train.schedule, train.poly_power, train.min_lr, train.max_steps) == ("poly", 0.9, 1e-4, 40_000)
        assert config.arch.family == "segmentation" and config.model.arch == "deeplabv3_resnet101"
        assert config.model.deep_stem and config.pipeline.sync_batchnorm
        batch, crop = config.data.batch_size, tuple(config.data.crop)
        assert (batch, crop, train.lr) in {(8, (512, 1024), 0.01), (12, (512, 1024), 0.015), (8, (640, 1280), 0.015)}
        steps_per_epoch = -(-2975 // batch)  # Cityscapes' 2975 training images
        assert (train.epochs - 1) * steps_per_epoch < 40_000 <= train.epochs * steps_per_epoch  # max_steps ends it
        return
    assert (train.momentum, train.nesterov, train.weight_decay) == (0.9, True, 1e-4)
    if config.data.name == "image_folder":  # the authors' ImageNet recipe: 90 epochs, no warm-up
        assert (train.epochs, train.schedule, train.warmup_epochs) == (90, "cosine", 0)
        assert (config.data.batch_size, config.train.lr, config.arch.family) == (1024, 0.4, "imagenet")
        assert ineffective_keys(config) == []
        return
    assert (train.epochs, train.schedule, train.warmup_epochs) == (160, "cosine", 10)
    assert (config.local.aux, config.local.aux_feature_dim, config.local.aux_widen) in {
        ("1c2f", 128, 1), ("0c1f", 128, 1)}
    expected = {"cifar10": (1024, 0.8), "svhn": (1024, 0.8), "stl10": (128, 0.1)}[config.data.name]
    assert (config.data.batch_size, config.train.lr) == expected


@pytest.mark.parametrize("table,arch,values", [
    ("cifar10_resnet32", "resnet32", {2: (5, 1, 0, 0), 4: (6, 0, 1, 2), 8: (5, 0, 0, 2), 16: (5, 0.05, 0.2, 0.5)}),
    ("cifar10_resnet110", "resnet110", {2: (5, 0.5, 0, 0), 4: (1, 0, 0, 1), 8: (5, 0, 0, 1), 16: (5, 0, 0.5, 1)}),
    ("stl10_resnet110", "resnet110",
     {2: (10, 1, 0, 0), 4: (20, 0.2, 5, 2), 8: (20, 0.2, 5, 1), 16: (20, 0.5, 10, 0.1)}),
    ("svhn_resnet110", "resnet110", {2: (1, 0.1, 0, 0), 4: (5, 0, 0.5, 0), 8: (5, 0, 0.5, 2), 16: (5, 0.2, 0.5, 1)}),
])
def test_published_infopro_weights(table: str, arch: str, values: dict[int, tuple[float, ...]]) -> None:
    for k, weights in values.items():
        for method in ("infopro_contrast", "infopro_softmax", "contsup_r1e"):
            path = PUBLISHED_DIR / table / f"{method}_k{k}.toml"
            if not path.exists():
                assert method != "infopro_contrast" and not table.startswith("cifar10"), path
                continue
            local = load_config(path).local
            assert (local.ixx_1, local.ixy_1, local.ixx_2, local.ixy_2) == weights, path
            assert load_config(path).model.arch == arch


@pytest.mark.parametrize("table,cuts", [
    ("memory_cifar10_resnet110", {2: [[1, 14]], 3: [[1, 9], [2, 2]], 4: [[1, 6], [1, 14], [2, 8]]}),
    ("memory_stl10_resnet110", {2: [[1, 14]], 3: [[1, 8], [2, 1]], 4: [[1, 6], [1, 14], [2, 8]]}),
    ("memory_cifar10_resnet32", {2: [[1, 3]], 4: [[1, 2], [1, 4], [2, 2]],
                                 8: [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [3, 1], [3, 2]]}),
])
def test_memory_balanced_cut_lists(table: str, cuts: dict[int, list[list[int]]]) -> None:
    for k, expected in cuts.items():
        assert load_config(PUBLISHED_DIR / table / f"infopro_star_k{k}.toml").local.partition == expected


# InfoPro's ImageNet code (k2_infopro): module 0 ends after layer2[c]; (ixx, ixy) from the authors' commands.
@pytest.mark.parametrize("arch,c,weights", [("resnet101", 0, (5, 0.75)), ("resnet152", 5, (5, 1)),
                                            ("resnext101_32x8d", 2, (5, 0.75))])
def test_infopro_imagenet_rows(arch: str, c: int, weights: tuple[float, float]) -> None:
    infopro = load_config(PUBLISHED_DIR / "imagenet" / f"{arch}_infopro_k2.toml")
    local = infopro.local
    assert (infopro.model.arch, local.modules, local.partition, local.reconstruct) == (arch, 2, [[2, c]], True)
    assert (local.ixx_1, local.ixy_1, local.loss, local.context) == (*weights, "softmax", "R0")
    e2e = load_config(PUBLISHED_DIR / "imagenet" / f"{arch}_e2e.toml")
    assert (e2e.model.arch, e2e.local.modules, e2e.train, e2e.data) == (arch, 1, infopro.train, infopro.data)


# ------------------------------------------------------------------------------------ scripts


def run_script(name: str, *args: str, env: dict[str, str] | None = None,
               cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(LAUNCH / name), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=60, check=False)


def commands(result: subprocess.CompletedProcess[str]) -> list[list[str]]:
    """The argv of every command a script printed ('+ ' lines)."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


@pytest.fixture()
def fake_bin(tmp_path: Path) -> Path:
    """A torchrun and srun on PATH that only record their argv and OMP_NUM_THREADS (so a real run is harmless)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("torchrun", "srun"):
        script = folder / tool
        script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$0" "$@" > "{tmp_path}/{tool}.argv"\n'
                          f'printf "%s" "${{OMP_NUM_THREADS-unset}}" > "{tmp_path}/{tool}.omp"\n')
        script.chmod(0o755)
    return folder


def path_with(folder: Path) -> dict[str, str]:
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def scripted_torchrun(tmp_path: Path, stdout: str, stderr: str, code: int) -> dict[str, str]:
    """The environment of a launcher whose torchrun prints ``stdout`` and ``stderr`` and exits ``code``."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (tmp_path / "stdout.txt").write_text(stdout)
    (tmp_path / "stderr.txt").write_text(stderr)
    fake = folder / "torchrun"
    fake.write_text(f'#!/usr/bin/env bash\ncat "{tmp_path}/stdout.txt"\ncat "{tmp_path}/stderr.txt" >&2\nexit {code}\n')
    fake.chmod(0o755)
    return path_with(folder)


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_strict_executable_and_explain_themselves(name: str) -> None:
    path = LAUNCH / name
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    result = run_script(name, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage:")
    assert "--dry-run" in result.stdout


@pytest.mark.parametrize("name", ["single_node.sh", "multi_node.sh", "slurm.sbatch", "reproduce.sh"])
def test_scripts_reject_missing_arguments_with_one_error_line(name: str) -> None:
    result = run_script(name, "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_single_node_dry_run(tmp_path: Path, fake_bin: Path) -> None:
    result = run_script("single_node.sh", "--dry-run", "configs/quickstart.toml", "--set", "train.epochs=2",
                        env=path_with(fake_bin))
    assert commands(result) == [[
        "torchrun", "--standalone", "--nproc-per-node", "4", "--max-restarts", "3", "-m", "pipeline.train",
        "--config", "configs/quickstart.toml", "--set", "run.mode=pipeline", "--set", "train.epochs=2"]]
    assert not (tmp_path / "torchrun.argv").exists(), "--dry-run must not run anything"


def test_max_restarts_is_overridable_and_checked() -> None:
    result = run_script("single_node.sh", "--dry-run", "configs/quickstart.toml", env={"MAX_RESTARTS": "0"})
    (argv,) = commands(result)
    assert argv[argv.index("--max-restarts") + 1] == "0"
    bad = run_script("single_node.sh", "--dry-run", "configs/quickstart.toml", env={"MAX_RESTARTS": "many"})
    assert bad.returncode == 2 and bad.stderr.strip() == "error: MAX_RESTARTS must be a whole number >= 0 (got 'many')"


def test_single_node_takes_k_from_the_overrides() -> None:
    result = run_script("single_node.sh", "--dry-run", "configs/quickstart.toml", "--set", "local.modules=8")
    (argv,) = commands(result)
    assert argv[argv.index("--nproc-per-node") + 1] == "8"


def test_single_node_runs_exactly_what_it_prints(tmp_path: Path, fake_bin: Path) -> None:
    result = run_script("single_node.sh", "configs/fashion_mnist/contsup_r1e.toml", "--set", "data.root=/a b",
                        env=path_with(fake_bin))
    (printed,) = commands(result)
    ran = (tmp_path / "torchrun.argv").read_text().splitlines()
    assert [Path(ran[0]).name, *ran[1:]] == printed
    assert printed[printed.index("--nproc-per-node") + 1] == "16"


def test_single_node_checks_k_and_modes() -> None:
    mismatch = run_script("single_node.sh", "--dry-run", "--nproc", "3", "configs/quickstart.toml")
    assert mismatch.returncode == 2 and "one process per module" in mismatch.stderr
    e2e = run_script("single_node.sh", "--dry-run", "configs/fashion_mnist/e2e.toml")
    assert e2e.returncode == 2
    ddp = run_script("single_node.sh", "--dry-run", "--mode", "ddp", "--nproc", "2", "configs/fashion_mnist/e2e.toml")
    assert commands(ddp) == [["torchrun", "--standalone", "--nproc-per-node", "2", "--max-restarts", "3",
                              "-m", "pipeline.train", "--config", "configs/fashion_mnist/e2e.toml",
                              "--set", "run.mode=ddp"]]
    bad_config = run_script("single_node.sh", "--dry-run", "configs/no_such.toml")
    assert bad_config.returncode == 2 and "does not exist" in bad_config.stderr
    assert "Traceback" not in bad_config.stderr


def test_multi_node_dry_run() -> None:
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29600", "RDZV_ID": "job7"}
    result = run_script("multi_node.sh", "--dry-run", "configs/fashion_mnist/greedy_sl.toml", "--set", "train.epochs=1",
                        env=env)
    assert commands(result) == [[
        "torchrun", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8", "--max-restarts", "3",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29600", "--rdzv-id", "job7",
        "-m", "pipeline.train", "--config", "configs/fashion_mnist/greedy_sl.toml",
        "--set", "run.mode=pipeline", "--set", "train.epochs=1"]]


def test_multi_node_needs_its_environment_and_an_even_split() -> None:
    missing = run_script("multi_node.sh", "--dry-run", "configs/quickstart.toml", env={"NNODES": "2", "NODE_RANK": "0"})
    assert missing.returncode == 2 and "MASTER_ADDR" in missing.stderr
    uneven = run_script("multi_node.sh", "--dry-run", "configs/quickstart.toml",
                        env={"NNODES": "3", "NODE_RANK": "0", "MASTER_ADDR": "n0"})
    assert uneven.returncode == 2 and "evenly" in uneven.stderr


def slurm_env(**extra: str) -> dict[str, str]:
    return {"SLURM_JOB_NODELIST": "gpu[03-05,07]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242",
            "SLURM_SUBMIT_DIR": str(REPO), **extra}


def test_slurm_dry_run_uses_the_first_node_as_rendezvous(tmp_path: Path) -> None:
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] && printf "gpu-first\\ngpu04\\n"\n')
    scontrol.chmod(0o755)
    # with scontrol (what a Slurm node has), and without it (the script's own host-list parser)
    for env, first in ((slurm_env(**path_with(tmp_path)), "gpu-first"), (slurm_env(), "gpu03")):
        result = run_script("slurm.sbatch", "--dry-run", "configs/quickstart.toml", env=env, cwd=tmp_path)
        assert commands(result) == [[
            "srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
            "torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--max-restarts", "3",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{first}:29500", "--rdzv-id", "4242",
            "-m", "pipeline.train", "--config", "configs/quickstart.toml", "--set", "run.mode=pipeline"]]


def test_slurm_header() -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    for directive in ("--nodes", "--ntasks-per-node=1", "--gpus-per-node", "--time", "--output", "--requeue",
                      "--signal=TERM@120"):
        assert f"#SBATCH {directive}" in text
    outside = run_script("slurm.sbatch", "configs/quickstart.toml", env={"SLURM_JOB_NODELIST": "", "MASTER_ADDR": ""})
    assert outside.returncode == 2 and "sbatch" in outside.stderr and "--dry-run" in outside.stderr


@pytest.mark.parametrize("mode, config, nproc", [("pipeline", "configs/quickstart.toml", "2"),
                                                 ("ddp", "configs/fashion_mnist/e2e.toml", "2")])
def test_slurm_dry_run_outside_slurm_previews_with_placeholders(tmp_path: Path, mode: str, config: str,
                                                                 nproc: str) -> None:
    env = {"SLURM_JOB_NODELIST": "", "MASTER_ADDR": "", "SLURM_JOB_NUM_NODES": "", "SLURM_JOB_ID": "",
           "SLURM_GPUS_PER_NODE": "", "SLURM_SUBMIT_DIR": str(REPO)}
    result = run_script("slurm.sbatch", config, "--mode", mode, "--dry-run", env=env, cwd=tmp_path)
    assert commands(result) == [[
        "srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
        # the #SBATCH lines: 2 nodes, 2 GPUs each
        "torchrun", "--nnodes", "2", "--nproc-per-node", nproc, "--max-restarts", "3",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "FIRST_NODE:29500", "--rdzv-id", "SLURM_JOB_ID",
        "-m", "pipeline.train", "--config", config, "--set", f"run.mode={mode}"]]
    assert "placeholders" in result.stderr


def test_quickstart_dry_run(tmp_path: Path) -> None:
    result = run_script("quickstart.sh", "--dry-run", "--set", "train.max_steps=5", cwd=tmp_path)
    (argv,) = commands(result)
    assert argv[1:] == ["-m", "pipeline.train", "--config", "configs/quickstart.toml", "--set", "train.max_steps=5"]
    assert Path(argv[0]).name.startswith("python")


def test_reproduce_dry_run_without_gpus_is_sequential() -> None:
    result = run_script("reproduce.sh", "--dry-run", "fashion_mnist", "--set", "train.max_steps=3", env={"GPUS": "0"})
    argvs = commands(result)
    assert len(argvs) == 6  # five rows, then collect
    for argv in argvs[:5]:
        assert argv[1:3] == ["-m", "pipeline.train"] and "--set" in argv and "run.mode=sequential" in argv
        row = Path(argv[argv.index("--config") + 1]).stem
        assert f"run.out_dir=runs/fashion_mnist/{row}" in argv and argv[-2:] == ["--set", "train.max_steps=3"]
    assert argvs[0][argvs[0].index("--config") + 1] == "configs/fashion_mnist/e2e.toml"
    assert argvs[-1][1:] == ["-m", "pipeline.reproduce", "collect", "configs/fashion_mnist", "runs/fashion_mnist",
                             "--out", "runs/fashion_mnist/results.md"]


def test_reproduce_dry_run_with_gpus_uses_torchrun(tmp_path: Path) -> None:
    result = run_script("reproduce.sh", "--dry-run", "--runs-dir", str(tmp_path / "runs"), "configs/fashion_mnist",
                        env={"GPUS": "16"})
    argvs = commands(result)
    e2e, pipelined = argvs[0], argvs[1:5]
    assert "run.mode=sequential" in e2e  # K=1 has nothing to pipeline
    for argv in pipelined:
        assert argv[:6] == ["torchrun", "--standalone", "--nproc-per-node", "16", "-m", "pipeline.train"]
        assert "run.mode=pipeline" in argv
    few = commands(run_script("reproduce.sh", "--dry-run", "configs/fashion_mnist", env={"GPUS": "8"}))
    assert all(argv[0] != "torchrun" for argv in few), "K=16 rows need 16 GPUs, else sequential"


def test_reproduce_skip_done_and_unknown_table(tmp_path: Path) -> None:
    done = tmp_path / "runs" / "greedy_sl"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    result = run_script("reproduce.sh", "--dry-run", "--skip-done", "--runs-dir", str(tmp_path / "runs"),
                        "configs/fashion_mnist", env={"GPUS": "0"})
    configs = [argv[argv.index("--config") + 1] for argv in commands(result) if "--config" in argv]
    assert "configs/fashion_mnist/greedy_sl.toml" not in configs and len(configs) == 4
    interrupted = tmp_path / "runs" / "e2e" / "checkpoints" / "step_8"
    interrupted.mkdir(parents=True)
    (interrupted / "COMPLETE").write_text("{}")
    again = commands(run_script("reproduce.sh", "--dry-run", "--skip-done", "--runs-dir", str(tmp_path / "runs"),
                                "configs/fashion_mnist", env={"GPUS": "0"}))
    resumed = [argv for argv in again if f"run.resume={tmp_path / 'runs' / 'e2e'}" in argv]
    assert len(resumed) == 1 and "configs/fashion_mnist/e2e.toml" in resumed[0]
    (tmp_path / "runs" / "contsup_e").mkdir()
    (tmp_path / "runs" / "contsup_e" / "metrics.jsonl").write_text("")  # stopped before its first checkpoint
    third = commands(run_script("reproduce.sh", "--dry-run", "--skip-done", "--runs-dir", str(tmp_path / "runs"),
                                "configs/fashion_mnist", env={"GPUS": "0"}))
    over = [argv for argv in third if "run.overwrite=true" in argv]
    assert len(over) == 1 and "configs/fashion_mnist/contsup_e.toml" in over[0]
    unknown = run_script("reproduce.sh", "--dry-run", "no_such_table")
    assert unknown.returncode == 2 and "cifar10_resnet32" in unknown.stderr


def test_reproduce_knows_every_published_table() -> None:
    for table in sorted(path.name for path in PUBLISHED_DIR.iterdir() if path.is_dir()):
        result = run_script("reproduce.sh", "--dry-run", table, env={"GPUS": "0"})
        argvs = commands(result)
        assert argvs[-1][3:6] == ["collect", f"configs/published/{table}", f"runs/published/{table}"]
        assert len(argvs) - 1 == len([p for p in (PUBLISHED_DIR / table).glob("*.toml") if p.name != "base.toml"])


# ------------------------------------------------------------------- option order and quoting

LAUNCHERS = {  # script -> (CONFIG or TABLE argument, environment it needs)
    "single_node.sh": ("configs/quickstart.toml", {}),
    "multi_node.sh": ("configs/quickstart.toml", {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0"}),
    "slurm.sbatch": ("configs/quickstart.toml", slurm_env()),
}


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("order", ["options-first", "options-last", "mixed"])
def test_options_work_wherever_they_appear(tmp_path: Path, fake_bin: Path, name: str, order: str) -> None:
    config, env = LAUNCHERS[name]
    overrides = ["--set", "train.epochs=2", "--set=data.root=/data sets/x"]
    options = ["--dry-run", "--mode", "pipeline"]
    argv = {"options-first": [*options, config, *overrides],
            "options-last": [config, *overrides, *options],
            "mixed": [overrides[0], overrides[1], "--mode=pipeline", config, "--dry-run", overrides[2]]}[order]
    result = run_script(name, *argv, env={**env, **path_with(fake_bin)})
    (printed,) = commands(result)
    assert printed[printed.index("-m"):] == ["-m", "pipeline.train", "--config", config, "--set", "run.mode=pipeline",
                                             "--set", "train.epochs=2", "--set=data.root=/data sets/x"]
    assert not (tmp_path / "torchrun.argv").exists() and not (tmp_path / "srun.argv").exists(), \
        "--dry-run after CONFIG must not start the job"


def test_an_option_like_override_value_stays_a_value(tmp_path: Path, fake_bin: Path) -> None:
    # "--set X" takes X whatever it looks like; only what follows is read as an option again.
    result = run_script("single_node.sh", "configs/quickstart.toml", "--set", "data.root=--dry-run", "--nproc", "4",
                        env=path_with(fake_bin))
    (printed,) = commands(result)
    ran = (tmp_path / "torchrun.argv").read_text().splitlines()
    assert ran[1:] == printed[1:] and printed[-2:] == ["--set", "data.root=--dry-run"]


def test_after_double_dash_everything_goes_to_train(fake_bin: Path) -> None:
    result = run_script("single_node.sh", "--dry-run", "configs/quickstart.toml", "--", "--set", "run.seed=3")
    (printed,) = commands(result)
    assert printed[-2:] == ["--set", "run.seed=3"]


@pytest.mark.parametrize("args, needle", [
    (["configs/quickstart.toml", "--bogus"], "unknown option --bogus"),
    (["configs/quickstart.toml", "train.epochs=2"], "one CONFIG expected"),
    (["configs/quickstart.toml", "--mode"], "--mode needs a value"),
    (["configs/quickstart.toml", "--mode=dp"], "--mode must be pipeline or ddp (got 'dp')"),
], ids=["unknown-option", "bare-override", "missing-value", "bad-mode"])
def test_bad_launcher_arguments_end_with_one_error_line(tmp_path: Path, fake_bin: Path, args: list[str],
                                                        needle: str) -> None:
    result = run_script("single_node.sh", *args, env=path_with(fake_bin))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last and "Traceback" not in result.stderr
    assert not (tmp_path / "torchrun.argv").exists()


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("mode, overrides, needle", [
    ("ddp", ["--nproc", "2"], "run.mode = 'ddp' trains end to end"),  # quickstart has K = 4
    ("pipeline", ["--set", "local.context=R9"], "local.context"),
], ids=["ddp-with-k4", "bad-override"])
def test_a_bad_config_stops_before_torchrun_with_one_line(tmp_path: Path, fake_bin: Path, name: str, mode: str,
                                                           overrides: list[str], needle: str) -> None:
    config, env = LAUNCHERS[name]
    if name != "single_node.sh" and overrides[0] == "--nproc":
        env = {**env, "NPROC": "2"}
        overrides = []
    result = run_script(name, "--mode", mode, config, *overrides, env={**env, **path_with(fake_bin)})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "torchrun.argv").exists() and not (tmp_path / "srun.argv").exists()


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("3", "3")], ids=["unset", "kept"])
def test_torchrun_gets_omp_num_threads_so_it_prints_no_banner(tmp_path: Path, fake_bin: Path, preset: str | None,
                                                               expected: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env.update(PYTHON=sys.executable, **path_with(fake_bin), **({"OMP_NUM_THREADS": preset} if preset else {}))
    for name, (config, extra) in LAUNCHERS.items():
        done = subprocess.run(["bash", str(LAUNCH / name), config], cwd=REPO, env={**env, **extra},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        tool = "srun" if name == "slurm.sbatch" else "torchrun"
        assert (tmp_path / f"{tool}.omp").read_text() == expected, name


def test_quickstart_and_reproduce_take_options_anywhere(tmp_path: Path) -> None:
    recorder = tmp_path / "python"
    recorder.write_text(f'#!/usr/bin/env bash\ntouch "{tmp_path}/ran"\n')
    recorder.chmod(0o755)
    result = run_script("quickstart.sh", "--set", "train.max_steps=5", "--dry-run", env={"PYTHON": str(recorder)})
    (argv,) = commands(result)
    assert argv[-2:] == ["--set", "train.max_steps=5"] and not (tmp_path / "ran").exists()
    positional = run_script("quickstart.sh", "configs/other.toml", "--dry-run")
    assert positional.returncode == 2 and "--set" in positional.stderr
    late = run_script("reproduce.sh", "fashion_mnist", "--set", "train.max_steps=3", "--dry-run",
                      "--runs-dir", str(tmp_path / "r"), "--mode=sequential", env={"GPUS": "16"})
    argvs = commands(late)
    assert len(argvs) == 6 and all("run.mode=sequential" in argv for argv in argvs[:5])
    assert f"run.out_dir={tmp_path}/r/e2e" in argvs[0]


SHELLCHECK = shutil.which("shellcheck")


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (apt-get install -y shellcheck)")
def test_shellcheck_is_clean() -> None:
    files = [str(LAUNCH / name) for name in (*SCRIPTS, "lib.sh")]
    result = subprocess.run([SHELLCHECK, "--external-sources", *files], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reproduce_counts_gpus_as_torch_does(tmp_path: Path) -> None:
    """nvidia-smi lists every GPU of the node; CUDA_VISIBLE_DEVICES hides them from torch, and so from the script."""
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text('#!/usr/bin/env bash\nfor i in $(seq 0 15); do echo "GPU $i: H100"; done\n')
    smi.chmod(0o755)
    result = run_script("reproduce.sh", "--dry-run", "configs/fashion_mnist",
                        env={**path_with(folder), "CUDA_VISIBLE_DEVICES": ""})
    assert "0 GPU(s)" in result.stdout
    assert all(argv[0] != "torchrun" for argv in commands(result)), "no GPU visible to torch: sequential rows"


def test_single_node_runs_k_by_r_as_the_readme_says() -> None:
    """--nproc 4 with K = 2: two replicas of the 2-module chain (pipeline.replicas = 0: WORLD_SIZE / K)."""
    result = run_script("single_node.sh", "--dry-run", "configs/quickstart.toml", "--nproc", "4",
                        "--set", "local.modules=2")
    assert result.returncode == 0, result.stderr
    (argv,) = commands(result)
    assert argv[argv.index("--nproc-per-node") + 1] == "4"
    replicas = run_script("single_node.sh", "--dry-run", "configs/quickstart.toml", "--set", "local.modules=2",
                          "--set", "pipeline.replicas=3")
    (argv,) = commands(replicas)
    assert argv[argv.index("--nproc-per-node") + 1] == "6"  # K x R without --nproc
    wrong = run_script("single_node.sh", "--dry-run", "configs/quickstart.toml", "--nproc", "4",
                       "--set", "local.modules=2", "--set", "pipeline.replicas=3")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == ("error: pipeline mode runs one process per module of each replica (K x R): 4 "
                                    "processes but local.modules x pipeline.replicas = 2 x 3; set --nproc")


def test_multi_node_splits_k_by_r_over_the_nodes() -> None:
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "n0"}
    result = run_script("multi_node.sh", "--dry-run", "configs/quickstart.toml", "--set", "pipeline.replicas=2",
                        env=env)
    (argv,) = commands(result)
    assert argv[argv.index("--nproc-per-node") + 1] == "4"  # K = 4 x R = 2 over 2 nodes
    uneven = run_script("multi_node.sh", "--dry-run", "configs/quickstart.toml", env={**env, "NPROC": "3"})
    assert uneven.returncode == 2 and "6 processes is not a multiple of local.modules = 4" in uneven.stderr


# What torch 2.13's torchrun printed on stderr for a job whose processes failed (abridged: the
# traceback's middle frames and the second failure are left out).
TORCHRUN_FAILURE = """\
error: WORLD_SIZE is 2, not a multiple of local.modules = 4 (traceback: runs/x/errors/rank_0.log)
W1207 02:22:39.863000 21765 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process \
21817 closing signal SIGTERM
E1207 02:22:39.896000 21765 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: \
2) local_rank: 0 (pid: 21816) of binary: /usr/bin/python3
Traceback (most recent call last):
  File "/usr/lib/python3/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
pipeline.train FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  exitcode  : 2 (pid: 21816)
  traceback : error: WORLD_SIZE is 2, not a multiple of local.modules = 4 (traceback: runs/x/errors/rank_0.log)
============================================================
"""


def test_a_failed_job_ends_with_its_cause_and_keeps_torchruns_report_in_a_file(tmp_path: Path) -> None:
    env = scripted_torchrun(tmp_path, "[stage 0] module 0 of 4\n", TORCHRUN_FAILURE, 1)
    out = tmp_path / "run"
    result = run_script("single_node.sh", "configs/quickstart.toml", "--set", f"run.out_dir={out}", env=env)
    assert result.returncode == 1
    assert "[stage 0] module 0 of 4" in result.stdout  # the job's own output passes as it comes
    report = out / "errors" / "torchrun.log"
    lines = result.stderr.strip().splitlines()
    assert lines[-2:] == [f"torchrun's report: {report}",
                          "error: WORLD_SIZE is 2, not a multiple of local.modules = 4 (traceback: "
                          "runs/x/errors/rank_0.log)"]
    assert "Traceback" not in result.stderr and "ChildFailedError" in report.read_text()
    assert report.read_text().startswith("W1207 ") and "Root Cause" in report.read_text()


def test_a_job_restarted_after_a_failure_that_then_succeeds_names_no_stale_cause(tmp_path: Path) -> None:
    """torchrun's failure lines come on every failed attempt; only its ChildFailedError ends the job."""
    first_attempt = TORCHRUN_FAILURE.split("Traceback")[0]  # what a restarted attempt leaves: no final report
    env = scripted_torchrun(tmp_path, "[stage 0] done\n", first_attempt, 0)
    out = tmp_path / "run"
    result = run_script("single_node.sh", "configs/quickstart.toml", "--set", f"run.out_dir={out}", env=env)
    assert result.returncode == 0
    report = out / "errors" / "torchrun.log"
    assert result.stderr.strip().splitlines()[-1] == (
        f"torchrun restarted the job after a failure; its report: {report}")
    assert "failed (exitcode: 2)" in report.read_text()


def test_a_job_that_succeeds_keeps_torchruns_warnings_on_the_terminal(tmp_path: Path) -> None:
    warning = ("W1207 02:22:39.863000 21765 site-packages/torch/distributed/elastic/rendezvous/"
               "dynamic_rendezvous.py:1000] The node 'n0' has already been assigned")
    env = scripted_torchrun(tmp_path, "", f"{warning}\nwarning: a key has no effect\n", 0)
    result = run_script("single_node.sh", "configs/quickstart.toml", "--set", f"run.out_dir={tmp_path / 'run'}",
                        env=env)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [warning, "warning: a key has no effect"]
    assert not (tmp_path / "run" / "errors").exists()
