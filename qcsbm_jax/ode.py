"""In-graph adaptive Dormand-Prince 5(4) ODE solver (RK45) for one trajectory.

The method and its controls follow Hairer, Norsett & Wanner, "Solving Ordinary Differential
Equations I", Sec. II.4-II.5 (the same choices as scipy.integrate.solve_ivp(method='RK45')):
  - 7-stage Dormand-Prince pair; the 5th-order solution is propagated and the last stage
    is the first stage of the next step (FSAL), so a step costs 6 evaluations.
  - error norm: rms over all state entries of err_i / (atol + rtol max(|y_i|, |y_new_i|)),
    err the difference of the 5th- and 4th-order solutions; a step is accepted if < 1.
  - step-size control: h <- h * clip(0.9 err^(-1/5), 0.2, 10), with no increase right
    after a rejection.
  - initial step from Hairer's heuristic (one extra evaluation).
The solve is a lax.while_loop with no cross-trajectory reductions: vmap it to give every
trajectory its own step sizes and evaluation count. Under vmap the loop runs until the
slowest trajectory finishes (finished ones are masked, not counted). It is not
reverse-mode differentiable.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

# A bound against runaway solves, not a budget: the probability-flow ODE of an energy model
# with a LeakyReLU head (the authors' 8-Gaussians CSBM) is non-smooth, and at rtol 1e-3 a
# rare test point needs far more step attempts than the rest (docs/results.md).
DEFAULT_MAX_STEPS = 32768

SAFETY = 0.9
MIN_FACTOR = 0.2
MAX_FACTOR = 10.0
ERROR_EXPONENT = -1.0 / 5.0  # -1 / (order of the embedded error estimate + 1)

# Dormand & Prince (1980) tableau. Row s of _A gives stage s (s = 1..6) from stages < s;
# row 6 equals the 5th-order weights, so stage 6 is f(t + h, y_new) (FSAL).
_C = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1])
_A = np.array([
    [0, 0, 0, 0, 0, 0, 0],
    [1 / 5, 0, 0, 0, 0, 0, 0],
    [3 / 40, 9 / 40, 0, 0, 0, 0, 0],
    [44 / 45, -56 / 15, 32 / 9, 0, 0, 0, 0],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0, 0],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0, 0],
    [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
])
# 5th- minus 4th-order weights over the 7 stages: the local error estimate is h E.K.
_E = np.array([71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])


def max_nfe(max_steps: int) -> int:
    """Evaluations of a solve that uses all max_steps step attempts."""
    return 2 + 6 * max_steps


class _State(NamedTuple):
    t: jax.Array        # current time
    y: jax.Array        # [N] flat state at t
    f: jax.Array        # [N] fn(t, y) (FSAL)
    h_abs: jax.Array    # proposed |step|
    rejected: jax.Array  # the last attempt was rejected
    attempts: jax.Array  # step attempts made (accepted or rejected), int32
    stuck: jax.Array    # the step size fell below 10 ulp of t (or is NaN)


def _rms(a: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(a)))


def _initial_step(f, t0, y0, f0, t1, rtol, atol):
    """|h0| by Hairer's heuristic (one evaluation of f), capped at |t1 - t0|."""
    direction = jnp.sign(t1 - t0)
    interval = jnp.abs(t1 - t0)
    scale = atol + rtol * jnp.abs(y0)
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    h0 = jnp.minimum(h0, interval)
    f1 = f(t0 + direction * h0, y0 + direction * h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = jnp.where((d1 <= 1e-15) & (d2 <= 1e-15), jnp.maximum(1e-6, 1e-3 * h0),
                   (0.01 / jnp.maximum(d1, d2)) ** (1.0 / 5.0))
    return jnp.minimum(jnp.minimum(100 * h0, h1), interval)


def _dopri_step(f, t, y, f0, h):
    """One Dormand-Prince step: (y_new, f(t + h, y_new), error estimate), each [N]."""
    a, c, e = (jnp.asarray(m, y.dtype) for m in (_A, _C, _E))

    def stage(k, s):
        k = k.at[s].set(f(t + c[s] * h, y + h * (a[s] @ k)))
        return k, None

    k = jnp.zeros((7,) + y.shape, y.dtype).at[0].set(f0)
    k, _ = lax.scan(stage, k, jnp.arange(1, 7))
    return y + h * (a[6] @ k), k[6], h * (e @ k)


def solve(fn: Callable[[jax.Array, Any], Any], y0: Any, t0, t1, *, rtol: float, atol: float,
          max_steps: int = DEFAULT_MAX_STEPS):
    """Integrates dy/dt = fn(t, y) from t0 to t1 (t1 < t0 integrates backwards).

    Args:
      fn: fn(t, y) -> dy/dt with the pytree structure of y; t is a scalar.
      y0: initial state, an array or pytree of float arrays (one trajectory).
      t0, t1: scalar start and end times.
      rtol, atol: relative and absolute tolerances, as in scipy's solve_ivp.
      max_steps: bound on step attempts (accepted or rejected).
    Returns:
      (y1, nfe): the state at t1 (structure of y0) and the number of fn evaluations
      (int32 scalar; 2 + 6 per step attempt). A solve that fails, by using all max_steps
      attempts or by its step size falling below 10 ulp of t (e.g. NaN in fn), returns y1
      filled with NaN; nfe is then what it spent (max_nfe(max_steps) for the former).
    """
    flat0, unravel = ravel_pytree(y0)
    dtype = flat0.dtype
    t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
    direction = jnp.sign(t1 - t0)

    def f(t, y):
        return ravel_pytree(fn(t, unravel(y)))[0].astype(dtype)

    f0 = f(t0, flat0)
    init = _State(t0, flat0, f0, _initial_step(f, t0, flat0, f0, t1, rtol, atol),
                  jnp.array(False), jnp.array(0, jnp.int32), jnp.array(False))

    def cond(s: _State):
        return (s.t != t1) & ~s.stuck & (s.attempts < max_steps)

    def body(s: _State) -> _State:
        min_step = 10 * jnp.abs(jnp.nextafter(s.t, s.t + direction) - s.t)
        h_abs = jnp.where(s.rejected, s.h_abs, jnp.maximum(s.h_abs, min_step))
        stuck = ~(h_abs >= min_step)
        t_new = s.t + direction * h_abs
        t_new = jnp.where(direction * (t_new - t1) > 0, t1, t_new)
        h = t_new - s.t
        y_new, f_new, err = _dopri_step(f, s.t, s.y, s.f, h)
        err_norm = _rms(err / (atol + rtol * jnp.maximum(jnp.abs(s.y), jnp.abs(y_new))))
        accept = err_norm < 1
        factor = SAFETY * err_norm ** ERROR_EXPONENT
        grow = jnp.where(s.rejected, jnp.minimum(1.0, factor), jnp.minimum(MAX_FACTOR, factor))
        factor = jnp.where(accept, grow, jnp.maximum(MIN_FACTOR, factor))
        step = _State(jnp.where(accept, t_new, s.t), jnp.where(accept, y_new, s.y),
                      jnp.where(accept, f_new, s.f), jnp.abs(h) * factor, ~accept,
                      s.attempts + 1, stuck)
        return jax.tree.map(lambda new, old: jnp.where(stuck, old, new), step,
                            s._replace(stuck=stuck))

    s = lax.while_loop(cond, body, init)
    y1 = jnp.where(s.t == t1, s.y, jnp.nan)
    return unravel(y1), 2 + 6 * s.attempts
