"""pipeline.checkpoint: per-module files, exact resume, and one-line errors for bad resumes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline import checkpoint
from pipeline.data.specs import dataset_spec
from pipeline.errors import BadInput
from pipeline.model.network import make_layout, resolve_cuts
from pipeline.runners.loop import Position
from pipeline.runners.run import run
from pipeline.worker import make_worker

CPU = torch.device("cpu")
# 1024 synthetic samples / 128 = 8 batches per epoch: 6 steps stop inside epoch 1, 12 end in epoch 2.
RESUME = ("local.modules=2", "local.context=R1", "data.batch_size=128", "train.epochs=2",
          "train.warmup_epochs=1", "run.log_every=4")


def tensors_equal(a, b, where="") -> None:
    """Every tensor of two nested states is exactly equal; every other value too."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            tensors_equal(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, config_builder):
    """A run stopped by max_steps after 6 of epoch 1's 8 batches."""
    out = tmp_path_factory.mktemp("ckpt") / "six"
    run(config_builder(*RESUME, "train.max_steps=6", out_dir=out))
    return out


def test_files_load_with_weights_only(six_steps):
    for module in range(2):
        payload = torch.load(checkpoint.checkpoint_path(six_steps, module), weights_only=True)
        assert payload["module_index"] == module
        assert payload["position"] == {"epoch": 1, "batch": 6, "step": 6}
        assert payload["identity"]["modules"] == 2 and payload["identity"]["context"] == "R1"
        state = payload["state"]
        assert any(key.startswith("body.") for key in state["module"])
        assert any(key.startswith("head.") for key in state["module"])
        assert state["optimizer"]["state"], "momentum buffers are saved"
    assert any(key.startswith("input_encoders.") for key in
               torch.load(checkpoint.checkpoint_path(six_steps, 1), weights_only=True)["state"]["module"])
    leftovers = [p.name for p in (six_steps / "checkpoints").iterdir() if p.suffix != ".pt"]
    assert leftovers == []  # the temporary files were renamed away


def test_resume_equals_a_straight_run(six_steps, make_config, tmp_path):
    resumed = run(make_config(*RESUME, "train.max_steps=12", f"run.resume='{six_steps}'",
                                         out_dir=tmp_path / "resumed"))
    straight = run(make_config(*RESUME, "train.max_steps=12", out_dir=tmp_path / "straight"))
    assert resumed["steps"] == straight["steps"] == 12
    assert resumed["epochs"] == straight["epochs"] == 1
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    for module in range(2):
        a = torch.load(checkpoint.checkpoint_path(tmp_path / "resumed", module), weights_only=True)
        b = torch.load(checkpoint.checkpoint_path(tmp_path / "straight", module), weights_only=True)
        assert a["position"] == b["position"] == {"epoch": 2, "batch": 4, "step": 12}
        tensors_equal(a["state"], b["state"], f"module {module}")  # weights, BN statistics and momentum
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    logged = sorted({line["step"] for line in lines if line.get("event") == "train"})
    assert logged == [8, 12]  # step numbers continue from the saved step (log_every = 4)


@pytest.mark.parametrize("override, key", [("local.aux=0c1f", "aux"), ("data.batch_size=64", "batch_size"),
                                           ("run.seed=1", "seed"), ("local.context=E", "context")])
def test_resume_with_another_config_names_the_key(six_steps, make_config, tmp_path, override, key):
    config = make_config(*RESUME, override, f"run.resume='{six_steps}'", out_dir=tmp_path / "other")
    with pytest.raises(BadInput) as info:
        run(config)
    message = str(info.value)
    assert "run.resume" in message and f"{key} =" in message and "module_0.pt" in message
    assert not (tmp_path / "other" / "checkpoints").exists()  # nothing trained, nothing written


