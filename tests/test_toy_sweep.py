"""The toy sweep: a tiny real sweep (train, evaluate, resume, skip, aggregate) and the
aggregation on hand-made metrics."""

import json
import logging
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from PIL import Image

from qcsbm_jax import config as config_lib, plotting, train
from qcsbm_jax.data.toy import TOY_DATASETS
from qcsbm_jax.experiments import toy_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("training.num_steps=20", "training.log_every=10", "training.checkpoint_every=10",
        "data.num_points=512", "eval.num_levels=2", "eval.num_points=64", "eval.batch_size=64",
        "eval.score_error_points=64", "eval.num_samples=64", "sampling.batch_size=64")
FAMILIES, SEEDS = ("csbm", "usbm"), (0, 1)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_run(workdir, name, metrics, wall_time=None):
    os.makedirs(os.path.join(workdir, name, "eval"))
    with open(os.path.join(workdir, name, "eval", "metrics.json"), "w") as f:
        json.dump(metrics, f)
    if wall_time is not None:
        with open(os.path.join(workdir, name, toy_sweep.WALL_TIME_FILE), "w") as f:
            json.dump(wall_time, f)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 4-run sweep whose gaussians8_usbm_seed1 was interrupted after 10 of 20 steps."""
    workdir = str(tmp_path_factory.mktemp("sweep"))
    configs = toy_sweep.sweep_configs(["gaussians8"], FAMILIES, SEEDS, "smoke", TINY)
    interrupted = configs["gaussians8_usbm_seed1"].copy_and_resolve_references()
    with interrupted.unlocked():
        interrupted.training.num_steps = 10
    train.train(interrupted, os.path.join(workdir, "gaussians8_usbm_seed1"))
    absl_logger, records = logging.getLogger("absl"), []
    handler, level = logging.Handler(), absl_logger.level
    handler.emit = records.append
    absl_logger.addHandler(handler)
    absl_logger.setLevel(logging.INFO)
    try:
        done = toy_sweep.run_sweep(workdir, configs)
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(level)
    table = toy_sweep.write_summary(workdir)
    return dict(workdir=workdir, configs=configs, done=done, table=table,
                log=[r.getMessage() for r in records])


def test_sweep_trains_evaluates_and_records_wall_times(sweep):
    assert sorted(sweep["done"]) == sorted(sweep["configs"])
    for name in sweep["configs"]:
        metrics = _read_json(os.path.join(sweep["workdir"], name, "eval", "metrics.json"))
        assert metrics["step"] == 20.0
        wall_time = _read_json(os.path.join(sweep["workdir"], name, toy_sweep.WALL_TIME_FILE))
        assert wall_time == sweep["done"][name]
        assert wall_time["train_s"] > 0 and wall_time["eval_s"] > 0


def test_seeds_set_training_and_data_seeds():
    config = toy_sweep.run_config("spirals2", "qcsbm", 2, "smoke", ("eval.num_levels=3",))
    assert (config.seed, config.data.seed, config.eval.num_levels) == (2, 2, 3)
    assert config.eval.seed == toy_sweep.run_config("spirals2", "qcsbm", 0).eval.seed
    fixed_data = toy_sweep.run_config("spirals2", "qcsbm", 2, overrides=("data.seed=0",))
    assert (fixed_data.seed, fixed_data.data.seed) == (2, 0)


def test_interrupted_run_resumes_from_its_checkpoint(sweep):
    assert any("Resumed from step 10" in message for message in sweep["log"])


def test_results_are_mean_and_sample_std_of_the_runs(sweep):
    results = _read_json(os.path.join(sweep["workdir"], "results.json"))
    assert list(results) == ["gaussians8"] and list(results["gaussians8"]) == list(FAMILIES)
    for family, entry in results["gaussians8"].items():
        assert entry["seeds"] == list(SEEDS)
        runs = [{**_read_json(os.path.join(sweep["workdir"], f"gaussians8_{family}_seed{s}",
                                           "eval", "metrics.json")),
                 **sweep["done"][f"gaussians8_{family}_seed{s}"]} for s in SEEDS]
        for metric in toy_sweep.METRICS:
            values = [run[metric] for run in runs]
            assert entry[metric]["values"] == values
            assert entry[metric]["mean"] == pytest.approx(np.mean(values))
            assert entry[metric]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    with open(os.path.join(sweep["workdir"], "table.md")) as f:
        assert f.read() == sweep["table"]
    cell = toy_sweep.format_cell(results["gaussians8"]["usbm"]["nll"])
    assert "| usbm | 0,1 | " in sweep["table"] and cell in sweep["table"]


def test_second_invocation_skips_complete_runs(sweep):
    paths = [os.path.join(sweep["workdir"], name, "eval", "metrics.json")
             for name in sweep["configs"]]
    before = [os.stat(p).st_mtime_ns for p in paths]
    start = time.perf_counter()
    assert toy_sweep.run_sweep(sweep["workdir"], sweep["configs"]) == {}
    assert time.perf_counter() - start < 5
    assert [os.stat(p).st_mtime_ns for p in paths] == before


def test_aggregate_only_command_line(sweep):
    table_path = os.path.join(sweep["workdir"], "table.md")
    os.remove(table_path)
    result = subprocess.run(
        [sys.executable, "-m", "qcsbm_jax.experiments.toy_sweep",
         f"--workdir={sweep['workdir']}", "--aggregate_only"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(table_path) as f:
        assert f.read() == sweep["table"]
    assert sweep["table"] in result.stdout


def test_aggregate_on_hand_made_metrics():
    runs = {("gaussians8", "qcsbm", 0): {"nll": 1.0, "train_s": 10.0},
            ("gaussians8", "qcsbm", 2): {"nll": 3.0},
            ("gaussians8", "csbm", 1): {"nll": 5.0, "train_s": 7.0},
            ("checkerboard", "usbm", 0): {"nll": 2.0}}
    results = toy_sweep.aggregate(runs)
    assert list(results) == ["gaussians8", "checkerboard"]  # the paper's order
    assert list(results["gaussians8"]) == ["csbm", "qcsbm"]
    qcsbm = results["gaussians8"]["qcsbm"]
    assert qcsbm["seeds"] == [0, 2]
    assert qcsbm["nll"] == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)),
                            "values": [1.0, 3.0]}
    assert qcsbm["train_s"] == {"mean": 10.0, "std": None, "values": [10.0, None]}
    assert qcsbm["asym"] == {"mean": None, "std": None, "values": [None, None]}
    table = toy_sweep.format_tables(results)
    assert "| qcsbm | 0,2 | - | - | - | 2 ± 1.4 | - | - | - | 10 | - |" in table
    assert table.index("## gaussians8") < table.index("## checkerboard")


def test_load_runs_reads_complete_runs_only(tmp_path):
    _write_run(tmp_path, "spirals2_qcsbm_seed3", {"nll": 1.5, "asym/level_0": 9.0, "step": 20},
               {"train_s": 4.0, "eval_s": 2.0})
    _write_run(tmp_path, "spirals2_csbm_seed0", {"nll": 2.5})
    _write_run(tmp_path, "spirals2_csbm_seedx", {"nll": 0.0})
    os.makedirs(tmp_path / "spirals2_usbm_seed0" / "checkpoints")  # not evaluated yet
    assert toy_sweep.load_runs(str(tmp_path)) == {
        ("spirals2", "qcsbm", 3): {"nll": 1.5, "train_s": 4.0, "eval_s": 2.0},
        ("spirals2", "csbm", 0): {"nll": 2.5}}


def test_parse_override():
    assert toy_sweep.parse_override("training.num_steps=20") == ("training.num_steps", 20)
    assert toy_sweep.parse_override("model.widths=(8, 8)") == ("model.widths", (8, 8))
    assert toy_sweep.parse_override("loss.estimator=exact") == ("loss.estimator", "exact")
    with pytest.raises(ValueError, match="key=value"):
        toy_sweep.parse_override("training.num_steps")
    with pytest.raises(KeyError, match="num_steps"):
        toy_sweep.run_config("gaussians8", "csbm", 0, overrides=("training.num_stepz=3",))


def test_sample_figure_tiles_one_seeds_runs(tmp_path):
    workdir = str(tmp_path)
    names = [toy_sweep.run_name(d, f, 0) for d in TOY_DATASETS for f in config_lib.TOY_FAMILIES]
    for i, name in enumerate(names):
        tile = np.full((1, 6, 4, 3), i / 10.0)  # A 6 x 4 tile of a distinct grey per run.
        plotting.image_grid_png(os.path.join(workdir, name, "eval", "samples.png"), tile,
                                padding=0)
        expected = None if i < len(names) - 1 else os.path.join(workdir, "samples_seed0.png")
        assert toy_sweep.write_sample_figure(workdir, 0) == expected
    figure = np.asarray(Image.open(expected))
    assert figure.shape == (3 * (6 + 2) + 2, 3 * (4 + 2) + 2, 3)
    for i in range(len(names)):  # Row-major: data sets down, families across.
        top, left = 2 + (i // 3) * 8, 2 + (i % 3) * 6
        assert np.all(figure[top:top + 6, left:left + 4] == round(255 * i / 10.0))


def test_ema_protocol_evaluates_final_and_ema_weights(tmp_path):
    workdir = str(tmp_path)
    configs = toy_sweep.sweep_configs(["gaussians8"], ["usbm"], [0], "smoke", TINY,
                                      ema_decay=0.9)
    assert configs["gaussians8_usbm_seed0"].optim.ema_decay == 0.9
    toy_sweep.run_sweep(workdir, configs)
    run_dir = os.path.join(workdir, "gaussians8_usbm_seed0")
    final = _read_json(os.path.join(run_dir, "eval", "metrics.json"))
    ema = _read_json(os.path.join(run_dir, "eval_ema", "metrics.json"))
    assert final["step"] == ema["step"] == 20.0
    assert final["nll"] != ema["nll"]  # other weights, same evaluation draws
    assert toy_sweep.run_sweep(workdir, configs) == {}  # both protocols done: skipped
    table = toy_sweep.write_summary(workdir)
    assert "Protocol: eval_ema/" in table
    results_ema = _read_json(os.path.join(workdir, "results_ema.json"))
    assert results_ema["gaussians8"]["usbm"]["nll"]["values"] == [ema["nll"]]
