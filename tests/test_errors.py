"""pipeline.errors: one line for the terminal, the whole story in the log, and every write failure named."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
import torch

from pipeline.errors import BadInput, StageFailure, errors_logged, os_error_behind, writing


class FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)


def test_torch_save_hides_a_full_disk_in_a_runtime_error_and_the_reason_is_found() -> None:
    with pytest.raises(RuntimeError) as caught:
        torch.save({"weights": torch.zeros(10_000)}, FullDisk(4096))
    assert "unexpected pos" in str(caught.value)  # what torch says: not the reason
    found = os_error_behind(caught.value)
    assert found is not None and found.errno == errno.ENOSPC


def test_writing_names_the_path_and_the_os_reason(tmp_path: Path) -> None:
    target = tmp_path / "module_0.pt"
    with pytest.raises(StageFailure) as caught, writing(target):
        torch.save({"weights": torch.zeros(10_000)}, FullDisk(4096))
    assert str(caught.value).startswith(f"cannot write {target}: no space left on device; free space")
    with pytest.raises(StageFailure, match=f"cannot write {tmp_path / 'x'}: not a directory"), writing(tmp_path / "x"):
        (tmp_path / "file").write_text("")
        (tmp_path / "file" / "y").write_text("")  # a failed open of a path
    with pytest.raises(ValueError), writing(target):  # anything else passes unchanged
        raise ValueError("not a write")


def test_a_failure_points_at_its_log(tmp_path: Path) -> None:
    with pytest.raises(StageFailure) as caught, errors_logged(tmp_path):
        raise RuntimeError("boom\nsecond line")
    log = tmp_path / "errors" / "rank_0.log"
    assert str(caught.value) == f"RuntimeError: boom (traceback: {log})"
    assert "second line" in log.read_text()


@pytest.mark.parametrize("kind", [BadInput, StageFailure])
def test_an_error_log_that_cannot_be_written_is_said_so(tmp_path: Path, kind: type[Exception]) -> None:
    (tmp_path / "errors").write_text("")  # a file where the folder of logs would go
    with pytest.raises(kind) as caught, errors_logged(tmp_path):
        raise kind("disk trouble")
    log = tmp_path / "errors" / "rank_0.log"
    assert str(caught.value) == f"disk trouble (no traceback saved: cannot write {log}: file exists)"
