"""torch_io: PyTorch files read without torch, against arrays torch itself saved
(tests/fixtures/torch_io/make_fixtures.py)."""

import collections
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
    want = {k.removeprefix("scripted."): v for k, v in expected.items()
            if k.startswith("scripted.")}
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


def test_save_writes_what_load_reads_back_with_aligned_storages(tmp_path):
    """The writer's format is torch.save's (tests/fixtures/convert/make_fixtures.py
    --check_export loads such files with torch, through the official code)."""
    conv = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
    state = {
        "model": collections.OrderedDict(
            conv=conv, transposed=conv.transpose(3, 2, 0, 1), sigmas=np.linspace(1, 2, 5),
            count=np.array(7, np.int64), half=np.ones(3, np.float16), empty=np.zeros((0, 4))),
        "ema": {"decay": 0.999, "num_updates": 3, "shadow_params": [conv[0], conv[1]]},
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999),
                                                     "amsgrad": False, "params": [0, 1]}]},
        "step": 2**40, "negative": -70_000, "none": None, "name": "é",
    }
    path = tmp_path / "saved.pth"
    torch_io.save(state, path)
    back = torch_io.load(path)
    assert isinstance(back["model"], collections.OrderedDict)
    assert list(back["model"]) == list(state["model"])
    for key, value in state["model"].items():
        assert back["model"][key].dtype == value.dtype, key
        np.testing.assert_array_equal(back["model"][key], value, err_msg=key)
    np.testing.assert_array_equal(back["ema"]["shadow_params"][1], conv[1])
    assert back["optimizer"] == state["optimizer"]
    assert {k: back[k] for k in ("step", "negative", "none", "name")} == {
        "step": 2**40, "negative": -70_000, "none": None, "name": "é"}
    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if "/data/" in i.filename]
        assert len(entries) == len(state["model"]) + 2
        for info in entries:
            offset = info.header_offset + 30 + len(info.filename) + len(info.extra)
            assert offset % torch_io.ZIP_ALIGNMENT == 0 and info.compress_type == zipfile.ZIP_STORED
    with pytest.raises(TypeError, match="Cannot write 'object' objects"):
        torch_io.save({"x": object()}, tmp_path / "bad.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.pth"]
