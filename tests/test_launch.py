"""launch/run.sh: a real 2-process CPU job (train, pre-empt, resume), and the TPU and SLURM
paths against a fake gcloud / srun on PATH that record (and partly run) what they are asked."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest

from qcsbm_jax import checkpoint, train
from test_train import _smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "launch", "run.sh")
CONFIG = "configs/toy/gaussians8_qcsbm.py:smoke"
NARROW = "--config.model.widths=(32, 32)"  # As test_train._smoke.
# run.sh uses the virtual environment running these tests (set up, or refreshed, as usual).
OUR_VENV = {"QCSBM_VENV": sys.prefix} if sys.prefix != sys.base_prefix else {}


@pytest.fixture(scope="session")
def job_env(tmp_path_factory):
    """The environment for job subprocesses: one JAX compilation cache for all of them, so
    that each program compiles once per session (the same executable, so the same bits)."""
    return dict(os.environ, **OUR_VENV,
                JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def finalized_steps(workdir) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def wait_for(condition, process, log_path, timeout=240.0):
    """Polls condition() until true; fails early if the process ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            with open(log_path) as f:
                tail = f.read()[-4000:]
            raise AssertionError(f"Gave up waiting (exit status {process.poll()}):\n{tail}")
        time.sleep(0.2)


def run_sh(*args, env=None):
    return subprocess.run(["bash", RUN_SH, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **OUR_VENV, **(env or {})})


def test_help_names_every_command():
    result = run_sh("--help")
    assert result.returncode == 0
    for command in ("local [--processes N]", "tpu setup|run|stop|logs", "slurm", "test"):
        assert command in result.stdout


def test_two_processes_train_preempt_and_resume_like_one(tmp_path, job_env):
    """run.sh local --processes 2 (2 CPU devices each): SIGTERM to the launcher stops both
    processes at one step with a checkpoint (status 143); a second 2-process job restores
    it and finishes; the parameters match a one-process run of the same steps."""
    workdir, log_path = str(tmp_path / "run"), str(tmp_path / "log")
    env = dict(job_env, JAX_NUM_CPU_DEVICES="2")
    flags = [f"--workdir={workdir}", "--mode=all", NARROW,
             "--config.training.checkpoint_every=10"]
    with open(log_path, "w") as log:
        job = subprocess.Popen(["bash", RUN_SH, "local", "--processes", "2", CONFIG, *flags,
                                "--config.training.num_steps=100000"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: finalized_steps(workdir), job, log_path)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == train.PREEMPTED_EXIT_CODE
    with open(log_path) as f:
        output = f.read()
    stopped = finalized_steps(workdir)[-1]
    for process in (0, 1):
        assert re.search(rf"\[process {process}\] W.* Pre-empted \(SIGTERM\): saved step "
                         rf"{stopped} in", output), output[-4000:]
    assert not os.path.exists(os.path.join(workdir, "eval"))  # --mode=all stopped there.

    total = stopped + 5
    resumed = run_sh("local", "--processes=2", CONFIG, *flags,
                     f"--config.training.num_steps={total}", "--mode=train", env=env)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "[process 1] " in resumed.stdout and f"Resumed from step {stopped}" in resumed.stdout
    assert finalized_steps(workdir)[-1] == total

    expected = train.train(_smoke("qcsbm", **{"training.num_steps": total}),
                           str(tmp_path / "one_process"))
    with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
        two_processes, _ = ckpt.restore({"params": expected.params})
    for a, b in zip(jax.tree.leaves(two_processes["params"]), jax.tree.leaves(expected.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


FAKE = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": os.path.basename(sys.argv[0]), "args": args,
                        "JAX_LOCAL_DEVICE_IDS": os.environ.get("JAX_LOCAL_DEVICE_IDS")}}) + "\\n")
run = os.environ.get("FAKE_RUN", "").split(",")
command = [a.split("=", 1)[1] for a in args if a.startswith("--command=")]
if "scp" in run and args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
elif "ssh" in run and command:
    sys.exit(subprocess.run(["bash", "-c", command[0]], cwd=os.environ["HOME"]).returncode)
"""

# Stands in for a worker's .venv/bin/python: logs its arguments, runs until SIGTERM.
FAKE_JOB = """#!/bin/bash
echo "args: $* TFDS_DATA_DIR=$TFDS_DATA_DIR"
trap 'echo "SIGTERM: checkpoint saved"; exit 143' TERM
while true; do sleep 0.1; done
"""


@pytest.fixture
def fakes(tmp_path):
    """PATH with fake gcloud and srun; HOME standing in for a TPU worker's home."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    for tool in ("gcloud", "srun"):
        (bin_dir / tool).write_text(FAKE.format(python=sys.executable))
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "FAKE_LOG": str(log),
           "FAKE_RUN": "", "PROJECT_ID": "env-project", "ZONE": "", "TPU_NAME": "",
           "WORKDIR": "", "TFDS_DATA_DIR": ""}

    def calls():
        if not log.exists():
            return []
        lines = log.read_text().splitlines()
        log.unlink()
        return [json.loads(line) for line in lines]

    return env, home, calls


