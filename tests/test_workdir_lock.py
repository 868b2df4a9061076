"""One run per work directory: a second one stops naming the holder, a dead holder's lock is taken
over."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from detailflow_jax.train.workdir_lock import LOCK_FILE, WorkdirBusyError, WorkdirLock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, pid: int, host: str = None) -> None:
    os.makedirs(workdir, exist_ok=True)
    (workdir / LOCK_FILE).write_text(
        json.dumps(
            {
                "host": host or socket.gethostname(),
                "pid": pid,
                "since": "2026-01-01T00:00:00+00:00",
                "token": "x",
            }
        )
    )


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(
            WorkdirBusyError, match=rf"in use by another run .*{LOCK_FILE}: pid {os.getpid()} on "
        ):
            WorkdirLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released


def test_a_lock_from_another_host_is_respected(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="some-other-host")
    with pytest.raises(WorkdirBusyError, match="on some-other-host"):
        WorkdirLock(str(tmp_path)).acquire()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = _dead_pid()
    _write_lock(tmp_path, pid=pid)
    with caplog.at_level(logging.WARNING), WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {pid}" in caplog.text and "taking over" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    with WorkdirLock(str(tmp_path / "new")):
        pass
    assert not (tmp_path / "new").exists()
