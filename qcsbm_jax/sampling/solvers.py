"""Fixed-step samplers: a set number of score evaluations (NFE) per sample.

  euler, heun      Euler / Heun (2nd order) on the probability-flow ODE (EDM, Karras et
                   al. 2022, Alg. 1) on the rho grid below.
  edm_stochastic   EDM's stochastic sampler (Alg. 2): Heun steps, each after "churn" that
                   adds noise to raise sigma to sigma (1 + gamma).
  dpm_solver_2m    DPM-Solver++(2M) (Lu et al. 2022), data-prediction (x0) form, multistep.
  euler_maruyama   Euler-Maruyama on the reverse SDE on the uniform t grid of the PC sampler.

Scaled ODE. With sigma = sde.noise_level(t) = std(t) / alpha(t) and the scaled state
x~ = x / alpha(t), the probability-flow ODE of every SDE here (drift (d log alpha / dt) x,
g^2 = d std^2/dt - 2 (d log alpha/dt) std^2) is EDM's ODE with sigma(t) = t, s(t) = 1:
  dx~/dsigma = (x~ - D(x~, sigma)) / sigma = -sigma alpha(t) score(alpha(t) x~, t),
where D = E[x0 | x_t] (Tweedie) and t = sde.noise_level_time(sigma). The ODE solvers step
in (x~, sigma); the network always sees (x, t) as in training.

rho grid (rho = 7 as in EDM), N = num_steps steps, i = 0..N:
  sigma_i = ((1 - i/N) sigma_max^(1/rho) + (i/N) sigma_min^(1/rho))^rho,
  sigma_max = noise_level(T), sigma_min = noise_level(eps).
It ends at eps > 0, not at sigma = 0 as EDM's does, so every Heun step has its second
stage (EDM's last step is Euler because D cannot be evaluated at sigma = 0). EDM's final
Euler step to sigma = 0, x~ + (0 - sigma) (x~ - D) / sigma = D, is exactly Tweedie
denoising: denoise=True takes it (one more score evaluation) and returns E[x0 | x_eps];
denoise=False returns x at t = eps. DPM-Solver++ uses the same grid (the log-SNR
-2 log sigma uniform grid is its rho -> infinity limit): all ODE solvers then share the
times at which they evaluate the score, so NFE-quality curves compare solvers, not grids;
rho = 7 is also the grid on which k-diffusion's DPM-Solver++(2M) is commonly run.

Common signature (SOLVERS maps each name to its function):
  fn(params, keys [B] typed keys, *, score_fn, sde, shape, num_steps, eps=1e-3,
     denoise=True, **settings) -> (x [B, *shape], nfe [B] int32)
score_fn(params, x [B, *shape], t [B], None) -> [B, *shape] (deterministic network).
Sample b is a function of keys[b] alone (its prior draw and its noise), so results do not
depend on the batch or its split over devices. num_steps may be a traced int32 scalar:
one compilation then serves every step count. Settings (SETTINGS) are static floats.
NFE per sample: euler N, heun 2N, edm_stochastic 2N, dpm_solver_2m N, euler_maruyama N;
plus 1 with denoise.
"""

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qcsbm_jax.sampling.pc import tweedie_denoise
from qcsbm_jax.sde import bcast

# Settings of each solver beyond the common num_steps and eps, with their defaults.
# Churn: EDM's code defaults (no churn: edm_stochastic is then heun).
EDM_CHURN = dict(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)
# EDM's tuned CIFAR-10 churn (Karras et al. 2022, Table 5) for VE and for VP-type SDEs
# (sub-VP: VP's); sigma is our noise_level, the same quantity as EDM's sigma.
EDM_CIFAR10_CHURN = {"ve": dict(s_churn=80.0, s_tmin=0.05, s_tmax=1.0, s_noise=1.007),
                     "vp": dict(s_churn=30.0, s_tmin=0.01, s_tmax=1.0, s_noise=1.007)}
SETTINGS: dict[str, dict[str, Any]] = {
    "euler": dict(rho=7.0, denoise=True),
    "heun": dict(rho=7.0, denoise=True),
    "edm_stochastic": dict(rho=7.0, **EDM_CHURN, denoise=True),
    "dpm_solver_2m": dict(rho=7.0, denoise=True),
    "euler_maruyama": dict(denoise=True),
}
MIN_STEPS = {"euler": 1, "heun": 1, "edm_stochastic": 1, "dpm_solver_2m": 2,
             "euler_maruyama": 1}
