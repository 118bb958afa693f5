"""pipeline.runtime.metrics: the peak memory a CPU run reports is its own, not its launcher's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime.metrics import peak_resident_bytes

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def test_the_peak_is_read_from_vmhwm(tmp_path: Path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 9999999 kB\nVmHWM:\t  123456 kB\nVmRSS:\t   1000 kB\n")
    assert peak_resident_bytes(status) == 123456 * 1024


def test_without_proc_the_peak_is_getrusage(tmp_path: Path):
    assert peak_resident_bytes(tmp_path / "missing") > 0


@pytest.mark.slow  # launches a process (which imports torch)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux: /proc holds VmHWM")
def test_a_run_launched_by_a_large_process_reports_its_own_peak():
    # ru_maxrss survives execve: a child of this 1 GiB process would report at least 1 GiB (the benchmark's
    # single-process rows reported its 4.3 GiB this way). The child imports torch, a few hundred MiB.
    ballast = b"\x01" * (1024 * MIB)
    probe = ("import resource\nfrom pipeline.runtime.metrics import peak_resident_bytes\n"
             "print(peak_resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO,
                          timeout=120)
    own, inherited = map(int, done.stdout.split())
    assert len(ballast) == 1024 * MIB
    assert inherited >= 1024 * MIB  # what getrusage alone would have reported
    assert 0 < own < 1024 * MIB
