"""Faults: SIGTERM saves a checkpoint and stops the program with status 143 (for two
processes see test_launch); kill -9 loses at most the steps since the last checkpoint and
the resumed run continues bit for bit; when one process of a multi-process job dies, the
others exit with an error within seconds."""

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from qcsbm_jax import train
from test_launch import CONFIG, NARROW, ROOT, RUN_SH, finalized_steps, job_env, wait_for
from test_train import _smoke


def _start_main(env, workdir, log_path, *flags):
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "qcsbm_jax.main", f"--config={CONFIG}", NARROW,
             f"--workdir={workdir}", *flags], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT)


def test_sigterm_saves_and_stops_the_whole_job(tmp_path):
    """SIGTERM mid-run: the step reached is saved, then Preempted, a SystemExit with status
    143, ends the program (main adds nothing: in --mode=all evaluation never starts)."""
    workdir = str(tmp_path / "run")
    config = _smoke("qcsbm", **{"training.num_steps": 5000, "training.checkpoint_every": 10})

    def sigterm_after_first_checkpoint():
        while not finalized_steps(workdir):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=sigterm_after_first_checkpoint, daemon=True).start()
    with pytest.raises(train.Preempted) as stopped:
        train.train(config, workdir)
    assert isinstance(stopped.value, SystemExit)
    assert stopped.value.code == train.PREEMPTED_EXIT_CODE == 143
    assert 10 <= stopped.value.step < 5000
    assert finalized_steps(workdir)[-1] == stopped.value.step
    assert f"saved step {stopped.value.step} in {workdir}/checkpoints" in str(stopped.value)


def test_kill_9_then_resume_continues_bit_for_bit(tmp_path, caplog, job_env):
    """Killed right after a checkpoint (often during the next async save): the resumed run
    starts at the newest finalized step and ends where an uninterrupted run ends."""
    workdir, log_path = str(tmp_path / "killed"), str(tmp_path / "log")
    job = _start_main(job_env, workdir, log_path, "--mode=train",
                      "--config.training.num_steps=1000000",
                      "--config.training.checkpoint_every=10")
    wait_for(lambda: len(finalized_steps(workdir)) >= 2, job, log_path)
    job.kill()
    assert job.wait(timeout=60) == -signal.SIGKILL
    last = finalized_steps(workdir)[-1]

    total = last + 15
    config = _smoke("qcsbm", **{"training.num_steps": total, "training.checkpoint_every": 10})
    with caplog.at_level(logging.INFO):
        resumed = train.train(config, workdir)
    assert f"Resumed from step {last} " in caplog.text
    expected = train.train(config, str(tmp_path / "uninterrupted"))
    assert int(resumed.step) == int(expected.step) == total
    for a, b in zip(jax.tree.leaves((resumed.params, resumed.opt_state, resumed.ema_params)),
                    jax.tree.leaves((expected.params, expected.opt_state, expected.ema_params))):
        np.testing.assert_array_equal(a, b)


def _child_pids(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return children


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


def test_a_dead_process_stops_the_others_within_seconds(tmp_path, job_env):
    """kill -9 of process 1 mid-training: process 0 exits on its own (no launcher kill)
    with JAX's 'another task died' error, seconds later rather than hanging."""
    workdir, log_path = str(tmp_path / "run"), str(tmp_path / "log")
    env = dict(job_env, JAX_NUM_CPU_DEVICES="1", QCSBM_STOP_GRACE_S="120")
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            ["bash", RUN_SH, "local", "--processes", "2", CONFIG, NARROW, "--mode=train",
             f"--workdir={workdir}", "--config.training.num_steps=1000000",
             "--config.training.checkpoint_every=5", "--heartbeat_timeout_s=5"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: finalized_steps(workdir), job, log_path)
    (victim,) = [p for p in _child_pids(job.pid) if "--process_id=1" in _cmdline(p)]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    status = job.wait(timeout=120)
    elapsed = time.monotonic() - killed
    with open(log_path) as f:
        output = f.read()
    assert status != 0
    assert elapsed < 60, output[-3000:]
    assert f"[run.sh] process 1 (pid {victim}) exited with status 137." in output
    assert re.search(r"\[run.sh\] process 0 \(pid \d+\) exited with status [1-9]", output)
    assert "killing the" not in output
    assert "another task died" in output, output[-3000:]
