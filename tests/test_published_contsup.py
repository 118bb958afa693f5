"""configs/published: every ContSup ResNet-32 row follows the ContSup authors' command for it.

The commands (command.sh of github.com/Tab-ct/ContSup) are written out here independently of
the configs: context, --local_loss_mode, --h_reconstruct and K; every one of them also passes
--aux_net_config 1c2f --aux_net_widen 1 --aux_net_feature_dim 128, and their train.py fixes
batch 1024, lr 0.8, 160 epochs (cosine with 10 warm-up epochs) for CIFAR-10 and the ResNet-32
CIFAR-10 loss weights (ixx_1, ixy_1, ixx_2, ixy_2) per K.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config.schema import Config

PUBLISHED = Path(__file__).resolve().parents[1] / "configs" / "published"
MAIN, ABLATION = "cifar10_resnet32", "contsup_ablation_cifar10_resnet32"
WEIGHTS = {2: (5.0, 1.0, 0.0, 0.0), 4: (6.0, 0.0, 1.0, 2.0), 8: (5.0, 0.0, 0.0, 2.0), 16: (5.0, 0.05, 0.2, 0.5)}
ALL_K = (2, 4, 8, 16)

# (table, row name) -> (context, loss, decoder): the authors' command for that row.
COMMANDS: dict[tuple[str, str], tuple[str, str, bool]] = {}
for k in ALL_K:
    for context in ("E", "R1", "R1E"):  # Table 1 (K=16), Table 2 softmax, Figure 5
        COMMANDS[MAIN, f"contsup_{context.lower()}_k{k}"] = (context, "softmax", False)
        COMMANDS[ABLATION, f"contsup_{context.lower()}_decoder_k{k}"] = (context, "softmax", True)  # Fig. 5
    for context in ("E", "R1E"):  # Table 2 contrast
        COMMANDS[MAIN, f"contsup_{context.lower()}_contrast_k{k}"] = (context, "contrast", False)
    COMMANDS[ABLATION, f"contsup_r1_contrast_k{k}"] = ("R1", "contrast", False)  # Fig. 5
for name, context in (("contsup_r2_k8", "R2"), ("contsup_r2_k16", "R2"), ("contsup_r4_k8", "R4"),  # Table 4
                      ("contsup_r4_k16", "R4"), ("contsup_r8_k16", "R8"),
                      ("contsup_r7_k8", "R7"),  # their R8 at K=8: 7 earlier modules exist, R8 = R7
                      ("contsup_r15_k16", "R15")):  # their R16 at K=16: R16 = R15
    COMMANDS[ABLATION, name] = (context, "softmax", False)


def test_every_row_follows_the_authors_command(check_shipped: Callable[..., int]) -> None:
    rows = {f"configs/published/{table}/{name}.toml" for table, name in COMMANDS}
    assert check_shipped(check_row, rows.__contains__) == len(rows)


def check_row(path: str, config: Config) -> None:
    table, name = Path(path).parent.name, Path(path).stem
    context, loss, decoder = COMMANDS[table, name]
    k = int(name.rsplit("_k", 1)[1])
    local, train = config.local, config.train
    assert (local.modules, local.context, local.loss, local.reconstruct) == (k, context, loss, decoder)
    assert (local.aux, local.aux_widen, local.aux_feature_dim, local.partition) == ("1c2f", 1, 128, "equal")
    assert (local.ixx_1, local.ixy_1, local.ixx_2, local.ixy_2) == WEIGHTS[k]
    assert (config.data.name, config.model.arch, config.data.batch_size) == ("cifar10", "resnet32", 1024)
    assert (train.lr, train.epochs, train.schedule, train.warmup_epochs) == (0.8, 160, "cosine", 10)
    assert (train.momentum, train.nesterov, train.weight_decay) == (0.9, True, 1e-4)


@pytest.mark.parametrize("table", [MAIN, ABLATION])
def test_every_contsup_row_has_an_authors_command(table: str) -> None:
    rows = {path.stem for path in (PUBLISHED / table).glob("contsup_*.toml")}
    assert rows == {name for t, name in COMMANDS if t == table}


def test_no_main_resnet32_contsup_row_trains_a_decoder(shipped_configs: dict[str, Config]) -> None:
    # the authors' main ResNet-32 results use no decoder; decoder runs are their ablation only
    for path in (PUBLISHED / MAIN).glob("contsup_*.toml"):
        assert not shipped_configs[f"configs/published/{MAIN}/{path.name}"].local.reconstruct, path
