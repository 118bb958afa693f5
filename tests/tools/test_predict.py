"""pipeline.predict: classes and probabilities of image files from an exported model, the files prepared as
the run's evaluation prepared its test images; bad files and models are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trained_runs import NETWORKS, exported, trained_run

from pipeline.data.image_folder import scan
from pipeline.tools.export import read_run
from pipeline.tools.model_file import read_model
from pipeline.tools.predict import main, predict


def test_predictions_are_the_runs_evaluation_of_the_same_files(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path) -> None:
    trained = trained_run(tmp_path_factory, "infopro_resnet50")
    assert trained.images is not None
    model = exported(tmp_path_factory, "infopro_resnet50")
    files = [path.decode() for path in scan(trained.images).val.files]  # the test split, in the loader's order
    predictions = predict(model, files, top=2)
    probabilities = torch.softmax(torch.cat(trained.logits), dim=1)
    assert [prediction.image for prediction in predictions] == files
    for prediction, expected in zip(predictions, probabilities):
        best = expected.topk(2)
        assert prediction.classes == best.indices.tolist()
        assert prediction.probabilities == pytest.approx(best.values.tolist(), abs=1e-6)
        assert prediction.names == [f"class_{index:03d}" for index in prediction.classes]  # the class folders


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_any_network_predicts_what_its_checkpoints_compute(name: str, tmp_path_factory: pytest.TempPathFactory,
                                                            tmp_path: Path) -> None:
    from PIL import Image

    trained = trained_run(tmp_path_factory, name)
    model = exported(tmp_path_factory, name)
    files = [str(tmp_path / "red.png"), str(tmp_path / "grey.png")]
    Image.new("RGB", (45, 30), (200, 30, 30)).save(files[0])
    Image.new("L", (32, 32), 80).save(files[1])
    predictions = predict(model, files, top=3)
    net = read_run(trained.out_dir)[0]  # the network as the checkpoint set gives it, not the model file
    prepare = read_model(model)[1].preprocess
    with torch.no_grad():
        expected = torch.softmax(net(torch.stack([prepare(path) for path in files])), dim=1).topk(3)
    assert [prediction.image for prediction in predictions] == files
    for prediction, values, classes in zip(predictions, expected.values, expected.indices):
        assert prediction.classes == classes.tolist() and prediction.names is None
        assert prediction.probabilities == pytest.approx(values.tolist(), abs=1e-6)


def test_the_cli_prints_a_line_per_image_and_class(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = exported(tmp_path_factory, "contsup_r1e")
    from PIL import Image

    Image.new("RGB", (45, 30), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("L", (32, 32), 80).save(tmp_path / "grey.jpg")
    capsys.readouterr()  # what the run printed, if it trained just now
    assert main([str(model), "--images", str(tmp_path / "red.png"), str(tmp_path / "grey.jpg"), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    path, rank, label, probability = lines[0].split("\t")
    assert path.endswith("red.png") and rank == "1" and label.startswith("class ") and probability.endswith(" %")
    assert " " not in label.removeprefix("class ")  # the synthetic set has no class names


def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_bad_images_and_models_are_one_line(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    model = str(exported(tmp_path_factory, "contsup_r1e"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    one_line_exit_2(capsys, [model, "--images", str(tmp_path / "broken.png")], "is not an image this can read")
    one_line_exit_2(capsys, [model, "--images", str(tmp_path / "broken.png"), "--top", "0"], "--top 0")
    one_line_exit_2(capsys, [str(tmp_path / "broken.png"), "--images", str(tmp_path / "broken.png")],
                    "is not readable")
    segmentation = str(exported(tmp_path_factory, "deeplab"))
    one_line_exit_2(capsys, [segmentation, "--images", str(tmp_path / "broken.png")], "is a segmentation model")
