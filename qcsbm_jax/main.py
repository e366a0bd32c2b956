"""Command line: python -m qcsbm_jax.main --config CONFIG[:VARIANT] --workdir DIR --mode MODE.

Modes:
  train   train, resuming from DIR's newest checkpoint; --config.training.init_from=RUN
          starts from another run's parameters (the QC fine-tune of a trained USBM)
  eval    metrics of the newest checkpoint into DIR/eval (metrics.json, plots, samples)
  sample  --config.sampling.num_samples samples with --config.sampling.method into
          DIR/samples/<method>.npz and .png
  all     train, then eval, then sample
Configs (configs/): toy/<gaussians8|spirals2|checkerboard>_<csbm|usbm|qcsbm>.py (the
paper's 2D runs), <cifar10|cifar100|svhn|imagenet32|fashion_mnist>_<family>_ncsnpp.py and
cifar10_usbm_ddpmpp.py (images), with variants:
  (none)  the paper's settings
  :small  images: a small network for a CPU proof run
  :smoke  a tiny model and a few steps, to check that everything runs
Samplers (--config.sampling.method): pc, ode (adaptive RK45), euler, heun,
edm_stochastic, dpm_solver_2m, euler_maruyama (sampling.num_steps).
Typical CPU times of the toy configs and the :smoke and :small variants: docs/usage.md.
The paper's image settings need an accelerator.
Any config value can be overridden with --config.a.b=value; an unknown key or a value of
the wrong type is one line that says so. The config, the devices and DIR are checked
before anything is built or written. DIR may be a local path or a gs:// URL; one training
at a time holds it (DIR/training.lock), and damaged checkpoints are set aside
(docs/robustness.md). Every run ends with a list of where its outputs are.

Several processes (hosts) run the same command; JAX's distributed runtime starts when the
job has several: on a TPU pod (--distributed=tpu), under srun (detected), or with
--coordinator_address, --num_processes and --process_id. A pre-empted run (SIGTERM) saves
a checkpoint and exits with status 143 (train.PREEMPTED_EXIT_CODE); rerun to resume.
"""

import importlib.util
import logging as std_logging
import os
import signal
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/toy/gaussians8_qcsbm.py[:smoke].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "all"], "What to run.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "slurm", "tpu", "off"],
    "Multi-process set-up: auto (the explicit flags below, a SLURM step with several tasks, "
    "or a GKE TPU slice), slurm (srun), tpu (Cloud TPU VM pod), off (one process).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for an explicit multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, 0 .. num_processes-1.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100,
    "Multi-process jobs: seconds after which a silent process counts as dead and the "
    "others stop with an error.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietCheckpointing(std_logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietCheckpointing())
    # Imported here so that `--help` and flag errors are instant.
    from qcsbm_jax import distributed

    try:  # Before anything touches a JAX backend.
        distributed.initialize_distributed(
            _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
            heartbeat_timeout_s=_HEARTBEAT.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    import jax
    from qcsbm_jax import checkpoint, config as config_lib, workdir_lock

    config = _CONFIG.value
    try:  # Everything is checked before anything is built or written.
        config_lib.validate(config)
        config_lib.check_devices(config, jax.device_count(), jax.process_count())
        workdir = _prepare_workdir(_WORKDIR.value)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    try:  # These errors say all there is to say; no traceback.
        _run_mode(_MODE.value, config, workdir)
    except (checkpoint.CheckpointError, workdir_lock.WorkdirLockedError) as error:
        raise SystemExit(str(error)) from None


def _run_mode(mode: str, config, workdir: str) -> None:
    from qcsbm_jax import train
    from qcsbm_jax.evaluation import runner

    outputs = []
    if mode in ("train", "all"):
        state = train.train(config, workdir)
        outputs.append(f"checkpoints (step {int(state.step)}): "
                       f"{os.path.join(workdir, 'checkpoints')}; TensorBoard logs: {workdir}")
    # Only training saves on SIGTERM; from here on SIGTERM simply ends the program (in a
    # multi-process job JAX's pre-emption service would otherwise catch and ignore it).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if mode in ("eval", "all"):
        metrics = runner.evaluate(config, workdir)
        logging.info("Metrics: %s", metrics)
        outputs.append(f"metrics and plots: {os.path.join(workdir, config.eval.output_dir)} "
                       "(metrics.json)")
    if mode in ("sample", "all"):
        path = runner.sample(config, workdir)
        outputs.append(f"samples: {path} and {path[:-len('.npz')]}.png")
    logging.info("Done. Outputs:\n  %s", "\n  ".join(outputs))


def _prepare_workdir(workdir: str) -> str:
    """The workdir, made absolute and created, after checking that it is a directory this
    process can write in (URLs such as gs://bucket/run are kept as they are)."""
    if "://" in workdir:
        return workdir
    workdir = os.path.abspath(workdir)
    flag = f"--workdir={workdir}"
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"{flag} is a file, not a directory; give a directory (it is "
                         "created if missing).")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise ValueError(f"{flag} is not a directory this process can write in "
                         f"({error.strerror or error}); fix its permissions or choose "
                         "another.") from None
    return workdir


