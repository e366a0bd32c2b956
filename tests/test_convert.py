"""PyTorch checkpoints in and out, against the official code's own checkpoints and scores
(tests/fixtures/convert/make_fixtures.py ran it): the imported network computes the
official scores after a save and restore, export and import round-trip exactly, and every
bad input gets one clear error with nothing written."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from flax import nnx

from qcsbm_jax import (checkpoint, data, experiment, models, parallel, restore, score,
                       sde as sde_lib, torch_io, train)
from qcsbm_jax.convert import ConvertError, import_checkpoint, layout
from qcsbm_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "convert")
with open(os.path.join(FIXTURES, "variants.json")) as _file:
    VARIANTS = json.load(_file)


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def config_for(variant: str, **changes) -> ml_collections.ConfigDict:
    """Our config of a fixture's network (variants.json), with further changes."""
    spec = VARIANTS[variant]
    path = os.path.join(ROOT, spec["config"])
    module_spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config()
    overrides = {**spec["overrides"], **changes}
    config.update_from_flattened_dict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    return config


@functools.cache
def score_model(variant: str) -> experiment.ScoreModel:
    """experiment.build_score_model's model of the fixture's network with zeros for
    init_params (restores overwrite them all): initialising it costs more than the test."""
    config = config_for(variant)
    shape = data.of(config).shape
    network = nnx.eval_shape(lambda: models.build_model(config.model, shape, jax.random.key(0)))
    apply_fn, params = models.functional(network)
    sde = sde_lib.get_sde(**config.sde)
    score_fn = score.make_score_fn(apply_fn, sde, config.model.family, config.model.output)
    zeros = jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), params)
    return experiment.ScoreModel(sde, jax.jit(score_fn), zeros, shape)


def restored_scores(config, workdir: str, variant: str) -> dict[str, np.ndarray]:
    """Scores at the fixture's (x, t) of the raw and the EMA parameters, each read back
    from workdir by evaluation's restore path (eval.params)."""
    model = score_model(variant)
    mesh = parallel.make_mesh(-1, 1)
    inputs = np.load(fixture(f"{variant}_scores.npz"))
    scores = {}
    for which in ("raw", "ema"):
        with config.unlocked():
            config.eval.params = which
        params, step = restore.restore_params(config, workdir, model, mesh)
        assert step == VARIANTS[variant]["step"]
        scores[which] = np.asarray(model.score_fn(params, inputs["x"], inputs["t"], None))
    return scores


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_imported_network_computes_the_official_scores_after_restore(variant, tmp_path):
    config = config_for(variant)
    import_checkpoint(fixture(f"{variant}.pth"), config, str(tmp_path / "run"))
    scores = restored_scores(config, str(tmp_path / "run"), variant)
    with np.load(fixture(f"{variant}_scores.npz")) as expected:
        assert not np.allclose(expected["score_raw"], expected["score_ema"], atol=1e-3)
        for which, got in scores.items():
            want = expected[f"score_{which}"]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max(),
                                       err_msg=f"{variant} {which}")


def test_imported_frequencies_are_the_checkpoints_and_init_from_reads_them(tmp_path):
    config = config_for("ncsnpp")
    workdir = str(tmp_path / "run")
    import_checkpoint(fixture("ncsnpp.pth"), config, workdir)
    official = torch_io.load(fixture("ncsnpp.pth"))["model"]["module.all_modules.0.W"]
    fixed = layers.GaussianFourierEmbedding(16, 16.0).frequencies[...]
    assert not np.allclose(official, fixed)  # a fresh network's, from a fixed key
    model = score_model("ncsnpp")
    optimizer = train.make_optimizer(config.optim)
    state = train.init_state(model.init_params, optimizer, config.seed)
    metadata = {"signature": experiment.model_signature(config, model.init_params)}
    fine_tune = train._init_from(workdir, state, optimizer, metadata)
    assert int(fine_tune.step) == 0
    for tree in (fine_tune.params, fine_tune.ema_params):
        np.testing.assert_array_equal(tree["fourier"]["frequencies"], official)
    # Resuming it is refused with the import's note, which says to use it as init_from.
    with checkpoint.Checkpointer(workdir) as ckpt, \
            pytest.raises(checkpoint.IncompatibleCheckpointError, match="init_from=") as error:
        ckpt.restore_latest_valid(state)
    assert "cannot be resumed" in str(error.value) and "opt_state" in str(error.value)


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcsbm_jax.convert", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cli_import_export_round_trip_is_exact(tmp_path):
    """DDPM++ (VP: the output layer is negated on the way in and back on the way out)."""
    spec = VARIANTS["ddpmpp"]
    flags = [f"--config.{k}={tuple(v) if isinstance(v, list) else v}"
             for k, v in spec["overrides"].items()]
    first, exported = str(tmp_path / "first"), str(tmp_path / "export.pth")
    result = convert_cli(fixture("ddpmpp.pth"), f"--config={spec['config']}",
                         f"--workdir={first}", *flags)
    assert result.returncode == 0, result.stderr
    assert "init_from=" in result.stdout
    result = convert_cli("--to=pytorch", first, exported)
    assert result.returncode == 0, result.stderr
    original, back = torch_io.load(fixture("ddpmpp.pth")), torch_io.load(exported)
    assert back["step"] == 3 and back["ema"]["num_updates"] == 3
    assert list(back["model"]) == list(original["model"])
    for name, value in original["model"].items():
        if name.endswith(layout.SIGMAS):
            # A buffer the export computes again with NumPy's exp, not a parameter: its
            # last bit depends on the machine's exp (SIMD or not), as in the authors' code.
            np.testing.assert_allclose(back["model"][name], value, rtol=1e-15, err_msg=name)
        else:
            np.testing.assert_array_equal(back["model"][name], value, err_msg=name)
    for a, b in zip(back["ema"]["shadow_params"], original["ema"]["shadow_params"], strict=True):
        np.testing.assert_array_equal(a, b)
    # And the import of the export has the same parameters as the first import.
    config = config_for("ddpmpp")
    import_checkpoint(exported, config, str(tmp_path / "second"))
    target = {"params": score_model("ddpmpp").init_params}
    target["ema_params"] = target["params"]
    trees = []
    for workdir in (first, str(tmp_path / "second")):
        with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
            trees.append(ckpt.restore(target)[0])
    for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def assert_nothing_written(tmp_path, workdir) -> None:
    assert not os.path.exists(workdir)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".convert")] == []


