"""Forward SDEs dx = f(x, t) dt + g(t) dw on t in [0, T], T = 1 (Song et al. 2021).

Every SDE here is linear with a Gaussian perturbation kernel
p_t(x_t | x_0) = N(alpha(t) x_0, std(t)^2 I), so all marginal quantities are closed form.

Shapes: x [B, *data_shape], t [B] (float, in [eps, T]); per-sample scalars are [B].
The SDEs are frozen dataclasses: hashable, so they can be static arguments of jax.jit.

Reverse time (Anderson 1982): with the score s = grad_x log p_t,
  reverse SDE           dx = [f - g^2 s] dt + g dw_bar   (dt < 0)
  probability-flow ODE  dx/dt = f - g^2 s / 2
"""

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp


def bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-sample [B] array to broadcast against x [B, *data_shape]."""
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


class SDE:
    """Base of the linear SDEs: kernel N(alpha(t) x0, std(t)^2 I), prior N(0, prior_std^2 I).

    Subclasses define alpha(t), std(t) (both [B]), sde, noise_condition and prior_std.
    """

    T: ClassVar[float] = 1.0

    # What every subclass defines (calling one a subclass lacks is an error).
    @property
    def prior_std(self) -> float:
        """The prior's standard deviation."""
        raise NotImplementedError

    def alpha(self, t: jax.Array) -> jax.Array:
        """The kernel's mean scale alpha(t) [B] for t [B]."""
        raise NotImplementedError

    def std(self, t: jax.Array) -> jax.Array:
        """The kernel's standard deviation std(t) [B] for t [B]."""
        raise NotImplementedError

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(drift f(x, t) [B, *], diffusion g(t) [B]) of the forward SDE."""
        raise NotImplementedError

    def noise_condition(self, t: jax.Array) -> jax.Array:
        """What the score network is conditioned on at t [B]."""
        raise NotImplementedError

    def marginal_mean_std(self, x0: jax.Array, t: jax.Array):
        """Mean [B, *] and std [B] of p_t(x_t | x0) for x0 [B, *], t [B]."""
        return bcast(self.alpha(t), x0) * x0, self.std(t)

    def prior_sample(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        """A draw of the given shape from the prior N(0, prior_std^2 I)."""
        return self.prior_std * jax.random.normal(key, shape, dtype)

    def prior_logp(self, z: jax.Array) -> jax.Array:
        """log N(z; 0, prior_std^2 I) in nats per sample, z [B, *] -> [B]."""
        dims = math.prod(z.shape[1:])
        sq = jnp.sum(jnp.square(z), axis=tuple(range(1, z.ndim)))
        return (-0.5 * sq / self.prior_std**2
                - 0.5 * dims * math.log(2 * math.pi * self.prior_std**2))

    def noise_level(self, t: jax.Array) -> jax.Array:
        """sigma(t) = std(t) / alpha(t) [B]: the noise std of the scaled state x / alpha(t),
        whose kernel is N(x0, sigma^2 I) (EDM's sigma; the log-SNR is -2 log sigma).
        Increasing in t; subclasses invert it with noise_level_time."""
        return self.std(t) / self.alpha(t)

    def reverse_drift(self, score: jax.Array, x: jax.Array, t: jax.Array,
                      probability_flow: bool = False) -> jax.Array:
        """Drift [B, *] of the reverse SDE, f - g^2 s, or of the probability-flow ODE,
        f - g^2 s / 2, given the score value s [B, *] at (x, t).

        Both are written as dx/dt in forward time; the reverse SDE's diffusion is
        sde(x, t)[1] and the ODE has none.
        """
        drift, g = self.sde(x, t)
        weight = 0.5 if probability_flow else 1.0
        return drift - weight * bcast(jnp.square(g), x) * score

    def discretize(self, x: jax.Array, t: jax.Array, dt: jax.Array):
        """(f [B, *], G [B]) with x_t ~ x_{t-dt} + f + G z, z ~ N(0, I).

        The reverse-diffusion predictor inverts it: x_{t-dt} = x_t - f + G^2 s + G z.
        This default is Euler-Maruyama, f = f(x, t) dt and G = g(t) sqrt(dt); VE and VP
        override it with their exact transitions. t, dt: [B].
        """
        drift, g = self.sde(x, t)
        return drift * bcast(dt, x), g * jnp.sqrt(dt)


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Variance exploding: sigma(t) = sigma_min (sigma_max / sigma_min)^t, f = 0,
    g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min)), so d sigma^2/dt = g^2.

    Kernel N(x0, sigma(t)^2 I) (the score_sde convention, noise_condition = sigma(t)). The
    SDE itself only adds sigma(t)^2 - sigma_min^2 of variance between 0 and t, so this
    kernel is exact when x0 is clean data and the SDE starts from data already smoothed
    by N(0, sigma_min^2 I). Prior N(0, sigma_max^2 I).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def sigma(self, t: jax.Array) -> jax.Array:
        """sigma(t) [B]."""
        return self.sigma_min * jnp.exp(t * math.log(self.sigma_max / self.sigma_min))

    def alpha(self, t: jax.Array) -> jax.Array:
        return jnp.ones_like(t)

    def std(self, t: jax.Array) -> jax.Array:
        return self.sigma(t)

    def noise_condition(self, t: jax.Array) -> jax.Array:
        """The network is conditioned on sigma(t) [B]."""
        return self.sigma(t)

    def noise_level_time(self, sigma: jax.Array) -> jax.Array:
        """The t [B] with noise_level(t) = sigma(t) = sigma [B]."""
        return jnp.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def sde(self, x: jax.Array, t: jax.Array):
        g = self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return jnp.zeros_like(x), g

    def discretize(self, x: jax.Array, t: jax.Array, dt: jax.Array):
        """Ancestral (SMLD) step: f = 0, G^2 = sigma(t)^2 - sigma(t - dt)^2, exact."""
        g2 = jnp.square(self.sigma(t)) - jnp.square(self.sigma(t - dt))
        return jnp.zeros_like(x), jnp.sqrt(g2)


@dataclasses.dataclass(frozen=True)
class VPSDE(SDE):
    """Variance preserving: beta(t) = beta_min + t (beta_max - beta_min),
    f = -beta(t) x / 2, g = sqrt(beta(t)).

    alpha(t) = exp(-int_0^t beta / 2), std(t)^2 = 1 - alpha(t)^2; prior N(0, I);
    noise_condition = t.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    @property
    def prior_std(self) -> float:
        return 1.0

    def beta(self, t: jax.Array) -> jax.Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: jax.Array) -> jax.Array:
        """log alpha(t) = -int_0^t beta(s) ds / 2, [B]."""
        return -0.25 * jnp.square(t) * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: jax.Array) -> jax.Array:
        return jnp.exp(self.log_alpha(t))

    def std(self, t: jax.Array) -> jax.Array:
        return jnp.sqrt(-jnp.expm1(2 * self.log_alpha(t)))

    def noise_condition(self, t: jax.Array) -> jax.Array:
        return t

    def time_of_log_alpha(self, log_alpha: jax.Array) -> jax.Array:
        """The t [B] >= 0 with log_alpha(t) = log_alpha [B] <= 0: the positive root of
        (beta_max - beta_min) t^2 / 4 + beta_min t / 2 = -log_alpha, written without
        cancellation."""
        a = -4 * log_alpha
        return a / (self.beta_min + jnp.sqrt(self.beta_min**2
                                             + (self.beta_max - self.beta_min) * a))

    def noise_level_time(self, sigma: jax.Array) -> jax.Array:
        """The t [B] with noise_level(t) = sqrt(1 / alpha^2 - 1) = sigma [B]."""
        return self.time_of_log_alpha(-0.5 * jnp.log1p(jnp.square(sigma)))

    def sde(self, x: jax.Array, t: jax.Array):
        beta = self.beta(t)
        return -0.5 * bcast(beta, x) * x, jnp.sqrt(beta)

    def discretize(self, x: jax.Array, t: jax.Array, dt: jax.Array):
        """DDPM step x_t = sqrt(1 - b) x_{t-dt} + sqrt(b) z with
        1 - b = (alpha(t) / alpha(t - dt))^2, exact; f = (sqrt(1 - b) - 1) x, G = sqrt(b)."""
        log_ratio = self.log_alpha(t) - self.log_alpha(t - dt)
        return bcast(jnp.expm1(log_ratio), x) * x, jnp.sqrt(-jnp.expm1(2 * log_ratio))


