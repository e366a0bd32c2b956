"""The notebook front door: `run = qcsbm_jax.load(workdir)`.

    run = qcsbm_jax.load("runs/gaussians8_qcsbm")      # a trained or converted run
    s = run.score(x, t)                                 # x [B, *S], t scalar or [B]
    samples, info = run.sample(1000, method="ode", seed=0)
    ll = run.log_likelihood(x)                          # {'nll', 'nfe'} (+ 'bpd', images)
    asym = run.asymmetry(x, t)                          # {'asym', 'nasym'} per example

Shapes and units: x is in the data's layout and range ([N, 2] points; images [N, H, W, C]
in [0, 1], or [-1, 1] with data.centered); t is the SDE time in [0, 1] (T = 1). Every
method runs a jitted program sharded over all devices and cached on the Run; batches are
padded to power-of-two buckets, so a new N compiles nothing new within its bucket. Sample
i of a seed does not depend on how many samples are asked for.
"""

from typing import Any

import jax
import ml_collections
import numpy as np

from qcsbm_jax import asymmetry, experiment, likelihood, parallel, restore, streams
from qcsbm_jax.evaluation import programs
from qcsbm_jax.sampling import registry


class Run:
    """A score model with restored parameters and its jitted, cached programs."""

    def __init__(self, config: ml_collections.ConfigDict, model: experiment.ScoreModel,
                 params: Any, step: int, mesh, workdir: str | None = None):
        self.config, self.model, self.params = config, model, params
        self.step, self.mesh, self.workdir = step, mesh, workdir
        self._programs: dict[tuple, Any] = {}
        self._score = jax.jit(lambda p, x, t: model.score_fn(p, x, t, None))

    def __repr__(self) -> str:
        c = self.config
        family = ("CSBM" if c.model.family == "constrained"
                  else "QCSBM" if c.loss.qc_weight > 0 else "USBM")
        return (f"Run({self.workdir!r}, step {self.step}: {family} {c.model.name} on "
                f"{c.data.name}, {c.sde.name.upper()} SDE)")

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.model.data_shape

    def with_params(self, params: Any, step: int, workdir: str | None = None) -> "Run":
        """A Run of the same model with other parameters (another seed or checkpoint of
        this config), sharing the compiled programs: they take the parameters as input."""
        other = Run(self.config, self.model, params, step, self.mesh, workdir)
        other._programs, other._score = self._programs, self._score
        return other

    def _program(self, key: tuple, make):
        if key not in self._programs:
            self._programs[key] = make()
        return self._programs[key]

    def score(self, x, t) -> jax.Array:
        """The score s(x, t) [B, *S] for x [B, *S] and t scalar or [B]."""
        x = np.asarray(x, np.float32)
        t = np.broadcast_to(np.asarray(t, np.float32), (len(x),))
        return self._score(self.params, x, t)

    def sample(self, n: int, method: str | None = None, seed: int = 0,
               **overrides) -> tuple[np.ndarray, dict]:
        """n samples [n, *S] in the data's range and info {'nfe': [n], 'method',
        'settings', 'step'}. method: a name of sampling.registry.METHODS (default
        config.sampling.method); overrides: that sampler's settings (e.g. num_steps=500).
        Sample i comes from fold_in(the 'sample' stream key of seed, i)."""
        method = method or self.config.sampling.method
        settings = registry.settings_from_config(self.config.sampling, method, **overrides)
        sample_fn = self._program(
            ("sample", method, tuple(sorted(settings.items()))),
            lambda: registry.make_sampler(self.model, self.mesh, method,
                                          batch_size=self.config.sampling.batch_size,
                                          **settings))
        samples, nfe = sample_fn(self.params, streams.stream_key(seed, "sample"), n)
        return samples, {"nfe": nfe, "method": method, "settings": settings, "step": self.step}

    def log_likelihood(self, x, seed: int = 0) -> dict[str, np.ndarray]:
        """-log p(x) per example by the probability-flow ODE (config.eval: divergence,
        tolerances). x: float data [N, *S] in the model's range: {'nll' [N] in nats,
        'nfe' [N]}; or 8-bit images uint8 [N, H, W, C], uniformly dequantized:
        also 'bpd' [N], bits/dim. Probes and dequantization noise of example i come from
        fold_in(the 'eval' stream key of seed, i)."""
        ev, x = self.config.eval, np.asarray(x)
        images = x.dtype == np.uint8
        centered = images and self.config.data.centered
        nll_fn = self._program(("nll", images), lambda: programs.make_nll_fn(
            self.model, self.mesh, divergence=ev.divergence, rtol=ev.rtol, atol=ev.atol,
            eps=ev.eps, batch_size=ev.batch_size, dequantize=images, centered=centered))
        nll, nfe = nll_fn(self.params, programs.eval_key(seed, programs.NLL_STREAM),
                          x if images else x.astype(np.float32))
        result = {"nll": nll, "nfe": nfe}
        if images:
            result["bpd"] = np.asarray(likelihood.bits_per_dim(
                nll, int(np.prod(self.data_shape)),
                data_scale=likelihood.image_data_scale(centered)))
        return result

    def asymmetry(self, x, t, seed: int = 0) -> dict[str, np.ndarray]:
        """Asym = 1/2 ||J - J^T||_F^2 and NAsym = Asym / (2 ||J||_F^2) per example of the
        score's Jacobian J at (x [N, *S], t scalar or [N]). Exact for data of at most
        asymmetry.MAX_EXACT_DIM dimensions; otherwise unbiased one-probe Hutchinson
        estimates (probe of example i from fold_in(the 'eval' stream key of seed, i); the
        per-example NAsym is then a ratio of two noisy estimates: average over examples)."""
        x = np.asarray(x, np.float32)
        batch = self.config.eval.batch_size
        if int(np.prod(self.data_shape)) <= asymmetry.MAX_EXACT_DIM:
            fn = self._program(("asym_exact",), lambda: programs.make_exact_asymmetry_fn(
                self.model, self.mesh, batch_size=batch))
            asym, nasym = fn(self.params, x, t)
            return {"asym": asym, "nasym": nasym}
        fn = self._program(("asym_hutchinson",), lambda: programs.make_hutchinson_asymmetry_fn(
            self.model, self.mesh, batch_size=batch, perturb=False))
        asym, frob = fn(self.params, programs.eval_key(seed, programs.ASYMMETRY_STREAM), x, t)
        return {"asym": asym, "nasym": asym / (2 * frob)}


def load(workdir: str, config: ml_collections.ConfigDict | None = None,
         params: str = "ema", step: int | None = None, mesh=None) -> Run:
    """A Run of the newest (or `step`'s) checkpoint in workdir.

    config: None reads the config the run was saved with (its checkpoint metadata);
    params: 'ema' (EMA parameters; the trained ones when training kept no EMA) or 'raw';
    mesh: None makes a data-parallel mesh over all devices (parallel.make_mesh).
    """
    config = config if config is not None else restore.read_config(workdir, step)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    model = experiment.build_score_model(config)
    restored, saved_step = restore.restore_params(config, workdir, model, mesh, step, params)
    return Run(config, model, restored, saved_step, mesh, workdir)
