"""A seconds-long run of the benchmark runner (python -m benchmarks.run) so it keeps working,
and checks that it times the programs users run, with the overrides it is given; the
arithmetic of the side by side with the authors' code (which needs torch to run)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("train", "score", "pc", "ode", "likelihood", "gradnoise", "accuracy")
TOY_OVERRIDES = ["model.widths=(16, 32)", "model.noise_widths=(1, 1)", "loss.dsm_scale=1"]


def _run(*flags: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_run_on_two_devices(tmp_path):
    out = tmp_path / "bench.json"
    done = _run("--quick", "--models", "toy", "--variants", "dsm,qc_nonneg_every4",
                "--devices", "2", "--batch", "16", "--rounds", "1", "--peak_tflops", "0.5",
                "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["section"] for r in rows} == set(SECTIONS)
    for section in SECTIONS:
        assert f"## {section}: toy, 2 device(s)" in done.stdout
    assert result["machine"]["backend"] == "cpu" and len(result["machine"]["load_average"]) == 3

    train = [r for r in rows if r["section"] == "train"]
    assert [(r["devices"], r["variant"]) for r in train] == [
        (2, "dsm"), (2, "qc_nonneg_every4")]
    for r in train:
        assert r["batch"] == 16 and r["finite"]
        assert r["step_ms"] > 0 and r["memory_mb"] > 0 and r["compile_s"] > 0
        np.testing.assert_allclose(r["examples_per_s"], 16 / (r["step_ms"] / 1e3))
        np.testing.assert_allclose(r["tflops_per_s"], r["gflops"] / r["step_ms"])
        np.testing.assert_allclose(r["of_peak"], r["tflops_per_s"] / 0.5)
        assert r["ratio_to_dsm"] == 1.0 if r["variant"] == "dsm" else r["ratio_to_dsm"] > 0

    for section in ("ode", "likelihood"):
        for r in (r for r in rows if r["section"] == section):
            assert 2 <= r["nfe_mean"] <= r["nfe_max"] and r["s_per_1000"] > 0
    pc = [r for r in rows if r["section"] == "pc"]
    assert len(pc) == 1 and all(r["steps_per_s"] > 0 for r in pc)

    noise = {r["qc_gradient"]: r for r in rows if r["section"] == "gradnoise"}
    assert sorted(noise) == ["estimate", "jvp"]
    assert all(r["draws"] == 4 and 0 < r["rel_noise"] < 10 and r["mean_gap"] >= 0
               for r in noise.values())

    # bfloat16 rounding error of the penalty estimate grows as the field gets more conservative.
    accuracy = [r for r in rows if r["section"] == "accuracy"]
    assert [r["nasym"] for r in accuracy] == [1e-1, 1e-2, 1e-3, 1e-4]
    errors = [r["low_vs_f32"] for r in accuracy]
    assert errors == sorted(errors) and errors[0] > 0


def test_bad_flags_fail_with_a_message():
    for flags, message in ((["--models", "resnet"], "unknown ['resnet']"),
                           (["--sections", "fid"], "unknown ['fid']"),
                           (["--devices", "0"], "positive device counts")):
        done = _run(*flags, timeout=60)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    done = _run("--models", "toy", "--override", "loss.qc_weight=heavy", timeout=300)
    assert done.returncode == 1 and "loss.qc_weight=heavy" in done.stderr, done.stderr
    assert "could not convert string to float" in done.stderr and "## train" not in done.stdout


def test_overrides_are_typed_and_reach_every_config():
    from benchmarks import common, training
    bench = common.make_bench("toy", 1, quick=True, overrides=TOY_OVERRIDES)
    assert bench.config.model.widths == (16, 32) and bench.config.loss.dsm_scale == 1.0
    assert isinstance(bench.config.loss.dsm_scale, float)
    kernels = [a.shape for a in __import__("jax").tree.leaves(bench.model.init_params)]
    assert (16, 32) in kernels and (64, 128) not in kernels  # the network built from it
    every4 = training.variant_config(bench, "qc_nonneg_every4")
    assert every4.loss.dsm_scale == 1.0 and every4.loss.qc_every == 4
    assert every4.loss.qc_weight == bench.spec.qc_weight
    assert training.variant_config(bench, "dsm").loss.qc_weight == 0.0
    assert bench.config.loss.qc_every == 1  # variants change copies
    for overrides, message in ((["model.depth=3"], "unknown config key 'depth' under model"),
                               (["loss.qc_weight=heavy"], "could not convert"),
                               (["loss.qc_weight"], "wants key=value"),
                               (["loss.qc_weight=-1"], "qc_weight")):
        with pytest.raises(ValueError, match=message):
            common.apply_overrides(bench.spec.config(), overrides)


def test_sections_time_the_programs_users_run(monkeypatch):
    """The samplers come from sampling.registry.make_sampler, the likelihood from
    evaluation.programs.make_nll_fn and the train steps from train.make_step_selector,
    each with the run's config (overrides included)."""
    from benchmarks import common, likelihood, sampling, training
    from qcsbm_jax import train
    from qcsbm_jax.evaluation import programs
    from qcsbm_jax.sampling import registry
    calls = []

    def spy(module, name):
        original = getattr(module, name)
        def wrapped(*args, **kwargs):
            calls.append((name, kwargs))
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)

    for module, name in ((registry, "make_sampler"), (programs, "make_nll_fn"),
                         (train, "make_step_selector")):
        spy(module, name)
    bench = common.make_bench("toy", 1, quick=True, overrides=TOY_OVERRIDES)
    (pc,) = sampling.bench_pc(bench, 8, num_steps=3)
    (ode,) = sampling.bench_ode(bench, 8)
    (nll,) = likelihood.bench_likelihood(bench, 8)
    programs_every4 = training.step_programs(bench, "qc_nonneg_every4")
    assert [name for name, _ in calls] == ["make_sampler", "make_sampler", "make_nll_fn",
                                           "make_step_selector"]
    assert calls[0][1]["num_steps"] == 3 and calls[1][1]["rtol"] == 1e-2
    assert calls[2][1]["rtol"] == 1e-2 and calls[2][1]["divergence"] == "exact"
    assert pc["nfe_mean"] == 3 * (bench.config.sampling.corrector_steps
                                  * (bench.config.sampling.corrector != "none") + 1) + 1
    assert ode["nfe_mean"] >= 2 and nll["nfe_mean"] >= 2
    assert [count for _, count in programs_every4] == [1, 3]


