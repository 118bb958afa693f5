"""The README's "Your own network" example runs as printed (the one change: its out_dir)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def own_network_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own network", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section holds one complete example"
    return blocks[0]


@pytest.mark.slow
def test_the_own_network_example_trains_sequentially(tmp_path: Path) -> None:
    code = own_network_example()
    assert "runs/my_net" in code
    (tmp_path / "my_net.py").write_text(code.replace("runs/my_net", str(tmp_path / "out")))
    done = subprocess.run([sys.executable, str(tmp_path / "my_net.py")], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])},
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(done.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert accuracy > 0.2, done.stdout  # 20 steps on Fashion-MNIST: well above chance (0.1)
    assert (tmp_path / "out" / "summary.json").is_file()