def _load_config_file(spec: str):
    """Loads 'path/to/config.py[:variant]' the way --config does."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_qcsbm_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _config_spec(argv: list[str]) -> str | None:
    """The --config file spec ('path.py[:variant]') of a command line."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv:
        spec = argv[argv.index("--config") + 1]
    return spec


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
    """(key 'a.b', value text) of every --config.a.b=value."""
    return [tuple(a[len("--config."):].split("=", 1)) for a in argv
            if a.startswith("--config.") and "=" in a]


def _value_at(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _unknown_override_message(argv: list[str]) -> str | None:
    """Names the first --config.a.b override whose key does not exist, with valid keys."""
    spec = _config_spec(argv)
    if spec is None:
        return None
    config = _load_config_file(spec)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, parts = config, arg[len("--config."):].split("=", 1)[0].split(".")
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(parts[:depth]) or "the top level"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return (f"Unknown config key --config.{'.'.join(parts)}: {part!r} does not "
                        f"exist under {where}. Valid keys there: {valid}.")
            node = node[part]
    return None


def _expected_type(value) -> str:
    """How to write a value like the config's `value` on the command line."""
    if isinstance(value, bool):
        return "true or false"
    if type(value) in (int, float, str):
        return {int: "an integer", float: "a number", str: "a string"}[type(value)]
    if isinstance(value, tuple):
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        kinds = " and ".join(sorted({plural.get(type(v), "values") for v in value}))
        return f"a tuple of {kinds or 'values'}, such as {value!r}"
    return type(value).__name__


def _wrong_type_message(key: str, value: str, default) -> str:
    if hasattr(default, "keys"):
        return (f"--config.{key}={value} has the wrong type: {key} is a group of settings; "
                f"set them one by one, e.g. --config.{key}.{min(default)}=...")
    return (f"--config.{key}={value} has the wrong type: {key} takes "
            f"{_expected_type(default)}.")


def _tuple_elements_fit(value: tuple, default: tuple) -> bool:
    """absl checks scalar overrides, not the elements of a tuple: ('abc',) parses."""
    kinds = {type(d) for d in default}
    return not kinds or all(type(v) in kinds or (type(v) is int and float in kinds)
                            for v in value)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one clear line for a misspelt --config.* key or a value of
    the wrong type (naming the key, the value and the type the key takes)."""
    try:
        remaining = flags.FLAGS(argv)
    except (KeyError, AttributeError) as error:
        message = _unknown_override_message(argv)
        raise SystemExit(message or f"Bad command-line flag: {error}") from None
    except flags.IllegalFlagValueError as error:
        flag = str(error).removeprefix("flag --").split("=", 1)[0]
        spec = _config_spec(argv)
        for key, value in _overrides(argv):
            if f"config.{key}" == flag and spec is not None:
                default = _value_at(_load_config_file(spec), key)
                raise SystemExit(_wrong_type_message(key, value, default)) from None
        raise SystemExit(f"Bad command-line flag: {error}") from None
    tuples = [(key, value) for key, value in _overrides(argv) if _CONFIG.value is not None
              and isinstance(_value_at(_CONFIG.value, key), tuple)]
    if tuples:  # Only then is the config file loaded a second time.
        defaults = _load_config_file(_config_spec(argv))
        for key, value in tuples:
            default = _value_at(defaults, key)
            if not _tuple_elements_fit(_value_at(_CONFIG.value, key), default):
                raise SystemExit(_wrong_type_message(key, value, default))
    return remaining


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