def test_train_rows_are_reported_as_they_are_measured():
    """A run cut short keeps every compiled variant and every timed round: report() gets
    the rows after each compilation (no time yet) and after each round."""
    from benchmarks import common, training
    bench = common.make_bench("toy", 1, quick=True)
    reports = []
    final = training.bench_train(bench, 16, ["dsm", "qc_nonneg_jvpgrad"], 2, reports.append)
    assert [[(r["variant"], r["rounds"]) for r in rows] for rows in reports] == [
        [("dsm", 0)], [("dsm", 0), ("qc_nonneg_jvpgrad", 0)],
        [("dsm", 1), ("qc_nonneg_jvpgrad", 1)], [("dsm", 2), ("qc_nonneg_jvpgrad", 2)]]
    assert all(r["step_ms"] is None and r["ratio_to_dsm"] is None for r in reports[1])
    assert all(r["step_ms"] > 0 and r["compile_s"] > 0 for r in reports[2])
    assert reports[-1] == final and final[0]["ratio_to_dsm"] == 1.0
    assert 2.0 < final[1]["flop_ratio"] < 2.6  # J^T v not differentiated: ~7/3, not ~3


def test_compute_dtype_override_reaches_the_train_step_only():
    """--override training.compute_dtype=bfloat16 times the train step users would run in
    bfloat16 (train.build_training_model), while the samplers stay float32 as in use."""
    import jax
    import jax.numpy as jnp
    from benchmarks import common
    bench = common.make_bench("toy", 1, quick=True,
                              overrides=["training.compute_dtype=bfloat16"])
    assert bench.train_model is not bench.model

    def dot_dtypes(score_fn, params):
        x, t = jnp.ones((4, 2)), jnp.full((4,), 0.5)
        jaxpr = jax.make_jaxpr(lambda p: score_fn(p, x, t, None))(params)
        return {str(e.invars[0].aval.dtype) for e in jaxpr.eqns
                if e.primitive.name == "dot_general"}

    assert dot_dtypes(bench.train_model.score_fn, bench.train_model.init_params) == {"bfloat16"}
    assert dot_dtypes(bench.model.score_fn, bench.model.init_params) == {"float32"}
    float32 = common.make_bench("toy", 1, quick=True)
    assert float32.train_model is float32.model


def test_versus_official_ratios_are_taken_within_rounds():
    """Our step over theirs and QC over DSM are ratios per round (median and range), the
    rates are GFLOP over the median step time, and the table shows each side's rate as a
    share of its own reference convolution rate."""
    from benchmarks import versus_official
    times = {"theirs/dsm": [2.0, 4.0, 4.0], "theirs/qc": [10.0, 12.0, 8.0],
             "ours/dsm": [1.0, 1.0, 2.0], "ours/qc_jvp": [3.0, 2.0, 2.0]}
    gflop = {"theirs/dsm": 8.0, "theirs/qc": 30.0, "ours/dsm": 10.0, "ours/qc_jvp": 20.0}
    summary = versus_official._summary(times, 2, gflop, dict(theirs=40.0, ours=50.0))
    assert summary["step_s"] == {"theirs/dsm": 2.0, "theirs/qc": 5.0, "ours/dsm": 0.5,
                                 "ours/qc_jvp": 1.0}
    assert summary["ratios"]["ours/dsm / theirs/dsm"] == dict(median=0.5, min=0.25, max=0.5)
    assert summary["ratios"]["ours/qc_jvp / theirs/qc"] == dict(median=0.25, min=1 / 6,
                                                                max=0.3)
    assert summary["ratios"]["ours/qc_jvp / ours/dsm"] == dict(median=2.0, min=1.0, max=3.0)
    assert summary["ratios"]["theirs/qc / theirs/dsm"] == dict(median=3.0, min=2.0, max=5.0)
    assert summary["gflop_per_s"] == {"theirs/dsm": 4.0, "theirs/qc": 6.0, "ours/dsm": 20.0,
                                      "ours/qc_jvp": 20.0}
    table = versus_official.format_table(summary)
    assert ("| official qc | QC (double backward) | 5.000 | 30.0 | 6.0 (15%) | "
            "| 3.00 (2.00-5.00) |") in table
    assert "| 1.000 | 20.0 | 20.0 (40%) | 0.25 (0.17-0.30) | 2.00 (1.00-3.00) |" in table


