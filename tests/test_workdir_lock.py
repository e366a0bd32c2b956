"""One writer per workdir: a second training is refused naming the holder; locks of dead
processes are taken over with a message; readers never need the lock."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import pytest

from qcsbm_jax import checkpoint, train, workdir_lock
from test_checkpoint import abstract, assert_trees_equal, make_state, saved_steps
from test_train import _smoke


def _lock_path(workdir) -> str:
    return os.path.join(workdir, workdir_lock.LOCK_FILE)


def _write_record(workdir, **record):
    os.makedirs(workdir, exist_ok=True)
    with open(_lock_path(workdir), "w") as f:
        json.dump({"host": socket.gethostname(), "command": "python -m qcsbm_jax.main",
                   "since": "earlier", "refreshed": time.time(), **record}, f)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_training_is_refused_before_writing_anything(tmp_path):
    """Defect: two trainings on one workdir pruned each other's steps and mixed them."""
    workdir = str(tmp_path / "run")
    with workdir_lock.WorkdirLock(workdir):
        with pytest.raises(workdir_lock.WorkdirLockedError) as error:
            train.train(_smoke("usbm"), workdir)
        assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]
    message = str(error.value)
    assert f"names process {os.getpid()} on host {socket.gethostname()}" in message
    assert f"{workdir} is in use by another training" in message
    assert f"delete {_lock_path(workdir)}" in message
    assert not os.path.exists(_lock_path(workdir))  # Released on exit.


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _write_record(tmp_path, pid=dead)
    with workdir_lock.WorkdirLock(tmp_path):
        with open(_lock_path(tmp_path)) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert f"Taking over the lock {_lock_path(tmp_path)} left by process {dead}" in caplog.text
    assert "no longer runs on this host" in caplog.text


def test_a_reused_pid_does_not_keep_a_lock(tmp_path, caplog):
    """The pid runs, but not the process that wrote the lock (it started at another time)."""
    _write_record(tmp_path, pid=os.getpid(), start=1)
    with workdir_lock.WorkdirLock(tmp_path):
        pass
    assert "Taking over the lock" in caplog.text


def test_lock_of_another_host_is_kept_until_stale(tmp_path, caplog):
    _write_record(tmp_path, host="node-7", pid=4242)
    with pytest.raises(workdir_lock.WorkdirLockedError, match="process 4242 on host node-7"):
        with workdir_lock.WorkdirLock(tmp_path):
            pass
    _write_record(tmp_path, host="node-7", pid=4242,
                  refreshed=time.time() - workdir_lock.STALE_AFTER_S - 10)
    with workdir_lock.WorkdirLock(tmp_path):
        pass
    assert "it was last refreshed" in caplog.text


def test_an_unreadable_lock_is_refused_while_fresh(tmp_path):
    with open(_lock_path(tmp_path), "w") as f:
        f.write('{"pid": 1')
    with pytest.raises(workdir_lock.WorkdirLockedError, match="an unreadable lock record"):
        with workdir_lock.WorkdirLock(tmp_path):
            pass
    old = time.time() - workdir_lock.STALE_AFTER_S - 10
    os.utime(_lock_path(tmp_path), (old, old))
    with workdir_lock.WorkdirLock(tmp_path):
        pass


def test_heartbeat_refreshes_and_release_follows_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    with pytest.raises(RuntimeError, match="boom"):
        with workdir_lock.WorkdirLock(tmp_path):
            with open(_lock_path(tmp_path)) as f:
                first = json.load(f)["refreshed"]
            time.sleep(0.5)
            with open(_lock_path(tmp_path)) as f:
                assert json.load(f)["refreshed"] > first
            raise RuntimeError("boom")
    assert not os.path.exists(_lock_path(tmp_path))


def test_only_process_zero_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    _write_record(tmp_path, pid=os.getpid())  # Held (by process 0, say).
    with workdir_lock.WorkdirLock(tmp_path):
        pass
    assert os.path.exists(_lock_path(tmp_path))


def test_readers_work_beside_a_training(tmp_path):
    """Evaluation (eval.watch too) reads read-only and never takes the lock."""
    saved_steps(tmp_path, [1, 2])
    with workdir_lock.WorkdirLock(tmp_path):
        with checkpoint.Checkpointer(tmp_path, read_only=True) as ckpt:
            parts, _ = ckpt.restore_latest_valid({"params": make_state().params})
        with checkpoint.Checkpointer(tmp_path) as ckpt:
            restored, _ = ckpt.restore(abstract(make_state()), 1)
    assert_trees_equal(parts["params"], make_state(2).params)
    assert_trees_equal(restored, make_state(1))
