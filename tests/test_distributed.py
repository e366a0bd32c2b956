"""The distributed set-up a job's environment and flags give, and the pre-emption flag."""

import os
import signal

import jax
import pytest

from qcsbm_jax import distributed

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "8",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
EXPLICIT = dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2)


@pytest.mark.parametrize("mode, kwargs, environ, expected", [
    ("auto", {}, {}, None),
    ("auto", EXPLICIT, {}, dict(EXPLICIT, cluster_detection_method="deactivate")),
    ("auto", EXPLICIT, SLURM, dict(EXPLICIT, cluster_detection_method="deactivate")),
    ("auto", dict(EXPLICIT, num_processes=1, process_id=0), {}, None),
    ("auto", {}, SLURM, {"cluster_detection_method": "slurm"}),
    ("slurm", {}, SLURM, {"cluster_detection_method": "slurm"}),
    ("auto", {}, dict(SLURM, SLURM_NTASKS="1", SLURM_PROCID="0"), None),
    ("auto", {}, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, None),  # sbatch script, no srun
    ("auto", {}, {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, {}),
    ("auto", {}, {"TPU_WORKER_HOSTNAMES": "w-0"}, None),
    ("tpu", {}, {}, {}),
    ("off", {}, SLURM, None),
])
def test_distributed_setup(mode, kwargs, environ, expected):
    assert distributed.distributed_setup(mode, environ=environ, **kwargs) == expected


@pytest.mark.parametrize("mode, kwargs, environ, match", [
    ("auto", {"coordinator_address": "h:1"}, {}, "give all of"),
    ("off", EXPLICIT, {}, "give all of"),
    ("auto", dict(EXPLICIT, process_id=4), {}, r"process_id=4 must be in \[0"),
    ("slurm", {}, {}, "srun"),
    ("mpi", {}, {}, "Unknown distributed mode"),
])
def test_distributed_setup_errors(mode, kwargs, environ, match):
    with pytest.raises(ValueError, match=match):
        distributed.distributed_setup(mode, environ=environ, **kwargs)


def test_one_process_does_not_start_the_distributed_runtime(monkeypatch):
    for name in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.initialize_distributed()
    assert not jax.distributed.is_initialized()


def test_preemption_watch_turns_sigterm_into_a_flag():
    before = signal.getsignal(signal.SIGTERM)
    with distributed.PreemptionWatch() as watch:
        assert not watch.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.reached(2)
    assert signal.getsignal(signal.SIGTERM) is before
