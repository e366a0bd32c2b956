"""What every benchmark shares: timing, the machine, config overrides, Markdown tables
and JSON, and the Bench of one (model, device count) that the suite's sections time.

Import after the CPU device count is set (JAX_NUM_CPU_DEVICES; benchmarks.run does).
"""

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from qcsbm_jax import api, config as config_lib, data, experiment, parallel, train
from qcsbm_jax.data import toy

# ---------------------------------------------------------------------------- timing

def seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of fn(), waiting for every array it returns."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def timed_first_call(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn()'s result, wall seconds of the call: compilation included on a first call)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls of fn()."""
    return statistics.median(seconds(fn) for _ in range(repeats))


def memory_mb(compiled) -> float | None:
    """XLA's per-device peak estimate of a compiled program (arguments + outputs +
    temporaries, less donated buffers), in MiB."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    return total / 2**20


def gflops(compiled) -> float | None:
    """XLA's count of floating-point operations of a compiled program (per device), 1e9."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / 1e9 if cost and "flops" in cost else None


def device_peak_mb(mesh) -> float | None:
    """The first device's peak memory in use so far (GPU / TPU memory_stats), in MiB."""
    stats = mesh.devices.flat[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20


# ---------------------------------------------------------------------------- the machine

def machine() -> dict:
    """Where a table ran: backend, devices, CPU and the load around the run."""
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return dict(backend=jax.default_backend(), device_kind=device.device_kind,
                device_count=jax.device_count(), cpu=cpu, cpu_count=os.cpu_count(),
                jax=jax.__version__, python=platform.python_version(),
                load_average=os.getloadavg())


def print_machine(info: dict) -> None:
    """One header line: date, backend, devices, CPU and load average."""
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')} on {info['backend']} "
          f"({info['device_kind']} x{info['device_count']}; {info['cpu']}, "
          f"{info['cpu_count']} cores), load average {info['load_average']}", flush=True)


def flat_leaves(tree) -> jax.Array:
    """Every leaf of a pytree (e.g. a parameter gradient) raveled into one vector."""
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


# ---------------------------------------------------------------------------- tables, JSON

def cell(value) -> str:
    """A table cell: 3 significant digits, whole numbers from 100, '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-2 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, result) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


# ---------------------------------------------------------------------------- overrides

def _check_key(config: ml_collections.ConfigDict, text: str) -> None:
    """ValueError unless text is 'a.b=value' with a key a.b of config."""
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--override wants key=value, e.g. loss.qc_weight=0.1; got {text!r}.")
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "the top level"
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            raise ValueError(f"--override {text}: unknown config key {part!r} under {where}; "
                             f"valid keys there: {valid}.")
        node = node[part]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]
                    ) -> ml_collections.ConfigDict:
    """A validated copy of config with 'a.b=value' overrides, each value parsed to the type
    of the config's value by the parser of the main program's --config.a.b=value flags.
    A bad override raises ValueError naming it and what is wrong."""
    config = config.copy_and_resolve_references()
    for text in overrides:
        _check_key(config, text)
    argv = ["benchmark"] + [f"--config.{text}" for text in overrides]
    values = flags.FlagValues()
    try:  # Defining the flag reads argv's override keys; calling values parses them.
        holder = config_flags.DEFINE_config_dict("config", config, flag_values=values,
                                                 sys_argv=argv)
        values(argv)
    except flags.Error as error:
        raise ValueError(f"--override: {error}.") from None
    config_lib.validate(holder.value)
    return holder.value


# ---------------------------------------------------------------------------- models

@dataclasses.dataclass(frozen=True)
class Sizes:
    """Batch sizes and lengths of one run tier of a model."""
    train_batches: tuple[int, ...]
    sample_batch: int
    pc_steps: int
    accuracy_batch: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its config, the penalty weight of its QC train variants, the
    variants it runs by default and its sizes per tier ('quick': --quick; 'cpu' and
    'accelerator': full runs on that backend)."""
    config: Callable[[], ml_collections.ConfigDict]
    qc_weight: float
    variants: tuple[str, ...] | None  # None: every variant (benchmarks.training.VARIANTS)
    sizes: dict[str, Sizes]


_IMAGE_VARIANTS = ("dsm", "qc_nonneg", "qc_jvp_vjp", "qc_two_vjp", "qc_nonneg_separate",
                   "qc_nonneg_jvpgrad", "qc_nonneg_frac25", "qc_nonneg_every4",
                   "qc_nonneg_remat")
