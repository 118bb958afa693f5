"""pipeline.evaluate: a run's or an exported model's test scores equal the run's summary.json figures
exactly (accuracy; mIoU, per-class IoU and pixel accuracy), and a config that does not fit is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trained_runs import NETWORKS, TrainedRun, exported, small_synthetic, trained_run

from pipeline.tools.evaluate import evaluate, load_for_evaluation, main

SCORES = ("test_accuracy", "test_miou", "test_iou")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["contsup_r1e", "infopro_resnet50", "deeplab"])
def test_a_runs_scores_equal_its_summary(name: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    trained: TrainedRun = trained_run(tmp_path_factory, name)
    for source in (trained.out_dir, exported(tmp_path_factory, name)):
        scores = evaluate(*load_for_evaluation(source))
        assert scores.keys() <= set(SCORES)
        for key in scores:
            assert scores[key] == trained.summary[key], (source, key)
    if name == "deeplab":
        assert len(scores["test_iou"]) == 3 and scores["test_miou"] is not None


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_any_networks_scores_equal_its_summary(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    trained = trained_run(tmp_path_factory, name)
    expected = {"test_accuracy": trained.summary["test_accuracy"]}
    with small_synthetic():
        for source in (trained.out_dir, exported(tmp_path_factory, name)):
            assert evaluate(*load_for_evaluation(source)) == expected, source
        # channels_last is a layout of the image and of maps: the tokens and vectors stay as they are
        assert evaluate(*load_for_evaluation(trained.out_dir, overrides=["precision.channels_last=true"])) == expected


def test_the_cli_prints_the_scores(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    trained = trained_run(tmp_path_factory, "deeplab")
    model = exported(tmp_path_factory, "deeplab")
    capsys.readouterr()  # what training the shared run printed, when this test is the first to need it
    assert main([str(model)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "test mIoU" in lines[0] and lines[1].startswith("per-class IoU: ")
    assert json.loads(lines[-1]) == {key: trained.summary[key] for key in SCORES}


def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_a_config_that_does_not_match_the_export_is_one_line(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    model = str(exported(tmp_path_factory, "contsup_r1e"))
    one_line_exit_2(capsys, [model, "--set", "local.context=R0"], "the config gives context = 'R0' but")
    one_line_exit_2(capsys, [model, "--set", "model.classes=7"],
                    "synthetic's test split has 7 classes of 3-channel images, but the network takes 3 channels and "
                    "predicts 10 classes")
    toml = tmp_path / "other.toml"
    toml.write_text('[data]\nname = "cifar10"\n[model]\narch = "resnet8"\n[local]\nmodules = 4\ncontext = "R1E"\n')
    one_line_exit_2(capsys, [model, "--config", str(toml)], "the config gives dataset = 'cifar10' but")
    one_line_exit_2(capsys, [str(tmp_path / "other.toml")], "is not readable")
    one_line_exit_2(capsys, [str(tmp_path / "missing.pt")], "is not a file")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    one_line_exit_2(capsys, [str(tmp_path / "foreign.pt")], "is not a model file of this trainer")


def test_a_folder_test_split_of_other_classes_is_one_line(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.data.throughput import write_folder

    model = str(exported(tmp_path_factory, "infopro_resnet50"))
    write_folder(tmp_path / "five", 10, 5, size=(40, 36))
    one_line_exit_2(capsys, [model, "--set", f"data.root='{tmp_path / 'five'}'"],
                    "test split has 5 classes of 3-channel images, but the network takes 3 channels and predicts 3")