NEEDS_NOISE_LEVEL = ("euler", "heun", "edm_stochastic", "dpm_solver_2m")


def check_settings(method: str, sde, num_steps, **settings) -> None:
    """Raises one ValueError saying what to change if `method` cannot run with these
    settings on `sde`: an unknown method or setting, too few steps (num_steps is checked
    unless it is traced), an SDE without the noise-level map the ODE solvers need,
    or a setting out of range. settings: eps and the method's SETTINGS keys."""
    if method not in SETTINGS:
        raise ValueError(f"Unknown sampling method {method!r}; the fixed-step solvers are "
                         f"{sorted(SETTINGS)}.")
    unknown = sorted(set(settings) - set(SETTINGS[method]) - {"eps"})
    if unknown:
        raise ValueError(f"Sampling method {method!r} has no setting {unknown}; its "
                         f"settings are {['eps', 'num_steps', *SETTINGS[method]]}.")
    if isinstance(num_steps, numbers.Integral) and num_steps < MIN_STEPS[method]:
        kind = "a two-step (multistep) method" if MIN_STEPS[method] > 1 else "a sampler"
        raise ValueError(f"sampling.num_steps={num_steps} is too few for {method}, {kind}; "
                         f"use num_steps >= {MIN_STEPS[method]}.")
    if method in NEEDS_NOISE_LEVEL and not hasattr(sde, "noise_level_time"):
        raise ValueError(
            f"{method} steps in the noise level sigma(t) = std(t) / alpha(t) and needs its "
            f"inverse (noise_level_time), which {type(sde).__name__} lacks; use an SDE of "
            "qcsbm_jax.sde.SDES or sampling.method='euler_maruyama'.")
    eps = settings.get("eps", 1e-3)
    if not 0 < eps < sde.T:
        raise ValueError(f"sampling.eps={eps} must lie in (0, T = {sde.T}): the solvers "
                         "end at t = eps, where the noise level is positive.")
    value = {**SETTINGS[method], **settings}.get
    for name, ok, valid in (("rho", value("rho", 1.0) > 0, "> 0"),
                            ("s_churn", value("s_churn", 0.0) >= 0, ">= 0"),
                            ("s_noise", value("s_noise", 1.0) >= 0, ">= 0"),
                            ("s_tmin", 0 <= value("s_tmin", 0.0) <= value("s_tmax", 0.0),
                             f"in [0, s_tmax = {value('s_tmax', 0.0)}]")):
        if not ok:
            raise ValueError(f"sampling.{name}={value(name)} must be {valid}.")


# ---------------------------------------------------------------------------- helpers

def _split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample (prior keys [B], chain keys [B]), as the PC sampler splits them."""
    prior_keys, chain_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    return prior_keys, chain_keys


def _prior(sde, prior_keys: jax.Array, shape) -> jax.Array:
    return jax.vmap(lambda k: sde.prior_sample(k, shape))(prior_keys)


def _noise(chain_keys: jax.Array, step, shape) -> jax.Array:
    """Per-sample N(0, I) [B, *shape] of step `step` (the PC sampler's draw j = 0)."""
    return jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(k, step), 0), shape))(chain_keys)


# Score evaluations per step of each solver (the module doc's NFE table).
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2, "edm_stochastic": 2, "dpm_solver_2m": 1,
                        "euler_maruyama": 1}


def nfe_per_sample(method: str, num_steps, denoise: bool):
    """Score evaluations of one sample of solver `method` (num_steps may be traced)."""
    return EVALUATIONS_PER_STEP[method] * num_steps + int(denoise)


def _nfe(batch: int, evaluations) -> jax.Array:
    return jnp.full((batch,), evaluations, jnp.int32)


def rho_grid(sde, num_steps, eps: float, rho: float):
    """sigma_at(i) -> sigma_i (float32 scalar; i may be traced) of the rho grid from
    noise_level(T) at i = 0 to noise_level(eps) at i = num_steps (module docstring)."""
    hi, lo = (sde.noise_level(jnp.float32(t)) ** (1 / rho) for t in (sde.T, eps))

    def sigma_at(i):
        w = i / num_steps
        return ((1 - w) * hi + w * lo) ** rho

    return sigma_at


