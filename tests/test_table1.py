"""Table 1 aggregation on hand-made runs: spreads, ours against the official code, pairs."""

import json
import os

import pytest

from qcsbm_jax.experiments import table1


def _write(workdir, name, nll, output_dir="eval"):
    os.makedirs(os.path.join(workdir, name, output_dir))
    with open(os.path.join(workdir, name, output_dir, "metrics.json"), "w") as f:
        json.dump({"nll": nll}, f)


def test_tabulate_compares_ours_with_the_official_code_and_pairs_seeds(tmp_path):
    ours, official = str(tmp_path / "ours"), str(tmp_path / "official")
    for seed, (usbm, qcsbm) in enumerate([(5.0, 4.9), (5.2, 5.0), (5.1, 5.15)]):
        _write(ours, f"gaussians8_usbm_seed{seed}", usbm)
        _write(ours, f"gaussians8_qcsbm_seed{seed}", qcsbm)
        _write(ours, f"gaussians8_usbm_seed{seed}", usbm - 0.05, "eval_ema")
    for seed, usbm in enumerate([5.3, 5.5]):
        _write(official, f"gaussians8_usbm_seed{seed}", usbm)
    results = table1.tabulate(ours, official)
    row = results["eval"]["gaussians8"]["families"]["usbm"]
    assert row["paper"] == (5.02, 0.03)
    assert row["ours"]["mean"] == pytest.approx(5.1) and row["ours"]["n"] == 3
    assert row["official"]["values"] == [5.3, 5.5]
    diff = row["ours_minus_official"]
    assert diff["diff"] == pytest.approx(-0.3)
    assert diff["se"] == pytest.approx((0.1 ** 2 / 3 + 0.02 / 2) ** 0.5)
    assert diff["within_2se"] is False
    pairs = results["eval"]["gaussians8"]["paired"]["ours"]["qcsbm-usbm"]
    assert pairs["values"] == pytest.approx([-0.1, -0.2, 0.05]) and pairs["below_zero"] == 2
    assert results["eval"]["gaussians8"]["families"]["csbm"]["ours"]["n"] == 0
    assert results["eval_ema"]["gaussians8"]["families"]["usbm"]["paper"] is None
    assert results["eval_ema"]["gaussians8"]["families"]["usbm"]["ours"]["mean"] == \
        pytest.approx(5.05)
    table = table1.format_table(results, "nll")
    assert "| usbm | 5.02 ± 0.03 | 5.400 ± 0.141 (n=2) | 5.100 ± 0.100 (n=3) |" in table
    assert "| qcsbm-usbm | ours |" in table and "2 of 3" in table
