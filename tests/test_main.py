"""The command line end to end on the smoke configs: train, resume, eval, sample, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_KEYS = ("nll", "asym", "nasym", "score_error", "precision", "recall", "nfe")


def _run(*args, check=True):
    command = [sys.executable, "-m", "qcsbm_jax.main", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    result = _run("--config=configs/toy/gaussians8_qcsbm.py:smoke", f"--workdir={workdir}",
                  "--mode=all")
    # Every run ends with where its outputs are.
    summary = result.stderr[result.stderr.index("Done. Outputs:"):]
    for place in ("checkpoints", os.path.join(workdir, "eval"), "ode.npz", "ode.png"):
        assert place in summary, place
    return workdir


def test_all_mode_writes_metrics_samples_and_plots(trained):
    with open(os.path.join(trained, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    for key in TOY_KEYS:
        assert isinstance(metrics[key], float) and np.isfinite(metrics[key]), key
    assert 0.0 <= metrics["nasym"] <= 1.0
    assert 0.0 <= metrics["precision"] <= 1.0 and 0.0 <= metrics["recall"] <= 1.0
    assert metrics["nfe"] > 0
    with np.load(os.path.join(trained, "samples", "ode.npz")) as saved:
        assert saved["samples"].shape == (256, 2) and np.all(np.isfinite(saved["samples"]))
        assert str(saved["method"]) == "ode" and json.loads(str(saved["settings"]))["rtol"] > 0
    for png in ("eval/samples.png", "eval/asymmetry.png", "samples/ode.png"):
        with open(os.path.join(trained, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(trained))


def test_resume_continues_from_last_checkpoint(trained):
    result = _run("--config=configs/toy/gaussians8_qcsbm.py:smoke", f"--workdir={trained}",
                  "--mode=train", "--config.training.num_steps=90")
    assert "Resumed from step 60" in result.stderr
    assert _checkpoint_steps(trained)[-1] == 90


def test_pc_sampling_mode(trained):
    _run("--config=configs/toy/gaussians8_qcsbm.py:smoke", f"--workdir={trained}",
         "--mode=sample", "--config.sampling.method=pc", "--config.sampling.num_steps=20")
    with np.load(os.path.join(trained, "samples", "pc.npz")) as saved:
        assert saved["samples"].shape == (256, 2) and np.all(np.isfinite(saved["samples"]))
        assert str(saved["method"]) == "pc" and np.all(saved["nfe"] == 20 + 1)
        assert json.loads(str(saved["settings"]))["num_steps"] == 20
    # One file pair per sampler: the ODE samples of --mode all are still there.
    assert os.path.exists(os.path.join(trained, "samples", "ode.npz"))


def test_workdir_of_another_model_is_refused(trained):
    result = _run("--config=configs/toy/gaussians8_csbm.py:smoke", f"--workdir={trained}",
                  "--mode=train", check=False)
    assert result.returncode != 0
    assert "family" in result.stderr and "--workdir" in result.stderr


def test_eval_reads_only_the_parameters_so_optimizer_settings_may_differ(trained):
    # A warm-up schedule and no clipping change the optimizer state's tree, not the model.
    _run("--config=configs/toy/gaussians8_qcsbm.py:smoke", f"--workdir={trained}",
         "--mode=eval", "--config.optim.warmup_steps=10", "--config.optim.grad_clip=0")
    with open(os.path.join(trained, "eval", "metrics.json")) as f:
        assert json.load(f)["step"] == _checkpoint_steps(trained)[-1]


def test_evaluating_another_model_is_refused_without_delete_advice(trained):
    result = _run("--config=configs/toy/gaussians8_csbm.py:smoke", f"--workdir={trained}",
                  "--mode=eval", check=False)
    assert result.returncode != 0
    assert "family" in result.stderr and "config the run was trained with" in result.stderr
    assert "delete" not in result.stderr.lower()


def test_unknown_config_key_is_one_clear_error(tmp_path):
    result = _run("--config=configs/toy/gaussians8_qcsbm.py:smoke", f"--workdir={tmp_path}",
                  "--config.training.num_stepz=3", check=False)
    assert result.returncode != 0
    assert "num_stepz" in result.stderr and "num_steps" in result.stderr
    assert "Traceback" not in result.stderr


def test_nan_loss_stops_with_advice_and_keeps_a_finite_checkpoint(tmp_path):
    result = _run("--config=configs/toy/gaussians8_usbm.py:smoke", f"--workdir={tmp_path}",
                  "--mode=train", "--config.optim.learning_rate=1e30",
                  "--config.optim.grad_clip=0", check=False)
    assert result.returncode != 0
    assert "NaN" in result.stderr and "learning_rate" in result.stderr
    assert _checkpoint_steps(str(tmp_path))


def test_incomplete_multi_process_flags_are_one_clear_error(tmp_path):
    result = _run("--config=configs/toy/gaussians8_qcsbm.py:smoke", f"--workdir={tmp_path}",
                  "--num_processes=2", check=False)
    assert result.returncode != 0
    assert "--coordinator_address=HOST:PORT" in result.stderr and "--process_id" in result.stderr
    assert "Traceback" not in result.stderr


TOY = "--config=configs/toy/gaussians8_qcsbm.py:smoke"


@pytest.mark.parametrize("flags,message", [
    (["--config.training.batch_size=abc"],
     "--config.training.batch_size=abc has the wrong type: training.batch_size takes an "
     "integer."),
    (["--config.model.widths=abc"],
     "--config.model.widths=abc has the wrong type: model.widths takes a tuple of integers, "
     "such as (64, 128, 256)."),
    (["--config.training.num_steps=0", "--mode=all"],
     "--config.training.num_steps=0 is not valid; it must be an integer >= 1."),
    (["--config.training.batch_size=-8"],
     "--config.training.batch_size=-8 is not valid; it must be an integer >= 1."),
    (["--config.training.batch_size=12"],
     "--config.training.batch_size=12 must be divisible by the number of devices (8) and of "
     "processes (1) of this job."),
])
def test_bad_values_are_one_line_before_anything_is_written(tmp_path, flags, message):
    """Defects: a wrongly typed override printed a 46-line traceback; num_steps=0 with
    --mode=all said 'Train first'; batch sizes 0 or -8 failed deep in JAX."""
    workdir = tmp_path / "run"
    result = _run(TOY, f"--workdir={workdir}", *flags, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_one_clear_error(tmp_path):
    """Defect: a raw FileExistsError."""
    regular = tmp_path / "file"
    regular.write_text("keep me")
    result = _run(TOY, f"--workdir={regular}", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"--workdir={regular} is a file, not a directory; give a directory (it is created "
        "if missing).")
    assert regular.read_text() == "keep me"


def test_a_damaged_checkpoint_is_one_message_without_noise(tmp_path):
    """Defect: an 'Event loop is closed' traceback preceded the corrupt-checkpoint error."""
    # pylint: disable=import-outside-toplevel
    from qcsbm_jax import checkpoint, experiment, train
    from test_train import _smoke
    widths = (256, 256)  # Arrays large enough to live in per-process data files.
    config = _smoke("qcsbm", **{"model.widths": widths})
    model = experiment.build_score_model(config)
    state = train.init_state(model.init_params, train.make_optimizer(config.optim), 0)
    workdir = tmp_path / "run"
    with checkpoint.Checkpointer(workdir) as ckpt:
        ckpt.save(2, state, metadata={
            "config": config.to_dict(),
            "signature": experiment.model_signature(config, model.init_params)})
    step_dir = workdir / "checkpoints" / "2"
    for data_file in (step_dir / "state").glob("ocdbt.process_0/d/*"):
        data_file.unlink()  # Every data file: which arrays share a file varies from save to save.
    result = _run(TOY, f"--config.model.widths={widths}", f"--workdir={workdir}",
                  "--mode=eval", check=False)
    assert result.returncode == 1
    assert f"The checkpoint {step_dir} is damaged or incomplete: reading it failed" in (
        result.stderr.strip().splitlines()[-1])
    assert "Event loop is closed" not in result.stderr and "Traceback" not in result.stderr