def _scaled_slope(params, score_fn, sde, eps: float, batch: int):
    """slope(x~ [B, *], sigma scalar) -> dx~/dsigma [B, *] of the scaled ODE; the network
    sees x = alpha(t) x~ at t = noise_level_time(sigma), clipped to [eps, T] (round-off)."""

    def slope(x, sigma):
        t = jnp.full((batch,), jnp.clip(sde.noise_level_time(sigma), eps, sde.T), jnp.float32)
        alpha = bcast(sde.alpha(t), x)
        return -sigma * alpha * score_fn(params, alpha * x, t, None)

    return slope


def _finish(sde, slope, x, sigma_end, eps: float, denoise: bool) -> jax.Array:
    """x [B, *] at t = eps from x~ at sigma_end, or with denoise E[x0 | x_eps] = D."""
    if denoise:
        return x - sigma_end * slope(x, sigma_end)
    return sde.alpha(jnp.float32(eps)) * x


# ---------------------------------------------------------------------------- solvers

def _edm(params, keys, *, score_fn, sde, shape, num_steps, eps, rho, denoise, second_order,
         churn):
    """EDM Alg. 2 on the rho grid (Alg. 1 when churn is None; Euler if not second_order)."""
    batch = keys.shape[0]
    prior_keys, chain_keys = _split_keys(keys)
    sigma_at = rho_grid(sde, num_steps, eps, rho)
    slope = _scaled_slope(params, score_fn, sde, eps, batch)
    sigma_max = sigma_at(0)

    def step(i, x):
        sigma, sigma_next = sigma_at(i), sigma_at(i + 1)
        if churn is not None:
            s_churn, s_tmin, s_tmax, s_noise = churn
            gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax),
                              jnp.minimum(s_churn / num_steps, math.sqrt(2) - 1), 0.0)
            # sigma^ <= noise_level(T), and gamma >= 0 against round-off in the ratio.
            gamma = jnp.maximum(jnp.minimum(gamma, sigma_max / sigma - 1), 0.0)
            sigma_hat = sigma * (1 + gamma)
            x = x + (sigma * jnp.sqrt(gamma * (2 + gamma)) * s_noise
                     * _noise(chain_keys, i, shape))
            sigma = sigma_hat
        d = slope(x, sigma)
        x_next = x + (sigma_next - sigma) * d
        if second_order:
            x_next = x + (sigma_next - sigma) * 0.5 * (d + slope(x_next, sigma_next))
        return x_next

    x = _prior(sde, prior_keys, shape) / sde.alpha(jnp.float32(sde.T))
    x = lax.fori_loop(0, num_steps, step, x)
    x = _finish(sde, slope, x, sigma_at(num_steps), eps, denoise)
    return x, _nfe(batch, (2 if second_order else 1) * num_steps + int(denoise))


def euler(params, keys, *, score_fn, sde, shape, num_steps, eps=1e-3, rho=7.0, denoise=True):
    """Euler on the scaled probability-flow ODE, rho grid; NFE num_steps + denoise."""
    check_settings("euler", sde, num_steps, eps=eps, rho=rho)
    return _edm(params, keys, score_fn=score_fn, sde=sde, shape=shape, num_steps=num_steps,
                eps=eps, rho=rho, denoise=denoise, second_order=False, churn=None)


def heun(params, keys, *, score_fn, sde, shape, num_steps, eps=1e-3, rho=7.0, denoise=True):
    """Heun (EDM Alg. 1) on the scaled probability-flow ODE, rho grid; every step is
    second order (the grid ends at sigma > 0); NFE 2 num_steps + denoise."""
    check_settings("heun", sde, num_steps, eps=eps, rho=rho)
    return _edm(params, keys, score_fn=score_fn, sde=sde, shape=shape, num_steps=num_steps,
                eps=eps, rho=rho, denoise=denoise, second_order=True, churn=None)


