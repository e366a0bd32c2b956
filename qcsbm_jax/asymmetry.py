"""Asymmetry of the Jacobian of a score field: Hutchinson estimators, exact values, metrics.

For one sample with flattened dimension D and J = ds/dx (J_ij = ds_i/dx_j, D x D):

  Asym(J)  = 1/2 ||J - J^T||_F^2 = tr(J J^T) - tr(J J)          (the QC penalty)
  NAsym(J) = (1/4 ||J - J^T||_F^2) / ||J||_F^2, in [0, 1]

Hutchinson estimators of Asym for a probe v with E[v v^T] = I (unbiased for any such v):

  'nonneg'  1/2 ||J^T v - J v||^2       J v and J^T v; never negative (default)
  'jvp_vjp' ||J^T v||^2 - (J v).(J^T v)  J v and J^T v
  'two_vjp' ||J^T v||^2 - v.(J^T J^T v)  two vjps (the paper's PyTorch form)
  'exact'   Asym from the full Jacobian, D jvps (small D only)

J v and J^T v come from one linearisation of f and its transpose (jacobian_products), so
one primal pass serves the score, both products and the DSM term of the loss.

'nonneg' is the default: it has the same mean as 'jvp_vjp' and the same cost, its
per-probe values are never negative (a mini-batch penalty cannot reward asymmetry), and its
variance was lower in our measurements (docs/benchmarks.md, tests/test_asymmetry.py).

Fields are batched functions f: [B, *S] -> [B, *S] whose samples do not interact, so the
Jacobian of the batch is block diagonal and one product per batch gives one per sample.
Whatever randomness f closes over (a dropout key) is shared by the primal, jvp and vjp passes.

Gradients with respect to f's parameters (GRADIENTS):
  'estimate'  through every product: jax.grad of the estimate is its exact gradient, as in
              the paper's double backward.
  'jvp'       the value is the estimate, the gradient is that of 2 sg(A v).(J v) with
              A = J - J^T and sg = stop_gradient. Since d Asym = 2 <A, dJ> and
              E_v[(A v)^T dJ v] = <A, dJ>, it is an unbiased estimate of the gradient of
              Asym = E[estimate] (not of one probe's estimate), and the J^T v pass is not
              differentiated: a train step costs about 7 forward-pass units instead of 9
              (DSM: 3; docs/benchmarks.md).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

Field = Callable[[jax.Array], jax.Array]

ESTIMATORS = ("nonneg", "jvp_vjp", "two_vjp", "exact")
PROBES = ("rademacher", "gaussian")
PRODUCTS = ("linearize", "separate")
GRADIENTS = ("estimate", "jvp")


def check_gradient(estimator: str, gradient: str) -> None:
    """Raises ValueError unless gradient is one of GRADIENTS and fits the estimator:
    'jvp' needs J v and J^T v, so 'nonneg' or 'jvp_vjp'."""
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient (loss.qc_gradient) must be one of {GRADIENTS}, "
                         f"got {gradient!r}.")
    if gradient == "jvp" and estimator not in ("nonneg", "jvp_vjp"):
        raise ValueError(f"qc_gradient='jvp' needs J v and J^T v: set the estimator "
                         f"(loss.estimator) to 'nonneg' or 'jvp_vjp' (got {estimator!r}; "
                         "all have the same mean), or qc_gradient='estimate'.")


def _sum_per_sample(a: jax.Array) -> jax.Array:
    """[B, ...] -> [B]."""
    return jnp.sum(a, axis=tuple(range(1, a.ndim)))


def sample_probes(key: jax.Array, shape: tuple[int, ...], kind: str = "rademacher",
                  dtype=jnp.float32) -> jax.Array:
    """Probes v with E[v v^T] = I: Rademacher (+-1) or standard Gaussian."""
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype=dtype)
    raise ValueError(f"probe must be one of {PROBES}, got {kind!r}.")


def jacobian_products(f: Field, x: jax.Array, v: jax.Array, method: str = "linearize"):
    """Returns (f(x), J v, J^T v), each [B, *S].

    method 'linearize' (default): one jax.linearize of f at x gives J v, and transposing
      that linear map gives J^T v, so one primal pass and one set of residuals serve both.
    method 'separate': jax.jvp and jax.vjp, each tracing its own primal pass (XLA merges
      part of the duplicate work). Kept as the baseline benchmarks/run.py compares
      against: 'linearize' compiles to fewer convolutions and runs the QC train step
      faster (docs/benchmarks.md).
    """
    if method == "linearize":
        out, linear = jax.linearize(f, x)
        (jtv,) = jax.linear_transpose(linear, x)(v)
        return out, linear(v), jtv
    if method == "separate":
        out, jv = jax.jvp(f, (x,), (v,))
        _, vjp_fn = jax.vjp(f, x)
        (jtv,) = vjp_fn(v)
        return out, jv, jtv
    raise ValueError(f"method must be one of {PRODUCTS}, got {method!r}.")


def hutchinson_asymmetry(f: Field, x: jax.Array, v: jax.Array, estimator: str = "nonneg",
                         method: str = "linearize", gradient: str = "estimate"):
    """One-probe estimate of Asym per sample.

    Args:
      f: batched field [B, *S] -> [B, *S].
      x: [B, *S] points.
      v: [B, *S] probes with E[v v^T] = I.
      estimator: 'nonneg', 'jvp_vjp' or 'two_vjp'.
      method: how 'nonneg' and 'jvp_vjp' get J v and J^T v (jacobian_products).
      gradient: 'estimate' or 'jvp' (module docstring); 'jvp' needs J v, so not 'two_vjp'.
    Returns:
      (f(x) [B, *S], estimate [B]).
    """
    check_gradient(estimator, gradient)
    if estimator == "two_vjp":
        out, vjp_fn = jax.vjp(f, x)
        (jtv,) = vjp_fn(v)
        (jtjtv,) = vjp_fn(jtv)
        return out, _sum_per_sample(jtv * jtv - v * jtjtv)
    out, jv, jtv = jacobian_products(f, x, v, method)
    if estimator == "nonneg":
        estimate = 0.5 * _sum_per_sample(jnp.square(jtv - jv))
    elif estimator == "jvp_vjp":
        estimate = _sum_per_sample(jtv * jtv - jv * jtv)
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS[:3]} here, got {estimator!r}.")
    if gradient == "jvp":
        surrogate = 2 * _sum_per_sample(jax.lax.stop_gradient(jv - jtv) * jv)
        estimate = jax.lax.stop_gradient(estimate - surrogate) + surrogate
    return out, estimate


MAX_EXACT_DIM = 64


def value_and_jacobian(f: Field, x: jax.Array):
    """f(x) and its per-sample Jacobian from D jvps, one per input coordinate (small D only).

    Returns (f(x) [B, *S], J [B, D, D]) with D = prod(S) and J[b, i, j] = ds_i/dx_j.
    An unrolled loop of jvps runs faster on CPU than vmapping one linearisation over
    the basis (XLA's batched matmuls are the slow part).
    """
    batch, dim = x.shape[0], x[0].size
    if dim > MAX_EXACT_DIM:
        raise ValueError(f"The exact Jacobian needs {dim} jvps per sample; use a Hutchinson "
                         f"estimator ('nonneg') for data of more than {MAX_EXACT_DIM} dims.")
    columns, basis = [], jnp.eye(dim, dtype=x.dtype)
    for j in range(dim):
        # A row of eye, not zeros().at[j].set(1): libtpu's SPMD compile of that scatter on
        # a constant fails ("Size of broadcast_dimensions has to match operand's rank").
        e_j = basis[j].reshape(x.shape[1:])
        out, column = jax.jvp(f, (x,), (jnp.broadcast_to(e_j, x.shape),))
        columns.append(column.reshape(batch, dim))
    return out, jnp.stack(columns, axis=-1)


def full_jacobian(f: Field, x: jax.Array) -> jax.Array:
    """Per-sample Jacobian J [B, D, D] of f at x [B, *S] (value_and_jacobian without f(x))."""
    return value_and_jacobian(f, x)[1]


def asymmetry(jacobian: jax.Array) -> jax.Array:
    """Asym = 1/2 ||J - J^T||_F^2 for J [B, D, D]; returns [B]."""
    antisym = jacobian - jnp.swapaxes(jacobian, -1, -2)
    return 0.5 * jnp.sum(jnp.square(antisym), axis=(-2, -1))


def normalized_asymmetry(jacobian: jax.Array) -> jax.Array:
    """NAsym = (1/4 ||J - J^T||_F^2) / ||J||_F^2 in [0, 1] for J [B, D, D]; returns [B]."""
    frobenius = jnp.sum(jnp.square(jacobian), axis=(-2, -1))
    return 0.5 * asymmetry(jacobian) / frobenius


def draw_probes(key: jax.Array, x: jax.Array, num_probes: int = 1,
                kind: str = "rademacher") -> jax.Array:
    """K = num_probes probes per sample of x [B, *S]: [B, K, *S] (asymmetry_penalty's)."""
    flat = sample_probes(key, (x.shape[0] * num_probes, *x.shape[1:]), kind, x.dtype)
    return flat.reshape(x.shape[0], num_probes, *x.shape[1:])


def asymmetry_penalty(field: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                      t: jax.Array, key: jax.Array, *, estimator: str = "nonneg",
                      probe: str = "rademacher", num_probes: int = 1,
                      method: str = "linearize", gradient: str = "estimate"):
    """The QC penalty per sample, and the field's value for reuse by the DSM term.

    Args:
      field: batched field(x [B, *S], t [B]) -> [B, *S].
      x, t: [B, *S] points and [B] times.
      key: probe key (unused by 'exact'); the probes are draw_probes(key, x, num_probes,
        probe), K = num_probes per sample (penalty_with_probes).
      method: how J v and J^T v are computed (jacobian_products).
      gradient: 'estimate' or 'jvp' (module docstring; Hutchinson estimators only).
    Returns:
      (field(x, t) [B, *S], penalty [B]).
    """
    check_gradient(estimator, gradient)
    probes = None if estimator == "exact" else draw_probes(key, x, num_probes, probe)
    return penalty_with_probes(field, x, t, probes, estimator=estimator, method=method,
                               gradient=gradient)


def penalty_with_probes(field: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                        t: jax.Array, probes: jax.Array | None, *,
                        estimator: str = "nonneg", method: str = "linearize",
                        gradient: str = "estimate"):
    """asymmetry_penalty with the probes given: probes [B, K, *S] (None for 'exact').

    Each sample is copied K times with one probe per copy, as in the paper, and the K
    estimates are averaged. Returns (field(x, t) [B, *S], penalty [B]).
    """
    check_gradient(estimator, gradient)
    if estimator == "exact":
        out, jacobian = value_and_jacobian(lambda y: field(y, t), x)
        return out, asymmetry(jacobian)
    if probes is None or probes.shape[:1] + probes.shape[2:] != x.shape:
        raise ValueError(f"The {estimator!r} estimator needs probes of shape [B, K, *S] for "
                         f"x of shape {x.shape}, got "
                         f"{None if probes is None else probes.shape}.")
    num_probes = probes.shape[1]
    copies_x = jnp.repeat(x, num_probes, axis=0)
    copies_t = jnp.repeat(t, num_probes, axis=0)
    v = probes.reshape(copies_x.shape)
    out, estimate = hutchinson_asymmetry(lambda y: field(y, copies_t), copies_x, v, estimator,
                                         method, gradient)
    return out[::num_probes], estimate.reshape(x.shape[0], num_probes).mean(axis=1)


def hutchinson_metrics(f: Field, x: jax.Array, v: jax.Array):
    """Unbiased one-probe estimates of (Asym [B], ||J||_F^2 [B]) for evaluation.

    ||J||_F^2 = tr(J J^T) = E ||J^T v||^2. NAsym over a set is then estimated as
    mean(Asym) / (2 mean(||J||_F^2)), a ratio of unbiased means.
    """
    _, jv, jtv = jacobian_products(f, x, v)
    return 0.5 * _sum_per_sample(jnp.square(jtv - jv)), _sum_per_sample(jnp.square(jtv))
