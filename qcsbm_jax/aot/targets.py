"""Accelerator targets by the names users rent, and their compile-only devices.

A target is a slice of one chip type: `tpu:v5e-8`, `tpu:v4-32`, `gpu:h100x8`,
`gpu:2xh100x8` (hosts x GPUs). `devices(target)` returns the devices of JAX's compile-only
topology for it (libtpu, the CUDA PJRT plugin), so `jit(...).lower(...).compile()` runs
the accelerator's own compiler on a CPU machine; nothing executes.
"""

import dataclasses
import math
import os
import re
import sys

# The compile-only plugins (libtpu, the CUDA PJRT plugin) live outside site-packages, so
# that ordinary runs on a CPU machine never load them: launch/run.sh installs them here.
PLUGINS_DIR = os.environ.get("QCSBM_AOT_PLUGINS", os.path.join(sys.prefix, "aot-plugins"))


def add_plugins_to_path() -> None:
    """Makes the plugins importable; call before JAX initialises its backends."""
    if os.path.isdir(PLUGINS_DIR) and PLUGINS_DIR not in sys.path:
        sys.path.append(PLUGINS_DIR)

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (a TPU chip or one GPU) from its vendor's data sheet.

    hbm_bytes: memory per chip; peak_flops: dense FLOP/s per compute dtype as the compiler
    runs our float32 and bfloat16 programs (TPU: float32 matmuls run as one bfloat16 pass,
    XLA's default precision; GPU: TF32 tensor cores); bandwidth: HBM bytes/s.
    """
    name: str
    platform: str  # "tpu" or "cuda"
    hbm_bytes: int
    peak_flops: dict
    bandwidth: float
    source: str


# Vendor data sheets (dense, no sparsity):
#   Cloud TPU system architecture pages, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e};
#   NVIDIA H100 Tensor Core GPU datasheet (SXM5), NVIDIA H200 Tensor Core GPU datasheet.
CHIPS = {
    "v4": Chip("TPU v4", "tpu", 32 * GiB, {"float32": 275e12, "bfloat16": 275e12}, 1200e9,
               "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", "tpu", 16 * GiB, {"float32": 197e12, "bfloat16": 197e12}, 819e9,
                "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", "tpu", 95 * GiB, {"float32": 459e12, "bfloat16": 459e12}, 2765e9,
                "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", "tpu", 32 * GiB,
                {"float32": 918e12, "bfloat16": 918e12}, 1640e9,
                "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("NVIDIA H100 SXM5 80GB", "cuda", 80 * GiB,
                 {"float32": 494.7e12, "bfloat16": 989.4e12}, 3.35e12,
                 "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
    "h200": Chip("NVIDIA H200 SXM 141GB", "cuda", 141 * GiB,
                 {"float32": 494.7e12, "bfloat16": 989.4e12}, 4.8e12,
                 "NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
}

# TPU slice names count TensorCores for v4 and v5p (two per chip, one megacore device) and
# chips for v5e and v6e; chips per host as Cloud TPU VMs have them.
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_TPU_SIZES = {
    "v4": (8, 16, 32, 64, 128, 256, 512), "v5p": (8, 16, 32, 64, 128, 256, 512),
    "v5e": (1, 4, 8, 16, 32, 64, 128, 256), "v6e": (1, 4, 8, 16, 32, 64, 128, 256),
}
_GPU_NAME = re.compile(r"^(?:(\d+)x)?(h100|h200)x(\d+)$")
GPUS_PER_HOST = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Target:
    """A rented slice: `num_chips` chips of `chip` on `num_hosts` hosts (one process each)."""
    name: str
    chip: Chip
    num_chips: int
    num_hosts: int
    topology: str  # JAX's topology string
    kind: str  # the chip's key in CHIPS
    chips_per_host: tuple[int, int, int] | None = None  # TPU: the host's share of the torus


def valid_names() -> list[str]:
    tpus = [f"tpu:{kind}-{n}" for kind, sizes in _TPU_SIZES.items() for n in sizes]
    return tpus + ["gpu:h100x8", "gpu:h200x8", "gpu:[HOSTSx](h100|h200)x(1|2|4|8)"]


def _unknown(name: str) -> ValueError:
    return ValueError(f"Unknown target {name!r}; valid targets: {', '.join(valid_names())}.")


def _tpu_shape(kind: str, chips: int) -> tuple[str, tuple[int, int, int]]:
    """(topology dims, chips-per-host bounds) of a slice of `chips` chips."""
    if kind in ("v4", "v5p"):  # 3D torus, 4 chips (2x2x1) per host.
        dims = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
                128: (4, 4, 8), 256: (4, 8, 8)}[chips]
        return "x".join(map(str, dims)), (2, 2, 1)
    dims = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
            128: (8, 16), 256: (16, 16)}[chips]
    # v5e/v6e: slices up to 8 chips are one host; larger ones have 4 chips (2x2) per host.
    per_host = (*dims, 1) if chips <= 8 else (2, 2, 1)
    return "x".join(map(str, dims)), per_host


def parse(name: str) -> Target:
    """The Target of a name such as 'tpu:v5e-8' or 'gpu:2xh100x8'; ValueError otherwise."""
    platform, _, rest = name.partition(":")
    if platform == "tpu":
        kind, _, size = rest.partition("-")
        if kind not in _TPU_SIZES or not size.isdigit() or int(size) not in _TPU_SIZES[kind]:
            raise _unknown(name)
        chips = int(size) // _CORES_PER_CHIP[kind]
        dims, per_host = _tpu_shape(kind, chips)
        hosts = chips // math.prod(per_host)
        return Target(name, CHIPS[kind], chips, hosts, dims, kind, per_host)
    match = _GPU_NAME.match(rest) if platform == "gpu" else None
    if match is None or int(match.group(3)) not in GPUS_PER_HOST:
        raise _unknown(name)
    hosts, kind, per_host = int(match.group(1) or 1), match.group(2), int(match.group(3))
    return Target(name, CHIPS[kind], hosts * per_host, hosts, f"1x{hosts}x{per_host}", kind)


def devices(target: Target) -> list:
    """The compile-only devices of the target's topology (RuntimeError with the install
    command when the compiler plugin is missing)."""
    from jax.experimental import topologies

    if target.chip.platform == "tpu":
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # Several checks at once.
        options = dict(chips_per_host_bounds=target.chips_per_host, num_slices=1)
        if _CORES_PER_CHIP[target.kind] == 2:
            options["chip_config_name"] = "megacore"
        topology = _checked(lambda: topologies.get_topology_desc(
            topology_name=f"{target.kind}:{target.topology}", platform="tpu", **options),
            target)
    else:
        topology = _checked(lambda: topologies.get_topology_desc(
            platform="cuda", topology=target.topology,
            target_config=gpu_target_config(target.chip)), target)
    return list(topology.devices)


PLUGINS = {"tpu": "libtpu", "cuda": "jax-cuda12-plugin and jax-cuda12-pjrt"}


def _checked(make, target: Target):
    try:
        return make()
    except Exception as error:  # The plugins raise RuntimeError, ValueError or XlaRuntimeError.
        raise RuntimeError(
            f"Cannot build the compile-only topology of {target.name}: "
            f"{str(error).splitlines()[0]}. It needs {PLUGINS[target.chip.platform]} of "
            f"this JAX's version in {PLUGINS_DIR}; `bash launch/run.sh check` installs "
            "them there.") from error


# H100/H200 SXM device properties for XLA's GPU compiler (from the CUDA device query of
# compute capability 9.0 parts: 132 SMs at 1.98 GHz, 50 MiB L2, 228 KiB shared memory per
# SM); memory size and bandwidth come from the Chip.
_HOPPER = dict(threads_per_block_limit=1024, threads_per_warp=32,
               shared_memory_per_block=48 * 1024, shared_memory_per_core=228 * 1024,
               threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
               block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
               l2_cache_size=50 * 2**20, clock_rate_ghz=1.98,
               shared_memory_per_block_optin=227 * 1024, registers_per_core_limit=65536,
               registers_per_block_limit=65536)


def gpu_target_config(chip: Chip) -> str:
    """XLA's GpuTargetConfig (text proto) of a Hopper GPU with the chip's memory."""
    info = {**_HOPPER, "memory_bandwidth": int(chip.bandwidth),
            "device_memory_size": chip.hbm_bytes}
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (f'gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 minor: 0 }}\n}}\n'
            'platform_name: "CUDA"\n'
            'dnn_version_info { major: 9 minor: 8 }\n'
            'runtime_version { major: 12 minor: 8 }\n'
            f'device_description_str: "{chip.name}"\n')
