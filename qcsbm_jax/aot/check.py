"""Compiles every program of a job for a target and reports what each needs."""

import dataclasses
import time
from collections.abc import Callable

import jax
from absl import logging

from qcsbm_jax import config as config_lib, parallel, train
from qcsbm_jax.aot import analysis, fit, programs as programs_lib
from qcsbm_jax.aot.targets import GiB, Target


@dataclasses.dataclass
class ProgramReport:
    """One compiled program on one device of the target. Seconds are estimates."""
    name: str
    kind: str
    batch: int
    batch_per_device: float
    memory: analysis.Memory
    capacity: int
    work: analysis.Work  # per call: the cost program x repeats
    roofline_seconds: float
    xla_seconds: float | None
    repeats: float
    nfe_assumed: bool
    calls: int | None
    compile_seconds: float
    data_devices: int  # devices and processes the batch (last argument) is split over
    data_processes: int

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity

    @property
    def seconds(self) -> float:
        """The estimate used downstream: XLA's where it has one, else the roofline."""
        return self.xla_seconds or self.roofline_seconds

    @property
    def examples_per_second(self) -> float:
        return self.batch / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class JobReport:
    target: Target
    config_name: str
    programs: list[ProgramReport]
    fit: fit.Fit | None

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def training_seconds(self) -> float:
        return sum(p.seconds * (p.calls or 0) for p in self.programs if p.kind == "train")

    def chip_hours(self) -> float:
        return self.training_seconds() * self.target.num_chips / 3600


def mesh_for(config, devices) -> "parallel.Mesh":
    config_lib.check_devices(config, len(devices), len({d.process_index for d in devices}))
    return parallel.make_mesh(config.parallel.data_axis, config.parallel.model_axis,
                              devices=devices)


def compile_program(program: programs_lib.Program, target: Target, mesh,
                    capacity: int) -> ProgramReport:
    """Lowers and compiles one program (and its cost program) for the target."""
    start = time.perf_counter()
    lowered = program.fn.lower(*program.args)
    compiled = lowered.compile()
    memory = analysis.Memory.of(compiled)
    if program.cost_fn is None:
        lowered_cost, compiled_cost = lowered, compiled
    else:
        lowered_cost = program.cost_fn.lower(*program.cost_args)
        compiled_cost = lowered_cost.compile()
    work = analysis.work_of(lowered_cost, compiled_cost, mesh.size).scaled(program.repeats)
    batch_devices = jax.tree.leaves(compiled.input_shardings[0])[-1].device_set
    return ProgramReport(
        program.name, program.kind, program.batch, program.batch / mesh.size, memory,
        capacity, work,
        analysis.roofline_seconds(work, target.chip, program.dtype), work.xla_seconds,
        program.repeats, program.nfe_assumed, program.calls, time.perf_counter() - start,
        len(batch_devices), len({d.process_index for d in batch_devices}))


def check_job(config, target: Target, devices, *, config_name: str = "",
              ode_nfe: int = 200, evaluation: bool = True, find_batch: str = "estimate",
              hbm_fraction: float | None = None,
              progress: Callable[[str], None] = logging.info) -> JobReport:
    """Compiles the job's programs for the target (progress(message) before each), then
    with find_batch 'estimate' or 'verify' the largest per-device training batch that
    fits (fit.largest_batch); 'none' skips that. hbm_fraction: the share of each chip's
    memory the job may fill (analysis.usable_bytes)."""
    mesh = mesh_for(config, devices)
    capacity = analysis.usable_bytes(target.chip, hbm_fraction)
    model = train.build_training_model(config)
    programs = programs_lib.job_programs(config, mesh, model, ode_nfe, evaluation)
    reports = []
    for i, program in enumerate(programs):
        progress(f"[{i + 1}/{len(programs)}] compiling {program.name} for {target.name} "
                 f"(batch {program.batch})")
        reports.append(compile_program(program, target, mesh, capacity))
        progress(f"    {reports[-1].compile_seconds:.0f} s, "
                 f"{reports[-1].memory.total / GiB:.2f} GiB per device")
    found = None
    if find_batch != "none":
        def step_memory(step_config, batch: int | None = None) -> analysis.Memory:
            program = programs_lib.train_programs(step_config, model, mesh, batch)[0]
            return analysis.Memory.of(program.fn.lower(*program.args).compile())

        def accumulated(steps: int) -> analysis.Memory:
            progress(f"checking the suggestion grad_accum_steps={steps}: compiling")
            changed = config.copy_and_resolve_references()
            with changed.unlocked():
                changed.training.grad_accum_steps = steps
            return step_memory(changed)

        def memory_at(batch: int) -> analysis.Memory:
            return step_memory(config, batch)

        found = fit.largest_batch(
            config, mesh.size, target.num_hosts, capacity, memory_at, reports[0].memory,
            accumulated=accumulated, verify=find_batch == "verify", progress=progress)
    return JobReport(target, config_name, reports, found)