def _ssh_command(call, tpu="pod", zone="europe-west4-a", project="env-project"):
    """Checks the gcloud ssh call and returns the command it was asked to run."""
    args = call["args"]
    assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", tpu]
    assert f"--zone={zone}" in args and f"--project={project}" in args
    assert "--worker=all" in args
    return next(a.split("=", 1)[1] for a in args if a.startswith("--command="))


def test_tpu_setup_run_logs_stop(fakes):
    env, home, calls = fakes
    tpu = ["--tpu", "pod", "--zone=europe-west4-a"]

    assert run_sh("tpu", "setup", *tpu, env=dict(env, FAKE_RUN="scp")).returncode == 0
    scp, ssh = calls()
    assert scp["args"][:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp["args"]
    with tarfile.open(home / "qcsbm_jax.tar.gz") as archive:
        names = archive.getnames()
    assert "./launch/run.sh" in names and "./qcsbm_jax/train.py" in names
    assert not any(n.startswith(("./.venv", "./.git/", "./runs")) for n in names)
    setup = _ssh_command(ssh)
    assert "remote_setup qcsbm_jax" in setup and 'setup_venv "jax[tpu]"' in setup

    # A worker as `tpu setup` leaves it: the checkout with a venv (here a fake job).
    job = home / "qcsbm_jax" / ".venv" / "bin" / "python"
    job.parent.mkdir(parents=True)
    job.write_text(FAKE_JOB)
    job.chmod(0o755)
    run_env = dict(env, FAKE_RUN="ssh", TFDS_DATA_DIR="gs://data/tfds")
    result = run_sh("tpu", "run", *tpu, "--no-check", "--workdir", "gs://bucket/run",
                    "configs/x.py", "--config.training.num_steps=5", env=run_env)
    assert result.returncode == 0, result.stderr
    command = _ssh_command(calls()[0])
    assert command.rstrip().endswith(shlex.join([
        "remote_run", "qcsbm_jax", "gs://data/tfds", "--config=configs/x.py", "--mode=all",
        "--workdir=gs://bucket/run", "--distributed=tpu", "--config.training.num_steps=5"]))
    pid = int((home / "qcsbm_jax" / "run.pid").read_text())
    again = run_sh("tpu", "run", *tpu, "--no-check", "--workdir=gs://bucket/run", env=run_env)
    assert again.returncode != 0 and "already running" in again.stderr
    calls()

    time.sleep(0.5)
    logs = run_sh("tpu", "logs", *tpu, env=dict(env, FAKE_RUN="ssh"))
    assert ("args: -m qcsbm_jax.main --config=configs/x.py --mode=all "
            "--workdir=gs://bucket/run --distributed=tpu --config.training.num_steps=5 "
            "TFDS_DATA_DIR=gs://data/tfds") in logs.stdout
    calls()

    # stop signals only the job in run.pid, not other qcsbm_jax.main processes (here one
    # of another checkout) nor a process that took over a stale pid.
    others = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                "qcsbm_jax.main"], cwd=cwd) for cwd in (ROOT, home)]
    try:
        stop = run_sh("tpu", "stop", *tpu, env=dict(env, FAKE_RUN="ssh"))
        assert stop.returncode == 0 and f"stopped pid {pid}" in stop.stdout
        assert "SIGTERM: checkpoint saved" in (home / "qcsbm_jax" / "run.log").read_text()
        assert not (home / "qcsbm_jax" / "run.pid").exists()
        for other in others:
            (home / "qcsbm_jax" / "run.pid").write_text(str(other.pid))
            again = run_sh("tpu", "stop", *tpu, env=dict(env, FAKE_RUN="ssh"))
            assert "no job running" in again.stdout
        assert all(other.poll() is None for other in others)
    finally:
        for other in others:
            other.kill()
            other.wait()


def test_tpu_run_needs_a_gcs_workdir_and_a_tpu_name(fakes):
    env, _, calls = fakes
    no_workdir = run_sh("tpu", "run", "--tpu=pod", env=env)
    assert no_workdir.returncode == 2 and "gs://" in no_workdir.stderr
    no_name = run_sh("tpu", "logs", env=env)
    assert no_name.returncode == 2 and "TPU_NAME" in no_name.stderr
    assert calls() == []


@pytest.mark.parametrize("per, tasks, local_ids", [("gpu", 4, None), ("node", 1, "0,1,2,3")])
def test_slurm_starts_one_process_per_gpu_or_per_node(fakes, per, tasks, local_ids):
    env, _, calls = fakes
    result = run_sh("slurm", "--no-check", "--nodes", "2", "--gpus-per-node=4", f"--per={per}",
                    "--srun-arg=--partition=gpu", CONFIG, "--mode=train",
                    env=dict(env, QCSBM_PIP_EXTRA="", JAX_LOCAL_DEVICE_IDS="7"))
    assert result.returncode == 0, result.stderr
    (srun,) = calls()
    args = srun["args"]
    assert args[:5] == ["--nodes=2", f"--ntasks-per-node={tasks}", "--gpus-per-node=4",
                        "--kill-on-bad-exit=1", "--partition=gpu"]
    assert args[6:] == ["-m", "qcsbm_jax.main", f"--config={CONFIG}", "--mode=all",
                        f"--workdir={ROOT}/runs/gaussians8_qcsbm_smoke", "--distributed=slurm",
                        "--mode=train"]
    assert srun["JAX_LOCAL_DEVICE_IDS"] == local_ids