def test_conv_kernels_time_the_three_convolutions_of_a_train_step(monkeypatch):
    """benchmarks.conv_kernels (XLA side): forward, input gradient and kernel gradient of
    the same convolution, each rated at 2 operations per multiply-add (the reference
    rate of benchmarks.versus_official too)."""
    from benchmarks import conv_kernels
    calls = conv_kernels.xla_calls(1, 4, 2)
    shapes = {kind: call().shape for kind, call in calls.items()}
    assert shapes == {"forward": (1, 4, 4, 2), "input_grad": (1, 4, 4, 2),
                      "kernel_grad": (3, 3, 2, 2)}
    # Ones everywhere: a kernel entry counts the output positions whose input pixel at its
    # offset lies inside the 4 x 4 image ('same' padding): all 16 for the centre tap, 3 x 3
    # for a corner tap.
    np.testing.assert_allclose(calls["kernel_grad"]()[1, 1], 16.0)
    np.testing.assert_allclose(calls["kernel_grad"]()[0, 0], 9.0)
    np.testing.assert_allclose(calls["forward"]()[0, 1, 1], 18.0)  # 3 x 3 x 2 ones
    monkeypatch.setattr(conv_kernels, "SHAPES", ((1, 4, 2),))
    monkeypatch.setattr(conv_kernels, "_fastest", lambda fn, repeats: 1e-6)
    (row,) = conv_kernels.measure("xla", repeats=1)
    assert row.pop("shape") == [1, 4, 4, 2]
    assert row == pytest.approx(dict(forward=1.152, input_grad=1.152, kernel_grad=1.152))
    # [2, 4, 4, 3], 3 -> 3 channels: 2 * 2*4*4 outputs * 3 channels * 27 = 5184 operations.
    assert conv_kernels.rate("xla", 2, 4, 3, "forward") == pytest.approx(5.184)


def _aot_report(target: str, seconds: float, flops: float, xla: bool) -> dict:
    step = dict(estimated_seconds=seconds, xla_seconds=seconds if xla else None,
                memory_total=3 * 2**30, fits=True, flops=flops)
    return dict(target=target, num_chips=4, programs=[step], fit={"per_device_batch": 96})


def test_aot_targets_prices_the_paper_schedule_from_each_cell(tmp_path, monkeypatch):
    from benchmarks import aot_targets
    usbm = _aot_report("tpu:v5e-4", 0.05, 197e12 * 0.05 * 0.4, xla=True)
    qc = _aot_report("tpu:v5e-4", 0.08, 1e12, xla=False)
    row = aot_targets.summary("qc_jvp", "float32", qc, usbm)
    assert row["estimate"] == "roofline" and row["gib_per_chip"] == 3
    assert row["vs_usbm"] == pytest.approx(1.6)
    hours = (1_300_000 * 0.05 + 100_000 * 0.08) / 3600
    assert row["paper_schedule_h"] == pytest.approx(hours)
    assert row["paper_chip_hours"] == pytest.approx(4 * hours)
    base = aot_targets.summary("usbm", "float32", usbm, usbm)
    assert base["share_of_peak"] == pytest.approx(0.4) and "vs_usbm" not in base
    assert base["largest_batch_per_chip"] == 96
    # A cell whose JSON is there is read, not compiled (an interrupted sweep resumes).
    path = aot_targets.cell_path(str(tmp_path), "usbm", "float32", "tpu:v5e-4", "none")
    pathlib.Path(path).write_text(json.dumps(usbm))
    monkeypatch.setattr(aot_targets.subprocess, "run", lambda *a, **k: pytest.fail("compiled"))
    assert aot_targets.compile_cell(str(tmp_path), "usbm", "float32", "tpu:v5e-4",
                                    "none", 10) == usbm
    # A cell with the batch search serves a request without it, not the other way round
    # (unless only cached cells are asked for).
    os.rename(path, aot_targets.cell_path(str(tmp_path), "usbm", "float32", "tpu:v5e-4",
                                          "estimate"))
    assert aot_targets.compile_cell(str(tmp_path), "usbm", "float32", "tpu:v5e-4",
                                    "none", 10) == usbm
    assert aot_targets.compile_cell(str(tmp_path), "qc_jvp", "float32", "tpu:v5e-4",
                                    "estimate", 10, cached_only=True) is None
