"""Ahead-of-time compilation for TPU and GPU targets on this CPU machine (qcsbm_jax.aot).

These compile with the real accelerator compilers (libtpu, the CUDA PJRT plugin) that
launch/run.sh installs; without them the tests fail, never skip.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from qcsbm_jax import config as config_lib
from qcsbm_jax.aot import check, targets
from test_launch import OUR_VENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = "configs/toy/gaussians8_qcsbm.py"
IMAGE = "configs/cifar10_qcsbm_ncsnpp.py"


def load(path: str, variant: str = "smoke", **overrides):
    spec = importlib.util.spec_from_file_location("_aot_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    with config.unlocked():
        for key, value in overrides.items():
            section, name = key.split(".")
            config[section][name] = value
    config_lib.validate(config)
    return config


def job(target: str, config, **options):
    target = targets.parse(target)
    options.setdefault("find_batch", "none")
    return check.check_job(config, target, targets.devices(target), progress=lambda m: None,
                           **options)


def test_target_names_give_the_rented_slices():
    v4 = targets.parse("tpu:v4-8")  # v4 names count TensorCores: 4 chips, one host.
    assert (v4.num_chips, v4.num_hosts, v4.topology) == (4, 1, "2x2x1")
    v5e = targets.parse("tpu:v5e-256")
    assert (v5e.num_chips, v5e.num_hosts) == (256, 64)
    assert targets.parse("tpu:v5e-8").num_hosts == 1
    gpus = targets.parse("gpu:2xh100x8")
    assert (gpus.num_chips, gpus.num_hosts, gpus.chip.hbm_bytes) == (16, 2, 80 * 2**30)


@pytest.mark.parametrize("name", ["tpu:v5e-3", "gpu:a100x8", "v5e-8", "tpu:v7-8"])
def test_an_unknown_target_is_one_message_listing_the_valid_ones(name):
    with pytest.raises(ValueError, match=r"Unknown target .*valid targets: tpu:v4-8, .*gpu:h100x8"):
        targets.parse(name)


@pytest.fixture(scope="module")
def toy_jobs():
    return {name: job(name, load(TOY)) for name in ("tpu:v5e-8", "gpu:h100x8")}


@pytest.mark.parametrize("name", ["tpu:v5e-8", "gpu:h100x8"])
def test_every_program_of_a_toy_job_compiles_with_its_needs(toy_jobs, name):
    report = toy_jobs[name]
    assert [p.name for p in report.programs] == ["train step", "sampler ode", "likelihood"]
    for p in report.programs:
        assert p.memory.arguments > 0 and p.memory.total > 0 and p.fits
        assert p.work.flops > 0 and p.work.bytes_accessed > 0 and p.roofline_seconds > 0
        assert (p.data_devices, p.batch_per_device) == (8, 32)
    train = report.programs[0]
    assert train.memory.aliased > 0  # The state is donated.
    assert report.training_seconds() == pytest.approx(train.seconds * 60)
    if name.startswith("tpu"):
        assert train.xla_seconds is not None and train.xla_seconds > 0


def test_tpu_and_gpu_count_the_same_train_step_flops(toy_jobs):
    """XLA's GPU analysis counts cuBLAS calls as no flops; ours adds them back."""
    tpu, gpu = (toy_jobs[n].programs[0].work.flops for n in ("tpu:v5e-8", "gpu:h100x8"))
    assert 0.8 < gpu / tpu < 1.25


def test_model_axis_2_halves_the_arguments_per_device():
    """With wide layers (small arrays are padded to TPU tiles and barely shrink)."""
    wide = {"model.widths": (1024, 1024, 1024)}
    one, two = (job("tpu:v5e-8", load(TOY, **wide, **{"parallel.model_axis": m}),
                    evaluation=False).programs[0].memory.arguments for m in (1, 2))
    assert 0.45 < two / one < 0.6


