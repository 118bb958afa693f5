"""pipeline.runtime.checkpoint: per-module files, exact resume, and one-line errors for bad resumes."""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.data.specs import dataset_spec
from pipeline.errors import BadInput, StageFailure
from pipeline.model.network import make_layout
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime import checkpoint
from pipeline.runtime.assemble import run
from pipeline.runtime.run_order import Position
from pipeline.runtime.worker import make_worker
from pipeline.train import main
from tests.model.networks.user_networks import MAPS_THEN_VECTORS

CPU = torch.device("cpu")
# 1024 synthetic samples / 128 = 8 batches per epoch: 6 steps stop inside epoch 1, 12 end in epoch 2 (of 3: the last
# epoch, at rate 0 in the per-epoch cosine, is never reached).
RESUME = ("local.modules=2", "local.context=R1", "data.batch_size=128", "train.epochs=3",
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


@pytest.fixture(scope="module")
def twelve_steps(tmp_path_factory, config_builder):
    """The straight run that resumed and crash-resumed runs must equal: 12 steps, into epoch 2 (run once)."""
    out = tmp_path_factory.mktemp("ckpt") / "straight"
    return out, run(config_builder(*RESUME, "train.max_steps=12", out_dir=out))


@pytest.mark.slow
def test_files_load_with_weights_only(six_steps):
    for module in range(2):
        payload = torch.load(checkpoint.newest_module_file(six_steps, module), weights_only=True)
        assert payload["module_index"] == module
        assert payload["position"] == {"epoch": 1, "batch": 6, "step": 6}
        assert payload["identity"]["modules"] == 2 and payload["identity"]["context"] == "R1"
        state = payload["state"]
        assert any(key.startswith("body.") for key in state["module"])
        assert any(key.startswith("head.") for key in state["module"])
        assert state["optimizer"]["state"], "momentum buffers are saved"
    assert any(key.startswith("input_encoders.") for key in
               torch.load(checkpoint.newest_module_file(six_steps, 1), weights_only=True)["state"]["module"])
    assert [path.name for path in (six_steps / "checkpoints").iterdir()] == ["step_6"]
    files = sorted(path.name for path in (six_steps / "checkpoints" / "step_6").iterdir())
    assert files == ["COMPLETE", "module_0.pt", "module_1.pt"]  # the temporary files were renamed away
    marker = json.loads((six_steps / "checkpoints" / "step_6" / "COMPLETE").read_text())
    assert marker["step"] == 6 and marker["modules"] == [0, 1] and marker["identity"]["context"] == "R1"
    assert marker["schedule"] == {"schedule": "cosine", "lr": 0.1, "epochs": 3, "max_steps": 6, "warmup_epochs": 1,
                                  "poly_power": 0.9, "min_lr": 0.0}


@pytest.mark.slow
def test_resume_equals_a_straight_run(six_steps, twelve_steps, make_config, tmp_path, capsys):
    resumed = run(make_config(*RESUME, "train.max_steps=12", f"run.resume='{six_steps}'",
                                         out_dir=tmp_path / "resumed"))
    assert "warning" not in capsys.readouterr().err  # a larger max_steps leaves the per-epoch rates as they were
    straight_dir, straight = twelve_steps
    assert resumed["steps"] == straight["steps"] == 12
    assert resumed["epochs"] == straight["epochs"] == 1
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    for module in range(2):
        a = torch.load(checkpoint.newest_module_file(tmp_path / "resumed", module), weights_only=True)
        b = torch.load(checkpoint.newest_module_file(straight_dir, module), weights_only=True)
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
    (broken / "checkpoints" / "step_6" / "module_1.pt").write_bytes(b"\x80\x02 not a checkpoint at all")
    with pytest.raises(BadInput) as info:
        run(make_config(*RESUME, f"run.resume='{broken}'", out_dir=tmp_path / "again"))
    assert "module_1.pt" in str(info.value) and "not a readable checkpoint" in str(info.value)


def test_foreign_file_and_missing_checkpoint(six_steps, make_config, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(six_steps, foreign)
    torch.save({"weights": torch.zeros(2)}, foreign / "checkpoints" / "step_6" / "module_0.pt")
    with pytest.raises(BadInput, match="not a checkpoint of this trainer"):
        run(make_config(*RESUME, f"run.resume='{foreign}'", out_dir=tmp_path / "x"))
    with pytest.raises(BadInput, match="no complete checkpoint"):
        run(make_config(*RESUME, f"run.resume='{tmp_path / 'nowhere'}'", out_dir=tmp_path / "y"))


def test_save_then_load_restores_a_worker(make_config, tmp_path, image_batch):
    from pipeline.runtime.packet import Packet

    config = make_config("local.modules=2", "local.context=E", "local.reconstruct=true")
    spec = dataset_spec(config.data, config.model)
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
        assert path == tmp_path / "checkpoints" / "step_17" / f"module_{worker.index}.pt"
    with pytest.raises(BadInput, match="no complete checkpoint"):
        checkpoint.find_set(tmp_path)  # not complete until committed
    checkpoint.commit(tmp_path, Position(3, 1, 17), 2, identity, keep=2, config={}, schedule={})
    fresh = [make_worker(config, layout, index, CPU) for index in range(2)]
    for worker, original in zip(fresh, workers):
        assert checkpoint.load(checkpoint.find_set(tmp_path), worker, identity) == Position(3, 1, 17)
        tensors_equal(worker.state_dict(), original.state_dict())
    with pytest.raises(BadInput, match="cuts"):
        checkpoint.load(checkpoint.find_set(tmp_path), fresh[0], {**identity, "cuts": [2]})


# ---- files that load with weights_only but are not what save wrote -----------------------------------


@pytest.fixture
def saved(make_config, tmp_path):
    """(worker of module 0, identity, path of the checkpoint save wrote for it)."""
    config = make_config("local.modules=2")
    spec = dataset_spec(config.data, config.model)
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
        checkpoint.load(path.parent, worker, identity)
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
    assert checkpoint.load(path.parent, worker, identity) == Position(1, 2, 2)  # intact, it loads
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
        checkpoint.load(path.parent, worker, identity)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "not a readable checkpoint" in message
    assert "Weights only load failed" in message and "test_checkpoint.NotAllowed" in message
    assert "\x1b" not in message  # no terminal colour codes
    cause = info.value.__cause__
    assert cause is not None and "\n" in str(cause)  # the full text is kept for a log


# ---- crashes and full disks (issue 14) -----------------------------------------------------------------

CRASH = (*RESUME, "train.max_steps=12")  # saves at step 8 (epoch 1's end) and at step 12 (max_steps)


def fail_second_save_of(monkeypatch, module: int, error: BaseException) -> list[str]:
    """torch.save raises ``error`` on module ``module``'s second file; returns the names it was asked to write."""
    real, names = torch.save, []

    def save(obj, f, *args, **kwargs):
        names.append(Path(getattr(f, "name", f)).name)  # checkpoint.save passes an open file
        if sum(name.startswith(f"module_{module}.") for name in names) == 2:
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return names


def assert_equal_runs(a, b) -> None:
    for module in range(2):
        x = torch.load(checkpoint.newest_module_file(a, module), weights_only=True)
        y = torch.load(checkpoint.newest_module_file(b, module), weights_only=True)
        assert x["position"] == y["position"]
        tensors_equal(x["state"], y["state"], f"module {module}")


@pytest.mark.slow
def test_a_crash_between_two_modules_saves_resumes_from_the_last_complete_set(twelve_steps, make_config, tmp_path,
                                                                             monkeypatch):
    """Module 0 saved step 12, module 1's save died: the step-8 set is intact and the resume equals a straight run."""
    out = tmp_path / "crashed"
    fail_second_save_of(monkeypatch, 1, KeyboardInterrupt())  # as abrupt as it gets in-process
    with pytest.raises(KeyboardInterrupt):
        run(make_config(*CRASH, out_dir=out))
    monkeypatch.undo()
    assert [step for step, _ in checkpoint.complete_sets(out)] == [8]
    assert not [path for path in out.rglob("*") if ".tmp" in path.name]
    resumed = run(make_config(*CRASH, f"run.resume='{out}'", out_dir=out))
    straight_dir, straight = twelve_steps  # the same config as CRASH
    assert resumed["steps"] == straight["steps"] == 12 and resumed["test_accuracy"] == straight["test_accuracy"]
    assert_equal_runs(out, straight_dir)
    assert [step for step, _ in checkpoint.complete_sets(out)] == [8, 12]


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_set(make_config, tmp_path, monkeypatch):
    out = tmp_path / "full"
    fail_second_save_of(monkeypatch, 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(StageFailure) as info:
        run(make_config(*CRASH, out_dir=out))
    message = str(info.value)
    assert "\n" not in message and "no space left on device" in message
    assert str(out / "checkpoints" / "step_12" / "module_1.pt") in message
    assert [step for step, _ in checkpoint.complete_sets(out)] == [8]
    assert not [path for path in out.rglob("*") if ".tmp" in path.name]  # no temporary file left


@pytest.mark.parametrize("target", ["metrics.jsonl", "summary.json"])
def test_a_full_disk_for_metrics_or_summary_is_one_line(make_config, tmp_path, monkeypatch, target):
    out = tmp_path / "full"
    real_open = builtins.open

    def full(file, *args, **kwargs):
        if Path(str(file)).name.startswith(target.split(".")[0]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full)
    monkeypatch.setattr(io, "open", full)  # Path.write_text opens through io.open
    with pytest.raises(StageFailure) as info:  # the first metrics line is step 4's, the summary comes after it
        run(make_config(*RESUME, "train.max_steps=4", out_dir=out))
    message = str(info.value)
    assert "\n" not in message and "no space left on device" in message and target in message
    assert not [path for path in out.rglob("*") if ".tmp" in path.name]


@pytest.mark.slow
def test_the_newest_sets_are_kept_and_resume_step_picks_one(make_config, tmp_path):
    out = tmp_path / "three"
    long = (*RESUME[:-2], "train.max_steps=20", "train.epochs=4", "train.warmup_epochs=1", "run.log_every=4",
            "run.keep_checkpoints=2")
    run(make_config(*long, out_dir=out))  # sets at steps 8 and 16 (epoch ends) and 20 (max_steps)
    assert [step for step, _ in checkpoint.complete_sets(out)] == [16, 20]
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step_16", "step_20"]
    resumed = run(make_config(*long, f"run.resume='{out}'", "run.resume_step=16", out_dir=tmp_path / "again"))
    assert resumed["steps"] == 20
    assert_equal_runs(out, tmp_path / "again")
    with pytest.raises(BadInput, match=r"run.resume_step = 8: .* steps \[16, 20\] only"):
        run(make_config(*long, f"run.resume='{out}'", "run.resume_step=8", out_dir=tmp_path / "never"))
    with pytest.raises(BadInput, match="run.keep_checkpoints = 0 must be >= 1"):
        make_config("run.keep_checkpoints=0")


def test_an_unfinished_newer_set_is_ignored_and_cleared(six_steps, make_config, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(six_steps, out)
    unfinished = out / "checkpoints" / "step_9"
    unfinished.mkdir()
    shutil.copy(out / "checkpoints" / "step_6" / "module_0.pt", unfinished / "module_0.pt")
    (out / "checkpoints" / "step_6" / "module_1.pt.tmp123").write_bytes(b"half")
    assert checkpoint.find_set(out) == out / "checkpoints" / "step_6"
    run(make_config(*RESUME, "train.max_steps=7", f"run.resume='{out}'", out_dir=out))
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step_6", "step_7"]
    assert not [path for path in out.rglob("*") if ".tmp" in path.name]


def test_a_checkpoint_write_torch_reports_as_a_runtime_error_names_the_file_and_the_os_reason(tmp_path, capsys,
                                                                                              file_size_limit):
    """torch's zip writer reports a failed write as "[enforce fail at inline_container.cc] unexpected pos"."""
    out = tmp_path / "run"
    with file_size_limit(64 * 1024):  # the metrics lines and the error log fit, module 0's 137 kB file does not
        code = main(["--set", "data.name=synthetic", "--set", "model.arch=resnet8", "--set", "data.batch_size=8",
                     "--set", "train.max_steps=3", "--set", "local.modules=2", "--set", f"run.out_dir={out}"])
    assert code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    target = out / "checkpoints" / "step_3" / "module_0.pt"
    assert line.startswith(f"error: cannot write {target}: file too large; free space"), line
    assert line.endswith(f"(traceback: {out / 'errors' / 'rank_0.log'})")
    assert "RuntimeError" in (out / "errors" / "rank_0.log").read_text()  # the whole chain is kept there
    assert checkpoint.complete_sets(out) == []
    assert not [path for path in out.rglob("*") if ".tmp" in path.name]


@pytest.mark.slow
def test_resuming_with_another_schedule_says_what_changes(make_config, tmp_path, capsys):
    """A per-step schedule spans the run: extending it by max_steps sends the rate back up, said in one line."""
    steps = ("local.modules=2", "data.batch_size=128", "train.schedule=cosine-step", "train.epochs=1")
    run(make_config(*steps, "train.max_steps=6", out_dir=tmp_path / "six"))
    capsys.readouterr()
    run(make_config(*steps, "train.max_steps=8", f"run.resume='{tmp_path / 'six'}'", out_dir=tmp_path / "eight"))
    trained, after = 0.05 * (1 + math.cos(math.pi * 5 / 6)), 0.05 * (1 + math.cos(math.pi * 6 / 8))
    assert (f"warning: run.resume changes the learning-rate schedule (train.max_steps = 8 (was 6)): step 6 trained "
            f"at {trained:.4g}, step 7 will train at {after:.4g}; keep the run's train settings to continue its "
            f"schedule\n") in capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "eight" / "metrics.jsonl").read_text().splitlines()]
    assert [line["lr"] for line in lines if line.get("step") == 7] == [after, after]  # what the line said


def test_changing_train_epochs_on_resume_is_said(six_steps, make_config, tmp_path, capsys):
    run(make_config(*RESUME, "train.epochs=4", "train.max_steps=7", f"run.resume='{six_steps}'",
                    out_dir=tmp_path / "longer"))
    assert ("warning: run.resume changes the learning-rate schedule (train.epochs = 4 (was 3), train.max_steps = 7 "
            "(was 6)): step 6 trained at 0.01, step 7 will train at 0.01;") in capsys.readouterr().err


def test_commit_looks_again_for_a_module_file_another_node_wrote(make_config, tmp_path):
    """On NFS a file written on another node can take a while to show: commit waits up to wait_s for
    it (here it appears 0.4 s late), and fails naming the module when it never shows."""
    import threading
    import time

    config = make_config("local.modules=2")
    spec = dataset_spec(config.data, config.model)
    cuts = resolve_cuts(config, spec, CPU)
    layout = make_layout(config, spec, cuts)
    identity = checkpoint.identity_of(config, cuts)
    workers = [make_worker(config, layout, index, CPU) for index in range(2)]
    checkpoint.save(tmp_path, workers[1], Position(1, 0, 4), identity)
    late = threading.Timer(0.4, checkpoint.save, (tmp_path, workers[0], Position(1, 0, 4), identity))
    late.start()
    checkpoint.commit(tmp_path, Position(1, 0, 4), 2, identity, keep=2, config={}, schedule={}, wait_s=10.0)
    late.join()
    assert checkpoint.find_set(tmp_path) == tmp_path / "checkpoints" / "step_4"
    checkpoint.save(tmp_path, workers[1], Position(1, 0, 8), identity)
    started = time.monotonic()
    with pytest.raises(StageFailure, match=r"lacks modules \[0\]"):
        checkpoint.commit(tmp_path, Position(1, 0, 8), 2, identity, keep=2, config={}, schedule={}, wait_s=1.0)
    assert 1.0 <= time.monotonic() - started < 3.0


@pytest.mark.parametrize("overrides, network", [
    ((f"model.arch={MAPS_THEN_VECTORS}",), {"arch": MAPS_THEN_VECTORS, "family": "factory"}),  # its module:factory
    (("model.arch=vit_tiny",), {"arch": "vit_tiny", "family": "vit"}),
    (("model.arch=resnet50",), {"arch": "resnet50", "family": "cifar"}),
    (("model.arch=resnet50", "model.family=imagenet"), {"arch": "resnet50", "family": "imagenet"}),
])
def test_the_identity_records_the_network_and_its_family(make_config, overrides, network):
    identity = checkpoint.identity_of(make_config(*overrides, "local.modules=2"), [3])
    assert {key: identity[key] for key in ("arch", "family")} == network and identity["cuts"] == [3]
