"""The accuracy section: bfloat16 against float32 for the QC penalty estimate on fields of
known asymmetry, next to the estimate's own probe noise."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from qcsbm_jax import asymmetry, models, score

ASYMMETRY_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4)  # NAsym of the fields


def with_compute_dtype(score_fn: score.ScoreFn, dtype) -> score.ScoreFn:
    """score_fn evaluated with parameters and inputs cast to dtype (float32 masters)."""
    def cast(tree):
        return jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    def low_precision(params, x, t, key=None):
        return score_fn(cast(params), x.astype(dtype), t, key).astype(x.dtype)

    return low_precision


def _antisymmetric(dim: int, key: jax.Array) -> jax.Array:
    """A random antisymmetric D x D matrix with ||A||_F^2 = D (D - 1) / 2 on average."""
    m = jax.random.normal(key, (dim, dim))
    return (m - m.T) / 2


def bench_accuracy(bench: common.Bench, batch: int, dtype=jnp.bfloat16) -> list[dict]:
    """Error in `dtype` of the 'nonneg' penalty estimate on fields with known asymmetry.

    Field: s = s_c + e A x, s_c the model's conservative (energy) form, A antisymmetric,
    so J = J_c + e A with J_c symmetric: Asym = 2 e^2 ||A||_F^2 exactly and
    NAsym = e^2 ||A||^2 / (||J_c||^2 + e^2 ||A||^2), set to each ASYMMETRY_LEVELS value.
    Reports, per sample, the median relative error of the float32 estimate against the
    true Asym (probe noise) and of the low-precision estimate against float32 (same
    probes), and the relative error of the batch-mean estimate.
    """
    cfg = bench.config
    apply_fn, params = models.functional(
        models.build_model(cfg.model, bench.model.data_shape, jax.random.key(cfg.seed)))
    conservative = score.make_score_fn(apply_fn, bench.model.sde, "constrained",
                                       cfg.model.output)
    shape = (batch, *bench.model.data_shape)
    dim = math.prod(bench.model.data_shape)
    x = jnp.asarray(bench.data(batch)) + 0.3 * jax.random.normal(jax.random.key(4), shape)
    t = jnp.full((batch,), 0.3)
    a = _antisymmetric(dim, jax.random.key(5))
    v = asymmetry.sample_probes(jax.random.key(6), shape)
    per_sample = lambda y: jnp.sum(jnp.square(y).reshape(batch, -1), axis=1)

    def estimator(score_fn):
        """scale -> (penalty estimate [B], ||J v||^2 [B]) for s = score_fn + scale A x."""
        def field(z, scale):
            linear = (z.reshape(batch, dim) @ a.T).reshape(z.shape)
            return score_fn(params, z, t, None) + scale * linear

        def run(scale):
            _, jv, jtv = asymmetry.jacobian_products(lambda z: field(z, scale), x, v)
            return 0.5 * per_sample(jtv - jv), per_sample(jv)

        return jax.jit(run)

    high = estimator(conservative)
    low = estimator(with_compute_dtype(conservative, dtype))
    jc_norm2 = float(jnp.mean(high(jnp.float32(0.0))[1]))  # E ||J_c v||^2 = ||J_c||_F^2
    a_norm2 = float(jnp.sum(a * a))
    rows = []
    for level in ASYMMETRY_LEVELS:
        scale = jnp.float32(math.sqrt(level * jc_norm2 / (a_norm2 * (1 - level))))
        exact = 2 * float(scale) ** 2 * a_norm2
        est_high = np.asarray(high(scale)[0])
        est_low = np.asarray(low(scale)[0])
        rows.append(bench.row(
            "accuracy", batch=batch, dtype=jnp.dtype(dtype).name, nasym=level,
            probe_noise=float(np.median(np.abs(est_high - exact) / exact)),
            low_vs_f32=float(np.median(np.abs(est_low - est_high) / est_high)),
            batch_mean_low_vs_f32=float(abs(est_low.mean() - est_high.mean())
                                        / est_high.mean()),
            batch_mean_f32_vs_exact=float(abs(est_high.mean() - exact) / exact)))
    return rows