@dataclasses.dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """Sub-VP: the VP drift with g(t)^2 = beta(t) (1 - alpha(t)^4).

    Kernel N(alpha(t) x0, (1 - alpha(t)^2)^2 I); prior N(0, I); noise_condition = t.
    Its discretize is the Euler-Maruyama default.
    """

    def std(self, t: jax.Array) -> jax.Array:
        return -jnp.expm1(2 * self.log_alpha(t))

    def noise_level_time(self, sigma: jax.Array) -> jax.Array:
        """The t [B] with noise_level(t) = 1 / alpha - alpha = sigma [B], i.e.
        alpha = 2 / (sigma + sqrt(sigma^2 + 4)), -log alpha = asinh(sigma / 2)."""
        return self.time_of_log_alpha(-jnp.arcsinh(0.5 * sigma))

    def sde(self, x: jax.Array, t: jax.Array):
        beta = self.beta(t)
        return -0.5 * bcast(beta, x) * x, jnp.sqrt(beta * -jnp.expm1(4 * self.log_alpha(t)))

    discretize = SDE.discretize


SDES: dict[str, type[VESDE] | type[VPSDE]] = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def get_sde(name: str, *, sigma_min: float | None = None, sigma_max: float | None = None,
            beta_min: float | None = None, beta_max: float | None = None) -> SDE:
    """The SDE `name` ('ve' | 'vp' | 'subvp'): VE with noise scales sigma_min..sigma_max,
    VP / sub-VP with noise rates beta_min..beta_max; the other pair is ignored. A config's
    `sde` section holds these keys: get_sde(**config.sde)."""
    if name not in SDES:
        raise ValueError(f"Unknown SDE {name!r}; valid names: {sorted(SDES)}.")
    needed = ("sigma_min", "sigma_max") if name == "ve" else ("beta_min", "beta_max")
    given = dict(sigma_min=sigma_min, sigma_max=sigma_max, beta_min=beta_min,
                 beta_max=beta_max)
    missing = [k for k in needed if given[k] is None]
    if missing:
        raise ValueError(f"The {name!r} SDE needs {missing}.")
    return SDES[name](**{k: float(v) for k, v in given.items() if k in needed and v is not None})
