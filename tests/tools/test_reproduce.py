"""pipeline.reproduce: published figures, row discovery, and the table built from summary.json files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline.config.loading import load_config
from pipeline.errors import BadInput
from pipeline.tools.reproduce import PUBLISHED, TABLE_METRIC, collect, main, table_rows
from tests.model.networks.user_networks import MAPS_THEN_VECTORS

REPO = Path(__file__).resolve().parents[2]
PUBLISHED_DIR = REPO / "configs" / "published"
FASHION = REPO / "configs" / "fashion_mnist"


def write_summary(folder: Path, config_path: Path, accuracy: float | None, peak: int = 2**30,
                  **overrides: Any) -> Path:
    """A summary.json shaped like pipeline.runtime.metrics.write_summary's, for the given row config."""
    config = load_config(config_path, [f"{key}={value}" for key, value in overrides.items()])
    summary = {
        "mode": config.run.mode, "world_size": 1, "modules": config.local.modules, "method": "x",
        "context": config.local.context, "loss": config.local.loss, "dataset": config.data.name,
        "steps": 10, "epochs": config.train.epochs, "test_accuracy": accuracy,
        "train_samples_per_s": 100.0, "wall_s": 1.0, "cut_points": [],
        "stages": [{"rank": 0, "module": "all", "peak_mem_bytes": peak}, {"rank": 1, "module": 1, "peak_mem_bytes": 5}],
        "config": config.to_dict(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_text(json.dumps(summary))
    return path


def table_cells(text: str) -> dict[str, list[str]]:
    """{row label: every cell after the label} of the Markdown table in text, plus 'header'."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows["header" if cells[0] == "method" else cells[0]] = cells[1:]
    return rows


def table_lines(text: str) -> dict[str, list[str]]:
    """{row label: the K cells} of the Markdown table in text, plus 'header' (after recipe and source)."""
    return {label: cells[2:] for label, cells in table_cells(text).items()}


# ------------------------------------------------------------------------------ published figures


def test_published_numbers_match_reference() -> None:
    assert PUBLISHED["cifar10_resnet32"]["e2e"] == {1: 7.37}
    assert PUBLISHED["cifar10_resnet32"]["infopro_contrast"] == {2: 7.76, 4: 8.58, 8: 11.13, 16: 12.75}
    assert PUBLISHED["cifar10_resnet110"]["greedy_sl"] == {2: 8.21, 4: 13.16, 8: 15.61, 16: 18.92}
    assert PUBLISHED["cifar10_resnet110"]["infopro_contrast_async"] == {2: 7.34, 4: 8.39}
    assert PUBLISHED["svhn_resnet110"]["infopro_contrast"][16] == 3.91
    assert PUBLISHED["stl10_resnet110"]["e2e"] == {1: 22.27}
    assert PUBLISHED["memory_cifar10_resnet110"]["infopro_star"] == {2: 5.38, 3: 4.22, 4: 3.52}
    assert PUBLISHED["memory_stl10_resnet110"] == {"e2e": {1: 10.77}, "infopro_star": {4: 4.08}}
    assert PUBLISHED["imagenet"] == {"resnet101_infopro": {2: 21.85}, "resnet152_infopro": {2: 21.45},
                                     "resnext101_32x8d_infopro": {2: 20.35}}
    assert PUBLISHED["cityscapes"] == {"e2e": {1: 79.12}, "infopro": {2: 79.37}, "infopro_batch12": {2: 79.99},
                                       "infopro_crop640": {2: 80.25}}


def test_every_published_figure_has_a_row_config() -> None:
    for table, methods in PUBLISHED.items():
        for method, by_k in methods.items():
            for k in by_k:
                name = "e2e" if method == "e2e" else f"{method}_k{k}"
                path = PUBLISHED_DIR / table / f"{name}.toml"
                assert path.is_file(), f"{table}/{method}/K={k} has no config {path}"
                assert load_config(path).local.modules == k
    assert set(TABLE_METRIC) <= {path.name for path in PUBLISHED_DIR.iterdir()}



def test_cityscapes_table_shows_miou(tmp_path: Path) -> None:
    table = PUBLISHED_DIR / "cityscapes"
    runs = tmp_path / "runs"
    path = write_summary(runs / "infopro_k2", table / "infopro_k2.toml", 0.95)
    summary = json.loads(path.read_text())
    path.write_text(json.dumps({**summary, "test_miou": 0.7891, "test_iou": [0.7891]}))
    text, warnings = collect(table, runs)
    assert warnings == [] and text.startswith("### cityscapes: test mIoU %")
    rows = table_lines(text)
    assert rows["header"] == ["K=1", "K=2"]
    assert rows["InfoPro*"] == ["", "78.91 / 79.37"]
    assert rows["E2E"] == ["not run / 79.12", ""]
    assert rows["InfoPro*, batch 12"] == ["", "not run / 79.99"]
    assert rows["InfoPro*, 640 x 1280 crops"] == ["", "not run / 80.25"]

def test_rows_of_a_table_in_table_order() -> None:
    rows = table_rows(PUBLISHED_DIR / "cifar10_resnet32")
    assert [row.name for row in rows[:3]] == ["e2e", "greedy_sl_k2", "greedy_sl_k4"]
    assert {row.method for row in rows} == {"e2e", "greedy_sl", "dgl", "infopro_softmax", "infopro_contrast",
                                            "contsup_e", "contsup_r1", "contsup_r1e",
                                            "contsup_e_contrast", "contsup_r1e_contrast"}
    assert len(rows) == 1 + 9 * 4
    assert all("base" not in row.name for row in rows)


# ------------------------------------------------------------------------------ collect


def test_collect_builds_the_table_from_summaries(tmp_path: Path) -> None:
    table = PUBLISHED_DIR / "cifar10_resnet32"
    runs = tmp_path / "runs"
    write_summary(runs / "e2e", table / "e2e.toml", 0.925)
    write_summary(runs / "infopro_contrast_k4" / "seed0", table / "infopro_contrast_k4.toml", 0.91)
    write_summary(runs / "infopro_contrast_k4" / "seed1", table / "infopro_contrast_k4.toml", 0.93)
    write_summary(runs / "contsup_r1e_k16", table / "contsup_r1e_k16.toml", 0.9)
    text, warnings = collect(table, runs)
    assert warnings == []
    assert text.startswith("### cifar10_resnet32: test error %")
    rows = table_lines(text)
    assert rows["header"] == ["K=1", "K=2", "K=4", "K=8", "K=16"]
    assert rows["E2E"] == ["7.50 / 7.37", "", "", "", ""]
    assert rows["InfoPro contrast"][2] == "8.00 ± 1.41 (n=2) / 8.58"
    assert rows["InfoPro contrast"][1] == "not run / 7.76"
    assert rows["Greedy SL"] == ["", "not run / 10.30", "not run / 16.07", "not run / 21.19", "not run / 24.59"]
    assert rows["ContSup R1E"][4] == "10.00 / –"
    assert list(rows)[1:] == ["E2E", "Greedy SL", "DGL", "InfoPro softmax", "InfoPro contrast",
                              "ContSup E", "ContSup R1", "ContSup R1E", "ContSup E, contrast", "ContSup R1E, contrast"]
    assert "†" not in text
    # every row says which recipe it trained with and whose runs that recipe follows
    cells = table_cells(text)
    assert cells["header"][:2] == ["recipe", "source"]
    assert cells["ContSup R1E"][:2] == ["softmax, 1c2f, no decoder; batch 1024, lr 0.8, 160 epochs",
                                        "ContSup authors' command (Tables 1, 2, Fig. 5)"]
    assert cells["ContSup E, contrast"][:2] == ["contrast, 1c2f, no decoder; batch 1024, lr 0.8, 160 epochs",
                                                "ContSup authors' command (Table 2, Fig. 5)"]
    assert cells["InfoPro contrast"][:2] == ["contrast, 1c2f, decoder; batch 1024, lr 0.8, 160 epochs",
                                             "InfoPro paper and code"]
    assert cells["Greedy SL"][0] == "softmax, 0c1f, no decoder; batch 1024, lr 0.8, 160 epochs"
    assert cells["E2E"][0] == "end to end; batch 1024, lr 0.8, 160 epochs"


def test_the_recipe_names_the_heads_each_network_trains_with(tmp_path: Path) -> None:
    """A ViT's modules end in tokens (token heads), a VGG's in maps (local.aux); a factory's balanced cuts may end a
    module at any block but the last: its maps (local.aux) or its vectors (a vector head)."""
    table, runs = tmp_path / "table", tmp_path / "runs"
    table.mkdir()
    (table / "base.toml").write_text((FASHION / "base.toml").read_text())
    rows = {"vit_k4": ("vit_tiny", 4, 'context = "R1E"'), "vgg_k2": ("vgg11_bn", 2, ""),
            "factory_k3": (MAPS_THEN_VECTORS, 3, 'partition = "balanced-time"')}
    for name, (arch, modules, local) in rows.items():
        (table / f"{name}.toml").write_text(f'base = "base.toml"\n[model]\narch = "{arch}"\n[local]\n'
                                           f"modules = {modules}\n{local}\n")
        write_summary(runs / name, table / f"{name}.toml", 0.5)
    text, warnings = collect(table, runs)
    assert warnings == []
    recipe = "; batch 128, lr 0.1, 1 epochs"
    cells = table_cells(text)
    assert cells["vit"][0] == "softmax, token head, no decoder" + recipe
    assert cells["vgg"][0] == "softmax, 1c2f, no decoder" + recipe
    assert cells["factory"][0] == "softmax, 1c2f / vector head, no decoder" + recipe


def test_collect_marks_contsup_rows_without_an_authors_command(tmp_path: Path) -> None:
    table = PUBLISHED_DIR / "cifar10_resnet110"
    write_summary(tmp_path / "contsup_e_k4", table / "contsup_e_k4.toml", 0.9)
    cells = table_cells(collect(table, tmp_path)[0])
    assert cells["ContSup E"][:2] == ["contrast, 1c2f, decoder; batch 1024, lr 0.8, 160 epochs",
                                      "this project's variant (no ContSup command)"]
    assert cells["ContSup R1E"][1] == "ContSup authors' command (Table 3)"


def test_collect_on_the_contsup_ablation_table(tmp_path: Path) -> None:
    table = PUBLISHED_DIR / "contsup_ablation_cifar10_resnet32"
    write_summary(tmp_path / "contsup_r1e_decoder_k8", table / "contsup_r1e_decoder_k8.toml", 0.88)
    cells = table_cells(collect(table, tmp_path)[0])
    assert cells["header"] == ["recipe", "source", "K=2", "K=4", "K=8", "K=16"]
    assert cells["ContSup R1E, decoder"] == ["softmax, 1c2f, decoder; batch 1024, lr 0.8, 160 epochs",
                                             "ContSup authors' command (Fig. 5)", "not run / –", "not run / –",
                                             "12.00 / –", "not run / –"]
    assert cells["ContSup R7 (their R8 at K=8)"][1:] == ["ContSup authors' command (Table 4)", "", "",
                                                         "not run / –", ""]
    assert cells["ContSup R1, contrast"][0].startswith("contrast, 1c2f, no decoder")


def test_collect_on_the_fashion_mnist_set_via_the_command_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    for number, row in enumerate(("e2e", "greedy_sl", "contsup_r1e")):
        write_summary(runs / row, FASHION / f"{row}.toml", 0.90 - 0.01 * number)
    out = tmp_path / "report" / "results.md"
    assert main(["collect", str(FASHION), str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == printed
    rows = table_lines(printed)
    assert rows["header"] == ["K=1", "K=16"]
    assert table_cells(printed)["Greedy SL"][1] == "this project"
    assert rows["E2E"] == ["10.00 / –", ""]
    assert rows["Greedy SL"] == ["", "11.00 / –"]
    assert rows["ContSup R1E"] == ["", "12.00 / –"]
    assert rows["ContSup E"] == ["", "not run / –"]


def test_short_runs_are_marked_and_foreign_runs_ignored(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_summary(runs / "e2e", FASHION / "e2e.toml", 0.8, **{"train.epochs": 3})
    write_summary(runs / "greedy_sl", FASHION / "greedy_sl.toml", 0.8, **{"local.context": "R1"})
    write_summary(runs / "somebody_else", FASHION / "e2e.toml", 0.8, **{"run.out_dir": "runs/x/other"})
    text, warnings = collect(FASHION, runs)
    assert table_lines(text)["E2E"][0] == "20.00 † / –"
    assert "† trained with a different recipe" in text
    assert table_lines(text)["Greedy SL"][1] == "not run / –"
    assert len(warnings) == 2
    assert any("greedy_sl" in w and "differ" in w for w in warnings)
    assert any("somebody_else" in w and "matches no row" in w for w in warnings)


def test_rows_are_matched_by_out_dir_when_the_folder_name_differs(tmp_path: Path) -> None:
    # a folder named by date; the run's out_dir (runs/fashion_mnist/contsup_e) names the row
    write_summary(tmp_path / "runs" / "2024-01-01", FASHION / "contsup_e.toml", 0.5)
    text, _ = collect(FASHION, tmp_path / "runs")
    assert table_lines(text)["ContSup E"][1] == "50.00 / –"


def test_memory_tables_report_peak_memory(tmp_path: Path) -> None:
    table = PUBLISHED_DIR / "memory_cifar10_resnet110"
    write_summary(tmp_path / "e2e", table / "e2e.toml", 0.9, peak=9 * 2**30)
    write_summary(tmp_path / "infopro_star_k3", table / "infopro_star_k3.toml", 0.9, peak=4 * 2**30)
    text, _ = collect(table, tmp_path)
    rows = table_lines(text)
    assert "peak memory" in text
    assert rows["E2E"][0] == "9.00 / 9.40"
    assert rows["InfoPro* (memory-balanced)"] == ["", "not run / 5.38", "4.00 / 4.22", "not run / 3.52"]
    error, _ = collect(table, tmp_path, metric="error")
    assert table_lines(error)["E2E"][0] == "10.00 / –"


def test_a_run_without_test_accuracy_reads_na(tmp_path: Path) -> None:
    write_summary(tmp_path / "e2e", FASHION / "e2e.toml", None)
    text, _ = collect(FASHION, tmp_path)
    assert table_lines(text)["E2E"][0] == "n/a / –"


@pytest.mark.parametrize("case", ["no_table", "no_runs_dir", "no_summaries", "only_foreign", "broken_json", "bad_row"])
def test_bad_input(tmp_path: Path, case: str) -> None:
    table, runs = FASHION, tmp_path / "runs"
    runs.mkdir()
    if case == "no_table":
        table = tmp_path / "missing"
    elif case == "no_runs_dir":
        runs = tmp_path / "missing"
    elif case == "only_foreign":
        write_summary(runs / "unrelated", FASHION / "e2e.toml", 0.5, **{"run.out_dir": "runs/unrelated"})
    elif case == "broken_json":
        (runs / "e2e").mkdir()
        (runs / "e2e" / "summary.json").write_text("{not json")
    elif case == "bad_row":
        table = tmp_path / "table"
        table.mkdir()
        (table / "dgl_k4.toml").write_text("[local]\nmodules = 2\n")
    with pytest.raises(BadInput):
        collect(table, runs)


def test_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.reproduce", "collect", str(FASHION), str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: no summary.json")
    usage = subprocess.run([sys.executable, "-m", "pipeline.reproduce", "frobnicate"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=False)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_rows_command_lists_name_k_and_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rows", str(FASHION)]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == ["e2e", "1", str(FASHION / "e2e.toml")]
    assert {line[0] for line in lines} == {"e2e", "greedy_sl", "contsup_e", "contsup_r1", "contsup_r1e"}