def edm_stochastic(params, keys, *, score_fn, sde, shape, num_steps, eps=1e-3, rho=7.0,
                   s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, denoise=True):
    """EDM's stochastic sampler (Alg. 2); NFE 2 num_steps + denoise.

    Before step i, where s_tmin <= sigma_i <= s_tmax, gamma = min(s_churn / num_steps,
    sqrt(2) - 1), sigma^ = sigma_i (1 + gamma) and x~ gains N(0, (sigma^2 - sigma_i^2)
    s_noise^2 I); a Heun step then goes from sigma^ to sigma_{i+1}. sigma^ is capped at
    noise_level(T), the largest noise level the model was trained on. Defaults are
    EDM's code defaults (s_churn 0: no churn, i.e. heun); EDM_CIFAR10_CHURN holds its
    tuned settings (VE: s_churn 80, s_tmin 0.05, s_tmax 1, s_noise 1.007; VP: 30, 0.01,
    1, 1.007), which the configs use. s_noise > 1 adds slightly more noise than the
    ODE removes, against networks that over-denoise; it biases an exact score.
    """
    check_settings("edm_stochastic", sde, num_steps, eps=eps, rho=rho, s_churn=s_churn,
                   s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    return _edm(params, keys, score_fn=score_fn, sde=sde, shape=shape, num_steps=num_steps,
                eps=eps, rho=rho, denoise=denoise, second_order=True,
                churn=(s_churn, s_tmin, s_tmax, s_noise))


def dpm_solver_2m(params, keys, *, score_fn, sde, shape, num_steps, eps=1e-3, rho=7.0,
                  denoise=True):
    """DPM-Solver++(2M), data prediction, on the rho grid; NFE num_steps + denoise.

    With D_i = D(x~_i, sigma_i), h_i = log(sigma_i / sigma_{i+1}) (the step in
    lambda = -log sigma, half the log-SNR) and r = h_{i-1} / h_i:
      D' = D_i + (D_i - D_{i-1}) / (2 r)   (D' = D_i at i = 0: the first step is DDIM),
      x~_{i+1} = D' + (sigma_{i+1} / sigma_i) (x~_i - D'),
    i.e. x_{i+1} = (std_{i+1} / std_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D' in x.
    """
    check_settings("dpm_solver_2m", sde, num_steps, eps=eps, rho=rho)
    batch = keys.shape[0]
    prior_keys, _ = _split_keys(keys)
    sigma_at = rho_grid(sde, num_steps, eps, rho)
    slope = _scaled_slope(params, score_fn, sde, eps, batch)

    def step(i, carry):
        x, denoised_prev, h_prev = carry
        sigma, sigma_next = sigma_at(i), sigma_at(i + 1)
        denoised = x - sigma * slope(x, sigma)
        h = jnp.log(sigma / sigma_next)
        corrected = jnp.where(i == 0, denoised,
                              denoised + (denoised - denoised_prev) * (h / (2 * h_prev)))
        return corrected + (sigma_next / sigma) * (x - corrected), denoised, h

    x = _prior(sde, prior_keys, shape) / sde.alpha(jnp.float32(sde.T))
    x, _, _ = lax.fori_loop(0, num_steps, step, (x, jnp.zeros_like(x), jnp.float32(1.0)))
    x = _finish(sde, slope, x, sigma_at(num_steps), eps, denoise)
    return x, _nfe(batch, nfe_per_sample("dpm_solver_2m", num_steps, denoise))


def euler_maruyama(params, keys, *, score_fn, sde, shape, num_steps, eps=1e-3, denoise=True):
    """Euler-Maruyama on the reverse SDE from T to eps, t_i = T - i (T - eps) / num_steps:
      x <- x - (f - g^2 score) dt + g sqrt(dt) z,  dt = (T - eps) / num_steps,
    noise drawn as the PC sampler draws it, so this is pc_sample_per_key with
    predictor='euler_maruyama', corrector='none'. denoise: Tweedie at eps.
    NFE num_steps + denoise."""
    check_settings("euler_maruyama", sde, num_steps, eps=eps)
    batch = keys.shape[0]
    prior_keys, chain_keys = _split_keys(keys)
    dt = jnp.full((batch,), (sde.T - eps) / num_steps, jnp.float32)

    def step(i, x):
        t = jnp.full((batch,), sde.T - i * (sde.T - eps) / num_steps, jnp.float32)
        drift = sde.reverse_drift(score_fn(params, x, t, None), x, t)
        g = sde.sde(x, t)[1] * jnp.sqrt(dt)
        return x - drift * bcast(dt, x) + bcast(g, x) * _noise(chain_keys, i, shape)

    x = lax.fori_loop(0, num_steps, step, _prior(sde, prior_keys, shape))
    if denoise:
        t = jnp.full((batch,), eps, jnp.float32)
        x = tweedie_denoise(sde, score_fn(params, x, t, None), x, t)
    return x, _nfe(batch, nfe_per_sample("euler_maruyama", num_steps, denoise))


SOLVERS = {"euler": euler, "heun": heun, "edm_stochastic": edm_stochastic,
           "dpm_solver_2m": dpm_solver_2m, "euler_maruyama": euler_maruyama}
