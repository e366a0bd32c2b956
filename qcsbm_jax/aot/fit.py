"""The largest training batch a target holds, and settings that make a job fit.

A train step's memory per device is close to linear in its per-device batch b:
total(b) = fixed + b * per_example (parameters, optimizer state and code are fixed; the
activations grow with b). Two compiles, at b and 2b, give both terms; the largest b that
fits follows, and with verify one more compile at that b confirms it.
"""

import dataclasses
import math
from collections.abc import Callable

from qcsbm_jax.aot import analysis
from qcsbm_jax.aot.targets import GiB


@dataclasses.dataclass(frozen=True)
class Fit:
    """per_device_batch: the largest that fits (0: not even one example); verified: a
    compile at that batch fitted; suggestions: --config flags, each with its estimated
    memory, for a job that does not fit (empty when it does)."""
    per_device_batch: int
    verified: bool
    fixed_bytes: float
    bytes_per_example: float
    suggestions: tuple[str, ...]


UNBOUNDED = 1 << 20  # _largest when memory does not grow with the batch.


def _largest(fixed: float, per_example: float, capacity: int) -> int:
    if per_example <= 0:
        return 0 if fixed > capacity else UNBOUNDED
    return max(0, math.floor((capacity - fixed) / per_example))


def _accumulation_steps(batch: int, num_devices: int, largest: int) -> list[int]:
    """The k > 1 whose micro-batches split over the devices and fit by the linear model."""
    return [k for k in range(2, batch + 1) if batch % k == 0
            and (batch // k) % num_devices == 0 and batch / k / num_devices <= largest]


def suggestions(config, num_devices: int, num_hosts: int, memory: analysis.Memory,
                fixed: float, per_example: float, capacity: int,
                accumulated: Callable[[int], analysis.Memory] | None = None,
                memory_at: Callable[[int], analysis.Memory] | None = None
                ) -> tuple[str, ...]:
    """Settings that would fit (none if the job fits as it is), confirmed by compiles
    where the callables are given: accumulated(k), the train step's memory with
    grad_accum_steps k (its scan adds a gradient accumulator and copies of the batch);
    memory_at(batch), with that global batch."""
    if memory.total <= capacity:
        return ()
    batch, accumulation = config.training.batch_size, config.training.grad_accum_steps
    gib = lambda b: f"{b / GiB:.2f} GiB"
    out = []
    largest = _largest(fixed, per_example, capacity)
    if accumulation == 1:
        for k in _accumulation_steps(batch, num_devices, largest)[:3]:
            if accumulated is None:
                estimate, how = fixed + batch / k / num_devices * per_example, "about "
            else:
                estimate, how = accumulated(k).total, "compiled: "
            if estimate <= capacity:
                out.append(f"--config.training.grad_accum_steps={k} (same batch; {how}"
                           f"{gib(estimate)})")
                break
    step = math.lcm(num_devices, num_hosts) * accumulation
    fitting = (largest * num_devices * accumulation) // step * step
    estimate = fixed + fitting / accumulation / num_devices * per_example
    how = "about "
    if memory_at is not None:  # Memory is not quite linear in the batch: confirm, step down.
        how = "compiled: "
        for _ in range(4):
            if fitting < step or (estimate := memory_at(fitting).total) <= capacity:
                break
            fitting = int(fitting * 0.8) // step * step
    if fitting >= step and estimate <= capacity:
        out.append(f"--config.training.batch_size={fitting} ({how}{gib(estimate)})")
    sharded = memory.arguments + memory.outputs - memory.aliased
    model_axis = config.parallel.model_axis
    for m in (2, 4, 8):
        splits = num_devices % m == 0 and (batch // accumulation) % (num_devices // m) == 0
        if m > model_axis and splits:
            estimate = memory.total - sharded * (1 - model_axis / m)
            if estimate <= capacity:
                out.append(f"--config.parallel.model_axis={m} (parameters and optimizer "
                           f"state sharded; about {gib(estimate)})")
                break
    if config.loss.get("remat", "none") == "none":
        out.append("--config.loss.remat=dots (recomputes activations; not estimated)")
    if config.training.compute_dtype == "float32":
        out.append("--config.training.compute_dtype=bfloat16 (not estimated)")
    return tuple(out)


def largest_batch(config, num_devices: int, num_hosts: int, capacity: int,
                  memory_at: Callable[[int], analysis.Memory], first: analysis.Memory,
                  *, accumulated: Callable[[int], analysis.Memory] | None = None,
                  verify: bool = False, progress: Callable[[str], None] = print) -> Fit:
    """Fit of the training micro-batch. memory_at(global batch) compiles the train step
    there; first: its memory at the config's batch; accumulated: see suggestions."""
    accumulation = config.training.grad_accum_steps
    b0 = config.training.batch_size // accumulation // num_devices
    progress(f"finding the largest batch: compiling the train step at {2 * b0} per device")
    second = memory_at(2 * b0 * num_devices * accumulation)
    per_example = (second.total - first.total) / b0
    fixed = first.total - b0 * per_example
    largest, verified = _largest(fixed, per_example, capacity), False
    if verify and 0 < largest < UNBOUNDED and largest not in (b0, 2 * b0):
        progress(f"verifying: compiling the train step at {largest} per device")
        while largest > 0 and memory_at(largest * num_devices * accumulation).total > capacity:
            largest = math.floor(largest * 0.9)
        verified = largest > 0
    elif largest in (b0, 2 * b0):
        verified = True
    return Fit(largest, verified, fixed, per_example,
               suggestions(config, num_devices, num_hosts, first, fixed, per_example,
                           capacity, accumulated, memory_at))