MODELS = {
    "toy": ModelSpec(
        lambda: config_lib.toy_config("checkerboard", "usbm"), 0.1, None,
        dict(quick=Sizes((256,), 256, 20, 64), cpu=Sizes((5000,), 5000, 1000, 2000),
             accelerator=Sizes((5000,), 5000, 1000, 2000))),
    "ncsnpp_smoke": ModelSpec(
        lambda: config_lib.image_config("cifar10", "usbm", "smoke"), 1e-4, _IMAGE_VARIANTS,
        dict(quick=Sizes((8,), 8, 2, 4), cpu=Sizes((8,), 8, 20, 4),
             accelerator=Sizes((128,), 128, 100, 16))),
    "ncsnpp_small": ModelSpec(
        lambda: config_lib.image_config("cifar10", "usbm", "small"), 1e-4, _IMAGE_VARIANTS,
        dict(quick=Sizes((8,), 8, 2, 4), cpu=Sizes((64,), 16, 20, 16),
             accelerator=Sizes((128,), 128, 100, 16))),
    "ncsnpp_deep": ModelSpec(
        lambda: config_lib.image_config("cifar10", "usbm"), 1e-4,
        ("dsm", "qc_nonneg", "qc_nonneg_jvpgrad", "qc_jvp_vjp", "qc_two_vjp",
         "qc_nonneg_frac25", "qc_nonneg_every4", "qc_nonneg_remat"),
        dict(quick=Sizes((1,), 1, 1, 2), cpu=Sizes((4,), 2, 2, 4),
             accelerator=Sizes((32, 128), 128, 100, 16))),
}


def round_up(batch: int, multiple: int) -> int:
    return -(-batch // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Bench:
    """What every section needs for one (model, device count): the config with the run's
    overrides, the model built from it as evaluation and sampling build it (float32) and
    as training does (train_model: training.compute_dtype), a data-parallel mesh over the
    first devices, and the tier's sizes."""
    name: str
    spec: ModelSpec
    config: ml_collections.ConfigDict
    model: experiment.ScoreModel
    train_model: experiment.ScoreModel
    mesh: jax.sharding.Mesh
    quick: bool
    tier: str

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    @property
    def sizes(self) -> Sizes:
        return self.spec.sizes[self.tier]

    @property
    def is_image(self) -> bool:
        return data.of(self.config).kind == data.IMAGE

    def data(self, batch: int, seed: int = 0) -> np.ndarray:
        """Clean data [batch, *shape] in the model's range: toy samples, or uniform noise
        images (timings do not depend on the values)."""
        key = jax.random.key(seed)
        if not self.is_image:
            return np.asarray(toy.sample_toy(self.config.data.name, key, batch))
        low = -1.0 if self.config.data.centered else 0.0
        return np.asarray(jax.random.uniform(key, (batch, *self.model.data_shape),
                                             minval=low, maxval=1.0))

    def shard(self, array) -> jax.Array:
        return jax.device_put(array, parallel.data_sharding(self.mesh))

    def params(self):
        return jax.device_put(self.model.init_params, parallel.replicated(self.mesh))

    def user_run(self, batch_size: int, **section_settings) -> api.Run:
        """The object qcsbm_jax.load returns, over this mesh with the initial parameters:
        its sample and log_likelihood build the programs every mode runs. batch_size: the
        largest batch of one program (config.sampling and config.eval); section_settings:
        'group.key' -> value of the config (e.g. tolerances of a --quick run)."""
        config = self.config.copy_and_resolve_references()
        config.sampling.batch_size = config.eval.batch_size = batch_size
        config.update_from_flattened_dict(section_settings)
        return api.Run(config, self.model, self.params(), 0, self.mesh)

    def row(self, section: str, **values) -> dict:
        return dict(section=section, model=self.name, devices=self.devices, **values)


def tier(quick: bool) -> str:
    if quick:
        return "quick"
    return "cpu" if jax.default_backend() == "cpu" else "accelerator"


def make_bench(name: str, n_devices: int, quick: bool, overrides: Sequence[str] = ()
               ) -> Bench:
    """The Bench of model `name` on the first n_devices devices, overrides applied."""
    if n_devices > jax.device_count():
        raise SystemExit(f"--devices {n_devices}: only {jax.device_count()} devices; on CPU "
                         "set JAX_NUM_CPU_DEVICES (python -m benchmarks.run does).")
    spec = MODELS[name]
    try:
        config = apply_overrides(spec.config(), overrides)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    mesh = parallel.make_mesh(devices=jax.devices()[:n_devices])
    model = experiment.build_score_model(config)
    train_model = (model if config.training.compute_dtype == "float32"
                   else train.build_training_model(config))
    return Bench(name, spec, config, model, train_model, mesh, quick, tier(quick))
