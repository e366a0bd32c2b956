"""Sample-quality scores from Inception statistics and features.

  fid                 Frechet distance of two Gaussians (Heusel et al., 2017)
  inception_score     exp E_x KL(p(y|x) || p(y)) over splits (Salimans et al., 2016)
  kid                 unbiased MMD^2 with the cubic polynomial kernel over random subsets
                      (Binkowski et al., 2018)
  precision, recall   k-NN manifolds (Kynkaanniemi et al., 2019): qcsbm_jax.metrics
  density, coverage   the same balls counted (Naeem et al., 2020): qcsbm_jax.metrics

FID needs float64: tr sqrt(S1 S2) sums square roots of eigenvalues that float32 resolves
only to about 1e-7 of the largest, and on 2048-dimensional covariances that shifts FID
visibly (docs/fid.md). So the matrix square root (a symmetric
eigendecomposition S1 = V L V^T, then the eigenvalues of the symmetric sqrt(L) V^T S2 V
sqrt(L)) runs in float64 through XLA on the default device (CPU or GPU), and in NumPy on
the host under a TPU, which has no float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _trace_sqrt_product(xp, sigma1, sigma2):
    """tr sqrt(sigma1 sigma2) for symmetric PSD sigmas, with xp = numpy or jax.numpy.

    With sigma1 = V L V^T and R = V sqrt(L), sigma1 sigma2 = R (R^T sigma2) shares its
    eigenvalues with R^T sigma2 R, which is symmetric PSD: they are real and >= 0 (small
    negative rounding is clipped), and tr sqrt(sigma1 sigma2) is the sum of their roots.
    """
    w, v = xp.linalg.eigh(sigma1)
    root = v * xp.sqrt(xp.maximum(w, 0))
    middle = root.T @ sigma2 @ root
    return xp.sum(xp.sqrt(xp.maximum(xp.linalg.eigvalsh((middle + middle.T) / 2), 0)))


@jax.jit
def _trace_sqrt_product_jax(sigma1, sigma2):
    with jax.default_matmul_precision("highest"):
        return _trace_sqrt_product(jnp, sigma1, sigma2)


def fid(mu1, sigma1, mu2, sigma2, *, on_device: bool | None = None) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

    mu [D], sigma [D, D] symmetric PSD. on_device: run the square root through XLA in
    float64 on the default device (None: unless it is a TPU), else NumPy on the host.
    """
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or not sigma1.shape == sigma2.shape == mu1.shape * 2:
        raise ValueError(f"FID compares statistics of equal dimension; got mu {mu1.shape} "
                         f"and {mu2.shape}, sigma {sigma1.shape} and {sigma2.shape}.")
    if on_device is None:
        on_device = jax.default_backend() != "tpu"
    if on_device:
        with jax.enable_x64(True):
            trace_sqrt = float(_trace_sqrt_product_jax(jnp.asarray(sigma1), jnp.asarray(sigma2)))
    else:
        trace_sqrt = float(_trace_sqrt_product(np, sigma1, sigma2))
    distance = np.sum(np.square(mu1 - mu2)) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(distance)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over `splits` contiguous parts of logits [N, K] of
    exp(mean_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits), p(y) = the part's mean."""
    logits = np.asarray(logits, np.float64)
    if len(logits) < splits:
        raise ValueError(f"The Inception Score over {splits} splits needs at least {splits} "
                         f"images; got {len(logits)}.")
    log_p = logits - _logsumexp(logits, axis=1)
    scores = []
    for part in np.array_split(log_p, splits):
        log_marginal = _logsumexp(part, axis=0) - np.log(len(part))
        scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_marginal), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


def kid_subsets(n_real: int, n_fake: int, subsets: int, subset_size: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Row indices [subsets, m] into each set, m = min(subset_size, n_real, n_fake): each
    subset drawn without replacement by np.random.default_rng(seed)."""
    m = min(subset_size, n_real, n_fake)
    rng = np.random.default_rng(seed)
    real = np.stack([rng.choice(n_real, m, replace=False) for _ in range(subsets)])
    fake = np.stack([rng.choice(n_fake, m, replace=False) for _ in range(subsets)])
    return real, fake


@functools.partial(jax.jit, static_argnames="dim")
def _mmd2_polynomial(x: jax.Array, y: jax.Array, dim: int) -> jax.Array:
    """Unbiased MMD^2 of x, y [m, D] with k(a, b) = (a.b / dim + 1)^3.

    Sums k - 1 = s (3 + s (3 + s)), s = a.b / dim, instead of k: the 1s cancel between the
    three means, and leaving them out keeps float32 rounding relative to s, not to k.
    """
    def kernel(a, b):
        s = jnp.matmul(a, b.T, precision=_HIGHEST) / dim
        return s * (3 + s * (3 + s))

    m = x.shape[0]
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    off_diagonal = (jnp.sum(kxx) - jnp.trace(kxx) + jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    return off_diagonal - 2 * jnp.mean(kxy)


def kid(real: np.ndarray, fake: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD^2 over
    `subsets` random subsets (kid_subsets) of features real [N, D] and fake [M, D]."""
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"KID needs at least 2 features per set; got {len(real)} and "
                         f"{len(fake)}.")
    real_rows, fake_rows = kid_subsets(len(real), len(fake), subsets, subset_size, seed)
    real, fake = jnp.asarray(real, jnp.float32), jnp.asarray(fake, jnp.float32)
    values = np.array([float(_mmd2_polynomial(real[r], fake[f], real.shape[1]))
                       for r, f in zip(real_rows, fake_rows)])
    return float(values.mean()), float(values.std())
