"""pipeline.runtime.worker.ModuleWorker: K = 1 is plain end-to-end SGD; modules never touch each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.loader import make_loaders
from pipeline.data.specs import DatasetSpec, dataset_spec
from pipeline.model.network import make_layout
from pipeline.model.resnet import CifarResNet, Classifier, init_weights
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.optim import learning_rate
from pipeline.runtime.packet import Packet
from pipeline.runtime.worker import make_worker

CPU = torch.device("cpu")


def workers_for(config):
    spec = dataset_spec(config.data, config.model)
    layout = make_layout(config, spec, resolve_cuts(config, spec, CPU))
    return [make_worker(config, layout, index, CPU) for index in range(config.local.modules)]


def reference_resnet(config) -> nn.Sequential:
    """The whole network by hand from resnet's blocks, seeded as module 0 (run.seed + 0)."""
    spec = dataset_spec(config.data, config.model)
    net = CifarResNet(config.arch.blocks[0], spec.channels, spec.image_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed + 0)
        model = nn.Sequential(*(net.build(index) for index in range(len(net))), Classifier(64, spec.classes))
        init_weights(model)
    return model


@pytest.mark.parametrize("arch, seed", [("resnet8", 0), ("resnet14", 3)])
def test_K1_equals_a_plain_end_to_end_step(arch, seed, make_config):
    config = make_config(f"model.arch={arch}", f"run.seed={seed}", "local.modules=1", "train.lr=0.5",
                         "train.warmup_epochs=2", "train.epochs=3")
    (worker,) = workers_for(config)
    reference = reference_resnet(config)
    mine = [*worker.module.body.parameters(), *worker.module.head.parameters()]
    theirs = list(reference.parameters())
    assert len(mine) == len(theirs) == len(list(worker.module.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), "same seed, same initial weights"

    train, _ = make_loaders(config.data, config.model, config.run.seed, CPU)
    rate = learning_rate(config.train, 2)
    optimizer = torch.optim.SGD(reference.parameters(), lr=rate, momentum=0.9, nesterov=True, weight_decay=1e-4)
    worker.at_step(2, 1)
    assert worker.optimizer.param_groups[0]["lr"] == rate
    reference.train()
    for images, labels in list(train.batches(2))[:2]:  # two steps: momentum is exercised too
        packet_out, loss = worker.train_step(Packet.from_batch(images, labels))
        assert packet_out is None  # the last module sends nothing
        expected = F.cross_entropy(reference(images), labels)
        optimizer.zero_grad()
        expected.backward()
        optimizer.step()
        assert torch.equal(loss, expected.detach())
    for a, b in zip(mine, theirs):
        assert torch.equal(a, b)
    buffers = [*worker.module.body.buffers(), *worker.module.head.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(buffers, reference.buffers()))  # batch-norm statistics


def test_K1_eval_counts_correct_predictions(make_config, image_batch):
    config = make_config("local.modules=1")
    (worker,) = workers_for(config)
    images, labels = image_batch(dataset_spec(config.data, config.model), batch=8)
    correct = worker.eval_step(Packet.from_batch(images, labels))
    worker.module.eval()
    with torch.no_grad():
        predicted = worker.module.logits(worker.module.features(Packet.from_batch(images, labels))[1], labels).argmax(1)
    assert int(correct) == int((predicted == labels).sum())


def test_each_optimizer_holds_only_its_own_module(make_config):
    config = make_config("local.modules=3", "local.context=R1E", "local.reconstruct=true")
    workers = workers_for(config)
    for worker in workers:
        own = {id(p) for p in worker.module.parameters()}
        held = {id(p) for group in worker.optimizer.param_groups for p in group["params"]}
        assert held == own
    everything = [id(p) for w in workers for p in w.module.parameters()]
    assert len(everything) == len(set(everything))  # no parameter is shared between modules


@pytest.mark.parametrize("context, extra", [("R0", []), ("R1E", ["local.reconstruct=true"]),
                                            ("R2", ["local.loss=contrast"])])
def test_a_step_leaves_every_other_module_untouched(context, extra, make_config, image_batch):
    config = make_config("local.modules=4", f"local.context={context}", *extra)
    workers = workers_for(config)
    for worker in workers:
        worker.at_step(1, 1)
    images, labels = image_batch(dataset_spec(config.data, config.model), batch=8)
    packet = Packet.from_batch(images, labels)
    for index, worker in enumerate(workers):
        before = [{n: p.detach().clone() for n, p in w.module.named_parameters()} for w in workers]
        grads = [{n: None if p.grad is None else p.grad.clone() for n, p in w.module.named_parameters()}
                 for w in workers]
        received = packet
        packet, loss = worker.train_step(received)
        assert torch.isfinite(loss) and not loss.requires_grad
        for other, w in enumerate(workers):
            if other == index:
                changed = [n for n, p in w.module.named_parameters() if not torch.equal(p, before[other][n])]
                assert changed, f"module {index} did not train"
                assert all(p.grad is not None for p in w.module.parameters())
                continue
            for name, p in w.module.named_parameters():
                assert torch.equal(p, before[other][name]), f"step of module {index} moved module {other}'s {name}"
                if grads[other][name] is None:
                    assert p.grad is None, f"step of module {index} gave module {other} a gradient ({name})"
                else:
                    assert torch.equal(p.grad, grads[other][name])
        if packet is not None:  # what goes on is cut from this module's graph
            for tensor in [packet.features, *packet.register]:
                assert not tensor.requires_grad and tensor.grad_fn is None
            assert packet.image is None or packet.image is received.image


def test_a_new_worker_runs_at_the_rate_it_reports(make_config):
    """Before at_step is called the optimizer must already use the epoch-1 rate worker.lr shows."""
    config = make_config("local.modules=2", "train.lr=0.4", "train.warmup_epochs=5", "train.epochs=10")
    for worker in workers_for(config):
        assert worker.lr == pytest.approx(learning_rate(config.train, 1))
        assert worker.optimizer.param_groups[0]["lr"] == pytest.approx(worker.lr)


def test_a_resumed_worker_trains_at_its_own_config_rate_not_the_checkpoints(make_config):
    """A checkpoint's optimizer state holds the rate it was saved at; a resume with another constant train.lr
    must train (and report) the new one."""
    (saved,) = workers_for(make_config("local.modules=1", "train.schedule=constant", "train.lr=0.1"))
    (resumed,) = workers_for(make_config("local.modules=1", "train.schedule=constant", "train.lr=0.05"))
    resumed.load_state_dict(saved.state_dict())
    resumed.at_step(1, 7)
    assert resumed.lr == 0.05
    assert {group["lr"] for group in resumed.optimizer.param_groups} == {0.05}


def test_state_dict_round_trip(make_config, image_batch):
    config = make_config("local.modules=2", "local.context=E")
    first, second = workers_for(config), workers_for(config)
    images, labels = image_batch(dataset_spec(config.data, config.model), batch=8)
    packet = Packet.from_batch(images, labels)
    for worker in first:
        worker.at_step(1, 1)
        packet, _ = worker.train_step(packet)
    for source, target in zip(first, second):
        target.load_state_dict(source.state_dict())
        for (name, a), (_, b) in zip(source.module.state_dict().items(), target.module.state_dict().items()):
            assert torch.equal(a, b), name
        assert target.optimizer.state_dict()["state"].keys() == source.optimizer.state_dict()["state"].keys()


def test_dropout_draws_come_from_seed_module_and_step_not_the_process(seg_config_builder, make_config):
    """The segmentation heads' dropout: the same masks in every mode, so sequential == pipeline holds."""
    config = seg_config_builder("model.arch=deeplabv3_resnet50", "local.modules=2", "local.partition=[[1, 0]]")
    spec = DatasetSpec("seg", 3, 4, 32, (0.5,) * 3, (0.25,) * 3, 0, "constant", True, "", "", dense=True,
                       image_width=64)
    layout = make_layout(config, spec, resolve_cuts(config, spec, CPU))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 64, generator=generator)
    labels = torch.randint(0, 4, (2, 32, 64), generator=generator)

    def step(at: int, process_seed: int):
        worker = make_worker(config, layout, 0, CPU)  # module 0: the stem, layer1[0] and InfoPro's head
        assert len(worker.module.dropouts) == 1  # InfoPro's head
        worker.at_step(1, at)
        torch.manual_seed(process_seed)
        state = torch.random.get_rng_state()
        _, loss = worker.train_step(Packet.from_batch(images, labels))
        assert torch.equal(torch.random.get_rng_state(), state)  # the process's stream is left as it was
        return loss, [p.detach().clone() for p in worker.module.parameters()]

    loss, weights = step(5, process_seed=1)
    same_loss, same_weights = step(5, process_seed=2)
    assert torch.equal(loss, same_loss) and all(torch.equal(a, b) for a, b in zip(weights, same_weights))
    other_loss, _ = step(6, process_seed=1)
    assert not torch.equal(loss, other_loss)  # another step, other masks
    cifar = make_config("local.modules=2")
    assert not any(worker.module.dropouts for worker in workers_for(cifar))  # nothing to seed: unchanged


def test_channels_last_leaves_token_features_as_they_are(make_config, image_batch):
    """precision.channels_last lays out the image and maps; a ViT's tokens and its token register stay (B, N, D)."""
    losses = {}
    for layout in ("false", "true"):
        config = make_config("model.arch=vit_tiny", "local.modules=3", "local.context=R1E", "data.batch_size=2",
                             f"precision.channels_last={layout}")
        images, labels = image_batch(dataset_spec(config.data, config.model), 2)
        packet: Packet | None = Packet.from_batch(images, labels)
        losses[layout] = []
        for worker in workers_for(config):
            assert packet is not None
            packet, loss = worker.train_step(packet)
            losses[layout].append(float(loss))
            assert packet is None or packet.features.dim() == 3
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
