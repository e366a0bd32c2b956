"""Samplers by name, as jitted programs sharded over a mesh: what every mode runs.

METHODS[name] is a Method: `run(params, keys [B] typed, *, score_fn, sde, shape,
**settings) -> (x [B, *shape], nfe [B] int32)` and the config.sampling keys it reads.
Sample b's randomness comes from keys[b] alone, and its prior draw from split(keys[b])[0]
for every method, so samplers can be compared on the same starting points.

`make_sampler` wraps a method into sample_fn(params, base_key, n): the keys of samples
0..n-1 are fold_in(base_key, i), so sample i of a base key does not depend on n, on the
batch it shares or on the number of devices. Batches are padded to power-of-two buckets
(parallel.bucket_size): a new n compiles nothing new within a bucket.
"""

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qcsbm_jax import parallel, streams
from qcsbm_jax.sampling import flow, pc, solvers


@dataclasses.dataclass(frozen=True)
class Method:
    """A sampler: its in-graph function and the config.sampling keys it takes."""
    run: Callable
    settings: tuple[str, ...]
    description: str


def _prior(keys: jax.Array, sde, shape: tuple[int, ...]) -> jax.Array:
    """Prior draws [B, *shape], sample b's from split(keys[b])[0]."""
    return jax.vmap(lambda k: sde.prior_sample(jax.random.split(k)[0], shape))(keys)


def _pc(params, keys, *, score_fn, sde, shape, num_steps, predictor, corrector, snr,
        corrector_steps, denoise, eps):
    x = pc.pc_sample_per_key(
        params, keys, score_fn=score_fn, sde=sde, shape=shape, num_steps=num_steps,
        predictor=predictor, corrector=corrector, snr=snr, corrector_steps=corrector_steps,
        denoise=denoise, eps=eps, progress=_log_progress)
    nfe = nfe_per_sample("pc", dict(num_steps=num_steps, predictor=predictor,
                                    corrector=corrector, corrector_steps=corrector_steps,
                                    denoise=denoise))
    return x, jnp.full((keys.shape[0],), nfe, jnp.int32)


def _ode(params, keys, *, score_fn, sde, shape, rtol, atol, eps):
    return flow.ode_sample_from_prior(params, _prior(keys, sde, shape), score_fn=score_fn,
                                      sde=sde, rtol=rtol, atol=atol, eps=eps)


def _log_progress(step: int, total: int) -> None:
    logging.info("PC sampling: step %d/%d", step, total)


_SOLVER_DESCRIPTIONS = {
    "euler": "Euler on the probability-flow ODE, rho grid (NFE N)",
    "heun": "Heun (2nd order) on the probability-flow ODE, rho grid (NFE 2N)",
    "edm_stochastic": "EDM's stochastic sampler: churn + Heun (NFE 2N)",
    "dpm_solver_2m": "DPM-Solver++(2M), multistep, data prediction (NFE N)",
    "euler_maruyama": "Euler-Maruyama on the reverse SDE (NFE N)",
}
METHODS = {
    "pc": Method(_pc, ("num_steps", "predictor", "corrector", "snr", "corrector_steps",
                       "denoise", "eps"),
                 "predictor-corrector (reverse diffusion + Langevin by default; NFE 2N)"),
    "ode": Method(_ode, ("rtol", "atol", "eps"),
                  "probability-flow ODE, adaptive RK45 (NFE per sample varies)"),
    **{name: Method(function, ("num_steps", "eps", *solvers.SETTINGS[name]),
                    _SOLVER_DESCRIPTIONS[name])
       for name, function in solvers.SOLVERS.items()},
}


def nfe_per_sample(method: str, settings: dict[str, Any]) -> int | None:
    """Score evaluations one sample of `method` takes; None for the adaptive ODE solver."""
    if method == "ode":
        return None
    if method == "pc":
        s = settings
        return (s["num_steps"] * ((s["predictor"] != "none")
                                  + s["corrector_steps"] * (s["corrector"] != "none"))
                + int(s["denoise"]))
    return solvers.nfe_per_sample(method, settings["num_steps"], settings["denoise"])


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"Unknown sampling method {method!r}; valid: {sorted(METHODS)}.")
    return METHODS[method]


def check_settings(method: str, sde, settings: dict[str, Any]) -> None:
    """One clear ValueError if `method` cannot run with these settings on `sde` (the
    fixed-step solvers' checks: solvers.check_settings)."""
    check_method(method)
    if method in solvers.SOLVERS:
        solvers.check_settings(method, sde, settings["num_steps"],
                               **{k: v for k, v in settings.items() if k != "num_steps"})


def settings_from_config(sampling: Mapping[str, Any], method: str,
                         **overrides) -> dict[str, Any]:
    """The settings of `method` from `sampling` (a config's sampling section: every key of
    every method), with overrides applied; an override
    the method does not take is an error that lists the ones it does."""
    keys = check_method(method).settings
    unknown = sorted(set(overrides) - set(keys))
    if unknown:
        raise ValueError(f"Sampler {method!r} takes no setting {unknown}; it takes {keys}.")
    return {key: overrides.get(key, sampling[key]) for key in keys}


LANGEVIN_MIN_DIMS = 64  # below, the corrector's rule inflates the variance (pc._langevin)

SampleFn = Callable[[Any, jax.Array, int], tuple[np.ndarray, np.ndarray]]


def make_sampler(model, mesh, method: str, *, batch_size: int, **settings) -> SampleFn:
    """sample_fn(params, base_key, n) -> (samples [n, *S] float32, nfe [n] int32), on host.

    model: experiment.ScoreModel. Every settings key of the method must be given.
    batch_size: the largest batch one program runs (a multiple of the device count).
    """
    fn = sampler_program(model, mesh, method, **settings)

    def sample_fn(params, base_key, n):
        keys = streams.example_keys(base_key, n)
        return parallel.map_batches(lambda k: fn(params, k), (keys,),
                                    parallel.bucket_size(n, batch_size, mesh), mesh,
                                    label=f"{method} sampling")

    return sample_fn


def sampler_program(model, mesh, method: str, **settings) -> Callable:
    """The jitted program behind make_sampler: fn(params, key_data [B, 2] uint32) ->
    (x [B, *S], nfe [B]), the batch split over the mesh, parameters replicated."""
    entry = check_method(method)
    missing = sorted(set(entry.settings) - set(settings))
    if missing:
        raise ValueError(f"Sampler {method!r} needs the settings {missing}.")
    check_settings(method, model.sde, settings)
    dims = math.prod(model.data_shape)
    if settings.get("corrector") == "langevin" and dims < LANGEVIN_MIN_DIMS:
        warnings.warn(
            f"The Langevin corrector's step-size rule needs high-dimensional data; in {dims} "
            "dimensions it throws samples far outside the data (sampling.pc._langevin). "
            "Use corrector='none' (the toy configs' default) or the ODE sampler.",
            stacklevel=3)

    def local(params, key_data):
        return entry.run(params, jax.random.wrap_key_data(key_data), score_fn=model.score_fn,
                         sde=model.sde, shape=model.data_shape, **settings)

    return jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=1))


def make_config_sampler(sampling: Mapping[str, Any], model, mesh,
                        method: str | None = None, **overrides) -> SampleFn:
    """make_sampler with the method (or `method`), batch size and settings of `sampling`,
    a config's sampling section."""
    method = method or sampling["method"]
    return make_sampler(model, mesh, method, batch_size=sampling["batch_size"],
                        **settings_from_config(sampling, method, **overrides))