def test_corrupt_checkpoint_is_bad_input(six_steps, make_config, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(six_steps, broken)
    (broken / "checkpoints" / "module_1.pt").write_bytes(b"\x80\x02 not a checkpoint at all")
    with pytest.raises(BadInput) as info:
        run(make_config(*RESUME, f"run.resume='{broken}'", out_dir=tmp_path / "again"))
    assert "module_1.pt" in str(info.value) and "not a readable checkpoint" in str(info.value)


def test_foreign_file_and_missing_checkpoint(six_steps, make_config, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(six_steps, foreign)
    torch.save({"weights": torch.zeros(2)}, foreign / "checkpoints" / "module_0.pt")
    with pytest.raises(BadInput, match="not a checkpoint of this trainer"):
        run(make_config(*RESUME, f"run.resume='{foreign}'", out_dir=tmp_path / "x"))
    with pytest.raises(BadInput, match="no checkpoint"):
        run(make_config(*RESUME, f"run.resume='{tmp_path / 'nowhere'}'", out_dir=tmp_path / "y"))


def test_save_then_load_restores_a_worker(make_config, tmp_path, image_batch):
    from pipeline.packet import Packet

    config = make_config("local.modules=2", "local.context=E", "local.reconstruct=true")
    spec = dataset_spec(config)
    cuts = resolve_cuts(config, spec, CPU)
    layout = make_layout(config, spec, cuts)
    workers = [make_worker(config, layout, index, CPU) for index in range(2)]
    images, labels = image_batch(spec, batch=8)
    packet = Packet.from_batch(images, labels)
    for worker in workers:
        packet, _ = worker.train_step(packet)
    identity = checkpoint.identity_of(config, cuts)
    for worker in workers:
        path = checkpoint.save(tmp_path, worker, Position(3, 1, 17), identity)
        assert path == tmp_path / "checkpoints" / f"module_{worker.index}.pt"
    fresh = [make_worker(config, layout, index, CPU) for index in range(2)]
    for worker, original in zip(fresh, workers):
        assert checkpoint.load(tmp_path, worker, identity) == Position(3, 1, 17)
        tensors_equal(worker.state_dict(), original.state_dict())
    with pytest.raises(BadInput, match="cuts"):
        checkpoint.load(tmp_path, fresh[0], {**identity, "cuts": [2]})


# ---- files that load with weights_only but are not what save wrote -----------------------------------


@pytest.fixture
def saved(make_config, tmp_path):
    """(worker of module 0, identity, path of the checkpoint save wrote for it)."""
    config = make_config("local.modules=2")
    spec = dataset_spec(config)
    cuts = resolve_cuts(config, spec, CPU)
    worker = make_worker(config, make_layout(config, spec, cuts), 0, CPU)
    identity = checkpoint.identity_of(config, cuts)
    return worker, identity, checkpoint.save(tmp_path, worker, Position(1, 2, 2), identity)


def rewrite(path, change) -> None:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def one_line_bad_input(path, worker, identity) -> str:
    with pytest.raises(BadInput) as info:
        checkpoint.load(path.parents[1], worker, identity)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and message.startswith("run.resume: ")
    return message


@pytest.mark.parametrize("change, needle", [
    (lambda p: p.update(identity=["resnet8"]), "identity is a list"),
    (lambda p: p.pop("position"), "missing keys ['position']"),
    (lambda p: p.update(note="hand edited"), "unexpected keys ['note']"),
    (lambda p: p.update(position={"epoch": 1.5, "batch": 0, "step": 0}), "position = "),
    (lambda p: p.update(position={"epoch": 1, "batch": 0}), "position = "),
    (lambda p: p.update(position={"epoch": 1, "batch": -2, "step": 0}), "position = "),
    (lambda p: p.update(position=[1, 0, 0]), "position = "),
    (lambda p: p.update(state=[torch.zeros(1)]), "state is not a table"),
    (lambda p: p.update(state={"module": p["state"]["module"]}), "state is not a table"),
    (lambda p: p.update(module_index=1), "module_index = 1"),
], ids=["identity-list", "missing-key", "extra-key", "position-float", "position-short", "position-negative",
        "position-list", "state-list", "state-no-optimizer", "module-index"])
def test_a_checkpoint_of_the_wrong_structure_is_bad_input(saved, change, needle):
    worker, identity, path = saved
    assert checkpoint.load(path.parents[1], worker, identity) == Position(1, 2, 2)  # intact, it loads
    rewrite(path, change)
    assert needle in one_line_bad_input(path, worker, identity)


def test_a_state_that_does_not_fit_is_one_line(saved):
    worker, identity, path = saved
    rewrite(path, lambda p: [p["state"]["module"].pop(key) for key in list(p["state"]["module"])[:3]])
    message = one_line_bad_input(path, worker, identity)
    assert "does not fit module 0" in message and "Missing key(s)" in message


class NotAllowed:
    """A class weights_only refuses to rebuild."""

    def __init__(self) -> None:
        self.value = 3


def test_a_refused_object_gives_the_first_line_of_torchs_text(saved):
    worker, identity, path = saved
    rewrite(path, lambda p: p["identity"].update(extra=NotAllowed()))
    with pytest.raises(BadInput) as info:
        checkpoint.load(path.parent.parent, worker, identity)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "not a readable checkpoint" in message
    assert "Weights only load failed" in message and "test_checkpoint.NotAllowed" in message
    assert "\x1b" not in message  # no terminal colour codes
    cause = info.value.__cause__
    assert cause is not None and "\n" in str(cause)  # the full text is kept for a log
