"""torch_io: PyTorch files read without torch, against arrays torch itself saved
(tests/fixtures/torch_io/make_fixtures.py)."""

import os
import shutil
import zipfile

import numpy as np
import pytest

from qcsbm_jax import torch_io

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "torch_io")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module")
def expected():
    with np.load(fixture("expected.npz")) as f:
        return dict(f)


@pytest.mark.parametrize("name", ["state_zip.pth", "state_legacy.pth"])
def test_both_formats_give_torch_values(name, expected):
    state = torch_io.load(fixture(name))
    assert state["step"] == 7 and state["ema"]["decay"] == 0.999
    assert state["tag"] == b"\x00\x01" and state["names"] == ("a", "b")
    for key, value in state["model"].items():
        want = expected[f"model.{key}"]
        got = value.astype(np.float32) if key == "halves" else value
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
    assert state["model"]["halves"].dtype == np.float16
    np.testing.assert_array_equal(state["ema"]["shadow_params"][1], 2 * expected["model.dense"])


def test_torchscript_archive_gives_its_state_dict(expected):
    module = torch_io.load(fixture("scripted.pt"))
    assert isinstance(module, torch_io.ScriptObject)
    flat = torch_io.flatten_arrays(module)
    want = {k.removeprefix("scripted."): v for k, v in expected.items() if k.startswith("scripted.")}
    assert set(flat) == set(want)
    for key in want:
        np.testing.assert_array_equal(flat[key], want[key])


def test_code_in_a_pickle_is_refused_not_run(capsys):
    with pytest.raises(torch_io.TorchFileError, match="builtins.print"):
        torch_io.load(fixture("evil.pth"))
    assert "must never run" not in capsys.readouterr().out


def test_damaged_files_give_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        torch_io.load(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(torch_io.TorchFileError, match="not a PyTorch checkpoint"):
        torch_io.load(garbage)
    for name in ("state_zip.pth", "state_legacy.pth"):
        data = open(fixture(name), "rb").read()
        truncated = tmp_path / f"truncated_{name}"
        truncated.write_bytes(data[:len(data) * 2 // 3])
        with pytest.raises(torch_io.TorchFileError):
            torch_io.load(truncated)
    # A zip whose storage entry is missing.
    partial = tmp_path / "partial.pth"
    with zipfile.ZipFile(fixture("state_zip.pth")) as source, \
            zipfile.ZipFile(partial, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith("/data/0"):
                target.writestr(item, source.read(item))
    with pytest.raises(torch_io.TorchFileError, match="lacks the storage"):
        torch_io.load(partial)
    other_zip = tmp_path / "other.zip"
    shutil.make_archive(str(other_zip)[:-4], "zip", FIXTURES)
    with pytest.raises(torch_io.TorchFileError, match="not a PyTorch checkpoint"):
        torch_io.load(other_zip)
