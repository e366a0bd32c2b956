"""What a compiled program needs on one device: memory, work and estimated time.

Memory comes from the accelerator compiler's buffer assignment (memory_analysis). Work
(flops, bytes accessed) comes from XLA's cost analysis: the TPU compiler's own for TPU;
for GPU, XLA's generic HLO cost analysis, which counts cuBLAS/cuDNN custom calls as no
flops, so the flops of the module before optimisation (divided over the devices) are taken
where larger. Both count a loop body once; callers scale by trip counts they know. Times
are estimates: XLA's TPU cost model where it gives one, and always a roofline
max(flops / peak, bytes / bandwidth) from the chip's data sheet.
"""

import dataclasses
import os

import jax
from jax._src.lib import _jax  # XLA's HLO cost analysis (no public API for a GPU module).

from qcsbm_jax.aot.targets import Chip

# Share of a chip's HBM a job may fill. TPU: the runtime keeps a little. GPU: JAX
# preallocates XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the memory and allocates
# everything from that pool.
TPU_USABLE = 0.95
GPU_DEFAULT_FRACTION = 0.75


def usable_bytes(chip: Chip, fraction: float | None = None) -> int:
    """The bytes per chip a job may fill: `fraction` of its HBM, by default the above."""
    if fraction is None and chip.platform == "tpu":
        fraction = TPU_USABLE
    elif fraction is None:
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                        GPU_DEFAULT_FRACTION))
    return int(fraction * chip.hbm_bytes)


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device. total = arguments + outputs - aliased + temporaries + code."""
    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes,
                   m.alias_size_in_bytes, m.generated_code_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Work:
    """Per device and call: flops, HBM bytes accessed, XLA's time estimate (s) or None."""
    flops: float
    bytes_accessed: float
    xla_seconds: float | None

    def scaled(self, factor: float) -> "Work":
        xla = None if self.xla_seconds is None else self.xla_seconds * factor
        return Work(self.flops * factor, self.bytes_accessed * factor, xla)


def _cpu_cost(module) -> dict:
    return _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)


def work_of(lowered, compiled, num_devices: int) -> Work:
    """Per-device work of one call of a program lowered and compiled for a target."""
    costs = compiled.cost_analysis()
    if costs:  # TPU: the compiler's own analysis of the partitioned program.
        seconds = costs.get("optimal_seconds", -1.0)
        return Work(costs.get("flops", 0.0), costs.get("bytes accessed", 0.0),
                    seconds if seconds > 0 else None)
    optimised = _cpu_cost(compiled.runtime_executable().hlo_modules()[0])
    before = _cpu_cost(lowered.compiler_ir("hlo").as_hlo_module())
    flops = max(optimised.get("flops", 0.0), before.get("flops", 0.0) / num_devices)
    return Work(flops, optimised.get("bytes accessed", 0.0), None)


def roofline_seconds(work: Work, chip: Chip, dtype: str) -> float:
    """The roofline time of `work`: bound by the chip's peak flops or its bandwidth."""
    return max(work.flops / chip.peak_flops[dtype], work.bytes_accessed / chip.bandwidth)

