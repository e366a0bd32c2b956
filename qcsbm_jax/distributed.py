"""Processes of a job: JAX's distributed runtime, and pre-emption notices.

A job is one process per host (TPU pods, one process per GPU node) or per device (one per
GPU under SLURM). `initialize_distributed` starts JAX's distributed runtime when, and only
when, the job has several processes; it must run before anything touches a backend.
Every process then runs the same program; collectives cross processes (CPU processes use
gloo over TCP), and a process that dies stops the others within the heartbeat timeout.
`PreemptionWatch` turns a pre-emption notice (SIGTERM) into one step at which every
process saves and stops.
"""

import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils

DISTRIBUTED_MODES = ("auto", "slurm", "tpu", "off")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def distributed_setup(mode: str = "auto", *, coordinator_address: str | None = None,
                      num_processes: int | None = None, process_id: int | None = None,
                      environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The jax.distributed.initialize arguments of this job, or None for one process.

    An explicit coordinator_address, num_processes and process_id (all three) win.
    Otherwise mode 'auto' recognises a SLURM job step (srun) with several tasks and a
    GKE TPU slice of several hosts (TPU_WORKER_HOSTNAMES); 'slurm' requires a SLURM job
    step (coordinator: the step's first node; one GPU per task, unless
    JAX_LOCAL_DEVICE_IDS lists more); 'tpu' is a Cloud TPU VM pod, whose layout JAX reads
    from the TPU metadata (no arguments); 'off' never initializes.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"Unknown distributed mode {mode!r}; valid: {DISTRIBUTED_MODES}.")
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if mode == "off" or any(v is None for v in explicit):
            raise ValueError(
                "For a multi-process job give all of --coordinator_address=HOST:PORT, "
                "--num_processes=N and --process_id=I (0 <= I < N, a different I for each "
                f"process) and leave --distributed at 'auto'; got coordinator_address="
                f"{coordinator_address}, num_processes={num_processes}, "
                f"process_id={process_id}, distributed={mode!r}.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                             f"{num_processes}).")
        if num_processes == 1:
            return None
        return dict(coordinator_address=coordinator_address, num_processes=num_processes,
                    process_id=process_id, cluster_detection_method="deactivate")
    in_slurm_step = all(v in environ for v in _SLURM_VARS)
    if mode == "slurm" and not in_slurm_step:
        raise ValueError(
            "--distributed=slurm needs a SLURM job step: start the processes with srun "
            f"(launch/run.sh slurm does); missing: {[v for v in _SLURM_VARS if v not in environ]}.")
    if mode == "slurm" or (mode == "auto" and in_slurm_step):
        return dict(cluster_detection_method="slurm") if int(environ["SLURM_NTASKS"]) > 1 else None
    gke_hosts = environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
    if mode == "tpu" or (mode == "auto" and len(gke_hosts) > 1):
        return {}
    return None


def initialize_distributed(mode: str = "auto", *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           heartbeat_timeout_s: int = 100) -> bool:
    """Starts JAX's distributed runtime if this job has several processes (see
    distributed_setup); returns whether it did. Call it before any JAX computation.

    heartbeat_timeout_s: a process that stops answering for this long counts as dead and
    every other process then exits with an error instead of waiting for it.
    """
    setup = distributed_setup(mode, coordinator_address=coordinator_address,
                              num_processes=num_processes, process_id=process_id)
    if setup is None:
        return False
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**setup, heartbeat_timeout_seconds=heartbeat_timeout_s)
    logging.info("Process %d of %d; %d local devices of %d.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


class PreemptionWatch:
    """Has a pre-emption notice (SIGTERM) reached this job? Every process gets the same answer.

    Several processes: JAX's preemption service catches SIGTERM on any process and picks
    a step that all of them reach (multihost_utils.reached_preemption_sync_point). One
    process: a SIGTERM handler sets a flag. Use as a context manager around a loop that
    calls reached(step) once per step, with increasing steps, on every process.
    """

    def __enter__(self) -> "PreemptionWatch":
        self._requested = False
        self._previous = None
        if not jax.distributed.is_initialized():
            if threading.current_thread() is threading.main_thread():
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            else:
                logging.warning("Not on the main thread: SIGTERM will not save a checkpoint.")
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._requested = True

    def reached(self, step: int) -> bool:
        if jax.distributed.is_initialized():
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