def test_the_largest_batch_follows_from_memory_that_grows_with_the_batch():
    report = job("tpu:v5e-8", load(TOY), evaluation=False, find_batch="estimate")
    fit = report.fit
    assert fit.bytes_per_example > 0 and fit.per_device_batch > 32 and not fit.suggestions


def test_a_job_too_large_is_refused_with_settings_that_fit():
    """On a chip given 90% of what the job needs (--hbm_fraction); a batch large enough
    for the activations to dominate (small toy batches are not monotonic in memory)."""
    large = {"model.widths": (512, 512, 512), "training.batch_size": 16384}
    config = load(TOY, **large)
    needs = job("gpu:h100x8", config, evaluation=False, find_batch="estimate")
    capacity = 0.9 * needs.programs[0].memory.total
    fraction = capacity / targets.parse("gpu:h100x8").chip.hbm_bytes
    refused = job("gpu:h100x8", config, evaluation=False, find_batch="estimate",
                  hbm_fraction=fraction)
    assert not refused.fits and needs.programs[0].memory.total > refused.programs[0].capacity
    smaller = [s for s in refused.fit.suggestions if "training.batch_size" in s]
    assert smaller, refused.fit.suggestions
    batch = int(smaller[0].split("=")[1].split()[0])
    fitted = job("gpu:h100x8", load(TOY, **{**large, "training.batch_size": batch}),
                 evaluation=False, hbm_fraction=fraction)
    assert fitted.fits and 8192 <= batch < 16384 and "compiled: " in smaller[0]


def test_a_16_process_tpu_slice_splits_the_batch_over_its_processes():
    report = job("tpu:v4-128", load(TOY), evaluation=False)
    train = report.programs[0]
    assert report.target.num_hosts == 16
    assert (train.data_devices, train.data_processes, train.batch_per_device) == (64, 16, 4)


@pytest.mark.parametrize("name", ["tpu:v5e-8", "gpu:h100x8"])
def test_the_image_train_step_compiles(name):
    report = job(name, load(IMAGE), evaluation=False)
    train = report.programs[0]
    assert train.fits and train.work.flops > 1e8 and train.memory.temporaries > 0


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "qcsbm_jax.aot", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_the_command_line_writes_json_and_caches_the_report(tmp_path):
    args = ["--config", f"{TOY}:smoke", "--target", "gpu:h100x8", "--train_only",
            "--find_batch=none", f"--cache_dir={tmp_path / 'cache'}",
            f"--json={tmp_path / 'report.json'}", "--config.training.batch_size=512"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "| train step | 512 (64/dev)" in first.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fits"] and report["programs"][0]["batch"] == 512
    again = run_cli(*args)
    assert again.returncode == 0 and "cached report" in again.stdout
    bad = run_cli("--config", f"{TOY}:smoke", "--target", "tpu:v9-8")
    assert bad.returncode == 2 and "Unknown target 'tpu:v9-8'" in bad.stderr


@pytest.mark.parametrize("command", [
    ["slurm", "--gpus-per-node", "8"],
    ["tpu", "run", "--tpu", "t", "--type", "v5e-8", "--workdir", "gs://bucket/run"]])
def test_the_launchers_refuse_a_job_that_does_not_fit(tmp_path, command):
    # The train step alone, no batch search: the refusal, not the fit, is under test here.
    flags = f"--hbm_fraction=1e-7 --cache_dir={tmp_path} --train_only --find_batch=none"
    env = {**os.environ, **OUR_VENV, "QCSBM_CHECK_FLAGS": flags,
           "QCSBM_PIP_EXTRA": "", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    for tool in ("srun", "gcloud"):  # Would show that the job started.
        (tmp_path / tool).write_text("#!/bin/sh\necho STARTED; exit 99\n")
        (tmp_path / tool).chmod(0o755)
    result = subprocess.run(["bash", "launch/run.sh", *command, f"{TOY}:smoke"], cwd=ROOT,
                            capture_output=True, text=True, env=env)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "does not fit" in result.stderr and "STARTED" not in result.stdout
    assert "DOES NOT FIT: train step needs" in result.stdout
