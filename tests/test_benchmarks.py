"""A seconds-long run of the benchmark runner (python -m benchmarks.run) so it keeps working."""

import json
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("train", "score", "pc", "ode", "likelihood", "gradnoise", "accuracy")


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


def test_train_rows_are_reported_as_they_are_measured():
    """A run cut short keeps every compiled variant and every timed round: report() gets
    the rows after each compilation (no time yet) and after each round."""
    import jax.numpy as jnp

    from benchmarks import suite
    bench = suite._bench("toy", 1, jnp.float32, quick=True)
    reports = []
    final = suite.bench_train(bench, 16, ["dsm", "qc_nonneg_jvpgrad"], 2, reports.append)
    assert [[(r["variant"], r["rounds"]) for r in rows] for rows in reports] == [
        [("dsm", 0)], [("dsm", 0), ("qc_nonneg_jvpgrad", 0)],
        [("dsm", 1), ("qc_nonneg_jvpgrad", 1)], [("dsm", 2), ("qc_nonneg_jvpgrad", 2)]]
    assert all(r["step_ms"] is None and r["ratio_to_dsm"] is None for r in reports[1])
    assert all(r["step_ms"] > 0 and r["compile_s"] > 0 for r in reports[2])
    assert reports[-1] == final and final[0]["ratio_to_dsm"] == 1.0
    assert 2.0 < final[1]["flop_ratio"] < 2.6  # J^T v not differentiated: ~7/3, not ~3