def test_a_checkpoint_of_another_config_names_the_keys_that_fix_it(tmp_path):
    workdir = str(tmp_path / "run")
    wrong = config_for("ncsnpp", **{"model.nf": 32, "model.progressive_input": "input_skip",
                                    "model.num_res_blocks": 2})
    with pytest.raises(ConvertError) as error:
        import_checkpoint(fixture("ncsnpp.pth"), wrong, workdir)
    message = str(error.value)
    assert "differences" in message and "all_modules.1.weight: [64, 32]" in message
    fix = message.split("these overrides", 1)[1].split("\n")[1].split()
    assert sorted(fix) == ["--config.model.nf=16", "--config.model.num_res_blocks=1",
                           "--config.model.progressive_input=residual"]
    assert_nothing_written(tmp_path, workdir)
    sigma = config_for("ncsnpp", **{"sde.sigma_max": 90.0})
    with pytest.raises(ConvertError, match="sigma from 0.01 to 50.*sde.sigma_max=50"):
        import_checkpoint(fixture("ncsnpp.pth"), sigma, workdir)
    with pytest.raises(ConvertError, match="model.family='constrained'"):
        import_checkpoint(fixture("ncsnpp.pth"), config_for("ncsnpp", **{
            "model.family": "constrained"}), workdir)
    assert_nothing_written(tmp_path, workdir)


def test_bad_files_get_one_clear_error_and_nothing_is_written(tmp_path):
    workdir = str(tmp_path / "run")
    config = config_for("ncsnpp")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 64)
    data = open(fixture("ncsnpp.pth"), "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[:len(data) // 2])
    other = tmp_path / "resnet.pth"
    torch_io.save({"conv1.weight": np.zeros((8, 3, 7, 7), np.float32),
                   "fc.bias": np.zeros(10, np.float32)}, other)
    original = torch_io.load(fixture("ncsnpp.pth"))
    original["ema"]["shadow_params"] = original["ema"]["shadow_params"][1:]
    short_ema = tmp_path / "short_ema.pth"
    torch_io.save(original, short_ema)
    cases = [
        (garbage, torch_io.TorchFileError, "not a PyTorch checkpoint"),
        (truncated, torch_io.TorchFileError, "damaged"),
        (os.path.join(ROOT, "tests", "fixtures", "torch_io", "evil.pth"),
         torch_io.TorchFileError, "builtins.print"),
        (other, ConvertError, "not an NCSN\\+\\+ / DDPM\\+\\+ state dict"),
        (short_ema, ConvertError, "shadow_params holds 153 tensors, the network 154"),
        (tmp_path / "missing.pth", FileNotFoundError, "missing.pth"),
    ]
    for path, kind, message in cases:
        with pytest.raises(kind, match=message):
            import_checkpoint(str(path), config, workdir)
        assert_nothing_written(tmp_path, workdir)
    import_checkpoint(fixture("ncsnpp.pth"), config, workdir)
    with pytest.raises(ConvertError, match="already holds checkpoints"):
        import_checkpoint(fixture("ncsnpp.pth"), config, workdir)
    result = convert_cli(str(garbage), "--config=configs/cifar10_usbm_ncsnpp.py",
                         f"--workdir={tmp_path / 'cli'}")
    assert result.returncode == 1 and "Not converted" in result.stderr
    assert "not a PyTorch checkpoint" in result.stderr.splitlines()[-1]
