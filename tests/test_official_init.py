"""Our initial weights follow the authors' initialisers (tests/fixtures/official_init).

For every network that mirrors one of theirs, each parameter's mean, standard deviation
and kurtosis must agree with the moments of their initialiser (pooled over many of their
builds) within six standard errors of our sample, its values must stay inside their
support when theirs is bounded (uniform), and constants must be the same constants.
Parameters are paired without names: by shape (in our layout; a 1x1 convolution
[1, 1, in, out] counts as the dense map [in, out] it is, which is how their DDPM blocks
store it), then by spread.
"""

import functools
import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from qcsbm_jax.experiments import autoencoder
from qcsbm_jax.models.ncsnpp import NCSNpp
from qcsbm_jax.models.toy import ToyScoreNet

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_init",
                       "official_init.json")
SEEDS = 64  # our builds pooled for the small networks


@functools.cache
def _official() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)


def _moments(values: np.ndarray) -> dict:
    x = np.asarray(values, np.float64).ravel()
    centred = x - x.mean()
    var = float(np.mean(centred**2))
    return {"n": x.size, "mean": float(x.mean()), "std": var**0.5,
            "kurtosis": float(np.mean(centred**4)) / var**2 if var > 0 else 0.0,
            "absmax": float(np.max(np.abs(x)))}


def _shape(shape) -> tuple:
    shape = tuple(shape)
    return shape[2:] if len(shape) == 4 and shape[:2] == (1, 1) else shape


def _mismatches(official: list[dict], ours: list[tuple[tuple, dict]]) -> list[str]:
    """What disagrees between their records and ours [(shape, moments)]; [] if nothing."""
    problems = []
    shapes = sorted({_shape(r["shape"]) for r in official} | {_shape(s) for s, _ in ours})
    for shape in shapes:
        theirs = sorted((r for r in official if _shape(r["shape"]) == shape),
                        key=lambda r: (r["std"], r["mean"]))
        mine = sorted((m for s, m in ours if _shape(s) == shape),
                      key=lambda m: (m["std"], m["mean"]))
        if len(theirs) != len(mine):
            problems.append(f"{shape}: {len(theirs)} of theirs, {len(mine)} of ours")
            continue
        for o, u in zip(theirs, mine):
            problems += [f"{o['name']} {shape}: {p}" for p in _compare(o, u)]
    return problems


def _compare(o: dict, u: dict) -> list[str]:
    if o["std"] == 0:
        same = u["std"] == 0 and u["mean"] == o["mean"]
        return [] if same else [f"constant {o['mean']} vs mean {u['mean']}, std {u['std']}"]
    n, k = u["n"], o["kurtosis"]
    out = []
    if abs(u["mean"] - o["mean"]) > 6 * o["std"] / math.sqrt(n):
        out.append(f"mean {u['mean']:.3g} vs {o['mean']:.3g}")
    spread = 6 * math.sqrt((k - 1) / (4 * n)) + 6 * math.sqrt((k - 1) / (4 * o["n"]))
    if abs(u["std"] / o["std"] - 1) > spread:
        out.append(f"std {u['std']:.4g} vs {o['std']:.4g}")
    if k < 2 and u["absmax"] > o["absmax"] * (1 + 10 / o["n"]):  # uniform: bounded
        out.append(f"max |x| {u['absmax']:.4g} beyond their bound {o['absmax']:.4g}")
    if n >= 2000 and abs(u["kurtosis"] - k) > 6 * math.sqrt(24 / n):
        out.append(f"kurtosis {u['kurtosis']:.3g} vs {k:.3g}")
    return out


def _pooled(tree) -> list[tuple[tuple, dict]]:
    """Moments of each leaf [S, *shape] pooled over its leading (seed) axis."""
    return [(a.shape[1:], _moments(a)) for a in jax.tree.leaves(tree)]


def _toy(init: str) -> list[tuple[tuple, dict]]:
    def build(key):
        net = ToyScoreNet(2, (64, 128, 256), (1, 1, 1), init=init, rngs=nnx.Rngs(key))
        return nnx.to_pure_dict(nnx.state(net))

    return _pooled(jax.jit(jax.vmap(build))(jax.random.split(jax.random.key(0), SEEDS)))


def test_toy_network_initialises_as_theirs():
    assert _mismatches(_official()["toy"], _toy("pytorch")) == []


def test_flax_initialisation_is_told_apart():
    """The test can fail: Flax's defaults (lecun_normal, zero biases) are not theirs."""
    problems = _mismatches(_official()["toy"], _toy("flax"))
    assert any("bias" in p for p in problems) and any("weight" in p for p in problems)


def test_autoencoder_initialises_as_theirs():
    config = autoencoder.ml_collections.ConfigDict(dict(dim=2, hidden=2, init_scale=1.0))
    _, params = autoencoder.init_params(jax.random.split(jax.random.key(0), SEEDS), config)
    assert _mismatches(_official()["autoencoder"], _pooled(params)) == []


@pytest.mark.parametrize("name", ["ncsnpp_residual", "ncsnpp_input_skip", "ddpmpp",
                                  "ncsnpp_ddpm_blocks", "ncsnpp_residual_pyramids"])
def test_image_network_initialises_as_theirs(name):
    """Every parameter and buffer of our NCSN++ / DDPM++ (weights, biases, GroupNorm,
    Fourier frequencies) against theirs, in small settings that cover each code path."""
    settings = {k: tuple(v) if isinstance(v, list) else v
                for k, v in _official()["settings"][name].items()}
    net = NCSNpp(image_size=32, channels=3, center_input=True, **settings,
                 rngs=nnx.Rngs(jax.random.key(0)))
    ours = [(a.shape, _moments(a)) for a in jax.tree.leaves(nnx.to_pure_dict(nnx.state(net)))]
    assert _mismatches(_official()[name], ours) == []
