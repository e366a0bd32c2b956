"""Command line: python -m qcsbm_jax.aot --config CONFIG[:VARIANT] --target TARGET.

Compiles every program of the job CONFIG describes for TARGET (e.g. tpu:v5e-8,
gpu:h100x8) on this machine, without the accelerator, and prints what each needs per
device: memory against the chip's HBM, flops, bytes and estimated times; then the
training's estimated wall time and chip-hours and the largest batch that fits.
--config.a.b=value overrides as for qcsbm_jax.main. Writes the report as JSON (--json).
Exit status: 0 the job fits, 3 it does not (the table says what would), 2 bad input.
Reports are cached by the command and the code they compiled (--cache_dir).
"""

import hashlib
import json
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/cifar10_qcsbm_ncsnpp.py[:smoke].",
    lock_config=True)
_TARGET = flags.DEFINE_string("target", None, "e.g. tpu:v5e-8, tpu:v4-32, gpu:h100x8, "
                              "gpu:2xh100x8 (hosts x GPUs).")
_JSON = flags.DEFINE_string("json", "", "Where to write the JSON report (default: none).")
_ODE_NFE = flags.DEFINE_integer("ode_nfe", 200, "Score evaluations per example assumed for "
                                "the adaptive ODE solves (sampler 'ode', likelihood).")
_FIND_BATCH = flags.DEFINE_enum(
    "find_batch", "estimate", ["none", "estimate", "verify"],
    "Largest training batch: none; estimate (one more compile); verify (and a compile "
    "at the estimate).")
_HBM_FRACTION = flags.DEFINE_float(
    "hbm_fraction", None, "Share of each chip's memory the job may fill (default: 0.95 on "
    "TPU; on GPU XLA_PYTHON_CLIENT_MEM_FRACTION, else JAX's 0.75).")
_TRAIN_ONLY = flags.DEFINE_bool("train_only", False, "Compile the train step(s) only.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "qcsbm_jax", "aot"),
    "Cached reports; '' turns the cache off.")
flags.mark_flags_as_required(["config", "target"])

NOT_FITTING_EXIT_CODE = 3


def _code_hash(config_file: str) -> str:
    """sha256 of the package's sources and the config file: what a report depends on."""
    digest = hashlib.sha256()
    package = pathlib.Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")) + [pathlib.Path(config_file)]:
        digest.update(str(path.relative_to(path.anchor)).encode())
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def _cache_path(argv: list[str]) -> str | None:
    if not _CACHE_DIR.value:
        return None
    import jax
    config_file = flags.FLAGS["config"].config_filename.split(":")[0]
    key = json.dumps([sorted(a for a in argv[1:] if not a.startswith("--json")),
                      _CONFIG.value.to_json(), jax.__version__, _code_hash(config_file)])
    return os.path.join(_CACHE_DIR.value, hashlib.sha256(key.encode()).hexdigest() + ".json")


def _fail(error: Exception) -> None:
    print(f"qcsbm_jax.aot: {error}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    from qcsbm_jax import config as config_lib
    from qcsbm_jax.aot import check, report, targets
    from qcsbm_jax.evaluation import outputs

    try:
        target = targets.parse(_TARGET.value)
        config_lib.validate(_CONFIG.value)
    except ValueError as error:
        _fail(error)
    cached = _cache_path(sys.argv)
    if cached and os.path.exists(cached):
        with open(cached) as f:
            saved = json.load(f)
        print(saved["table"])
        print(f"(cached report: {cached})")
        if _JSON.value:
            outputs.write_json(_JSON.value, saved["report"])
        return 0 if saved["report"]["fits"] else NOT_FITTING_EXIT_CODE
    try:
        devices = targets.devices(target)
        job = check.check_job(
            _CONFIG.value, target, devices, config_name=flags.FLAGS["config"].config_filename,
            ode_nfe=_ODE_NFE.value, evaluation=not _TRAIN_ONLY.value,
            find_batch=_FIND_BATCH.value, hbm_fraction=_HBM_FRACTION.value,
            progress=lambda m: print(m, flush=True))
    except (ValueError, RuntimeError) as error:
        _fail(error)
    text, values = report.table(job), report.as_json(job)
    print(text)
    if _JSON.value:
        outputs.write_json(_JSON.value, values)
        print(f"JSON: {_JSON.value}")
    if cached:
        outputs.write_json(cached, {"table": text, "report": values})
    return 0 if job.fits else NOT_FITTING_EXIT_CODE


def run() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Compile-only: nothing runs on a device.
    from qcsbm_jax.aot import targets
    targets.add_plugins_to_path()
    logging.set_verbosity(logging.WARNING)
    app.run(main)


if __name__ == "__main__":
    run()
