"""Experiment configurations: the defaults every config file starts from, and validation.

Config files in configs/ are a few lines that call `toy_config` (or later builders) with
the paper's settings; `--config.a.b=value` overrides then apply to the locked result, so a
misspelt key fails at once with the list of valid keys.
"""

import ml_collections

from qcsbm_jax import asymmetry, losses, score
from qcsbm_jax.data.toy import TOY_DATASETS

TOY_FAMILIES = {
    # name: (model.family, loss.qc_weight, loss.estimator)
    "csbm": ("constrained", 0.0, "nonneg"),
    "usbm": ("unconstrained", 0.0, "nonneg"),
    "qcsbm": ("unconstrained", 0.1, "exact"),
}


def toy_config(dataset: str, family: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """The paper's 2D setting (PAPER.md, experiment 2) for one data set and model family.

    variant: None for the paper's settings, 'smoke' for a seconds-long CPU run.
    """
    if dataset not in TOY_DATASETS:
        raise ValueError(f"Unknown toy data set {dataset!r}; valid: {TOY_DATASETS}.")
    if family not in TOY_FAMILIES:
        raise ValueError(f"Unknown family {family!r}; valid: {sorted(TOY_FAMILIES)}.")
    model_family, qc_weight, estimator = TOY_FAMILIES[family]
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = dict(name=dataset, num_points=50_000, seed=0)
    c.sde = dict(name="ve", sigma_min=0.1, sigma_max=3.0, beta_min=0.1, beta_max=20.0)
    c.model = dict(name="toy_mlp", family=model_family, output="residual",
                   widths=(64, 128, 256), noise_widths=(1, 1, 1))
    c.loss = dict(weighting="sigma2", qc_weight=qc_weight, estimator=estimator,
                  probe="rademacher", num_probes=1, eps=1e-5)
    c.optim = dict(learning_rate=7.5e-4, warmup_steps=0, grad_clip=1.0, b1=0.9, b2=0.999,
                   adam_eps=1e-8, ema_decay=0.0)
    c.training = dict(batch_size=5000, num_steps=4000 if dataset == "checkerboard" else 2000,
                      log_every=100, checkpoint_every=500, keep_checkpoints=3)
    c.sampling = dict(method="ode", num_samples=5000, rtol=1e-3, atol=1e-5, eps=1e-5,
                      predictor="reverse_diffusion", corrector="langevin", snr=0.16,
                      num_steps=1000, corrector_steps=1, denoise=True, batch_size=5000)
    c.eval = dict(num_points=50_000, num_levels=10, batch_size=5000, rtol=1e-3, atol=1e-5,
                  eps=1e-5, divergence="exact", score_error_points=5000, num_samples=5000,
                  pr_k=3, seed=1)
    c.parallel = dict(data_axis=-1, model_axis=1)

    if variant == "smoke":
        c.data.num_points = 2000
        c.training.update(batch_size=256, num_steps=60, log_every=20, checkpoint_every=30)
        c.sampling.update(num_samples=256, num_steps=50, batch_size=256)
        c.eval.update(num_points=512, batch_size=256, score_error_points=256,
                      num_samples=256, rtol=1e-2, atol=1e-3)
    elif variant is not None:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'smoke' or none.")
    c.lock()
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key and the valid choices for any bad setting."""
    checks = [
        ("model.family", config.model.family, score.FAMILIES),
        ("model.output", config.model.output, score.OUTPUTS),
        ("loss.weighting", config.loss.weighting, losses.WEIGHTINGS),
        ("loss.estimator", config.loss.estimator, asymmetry.ESTIMATORS),
        ("loss.probe", config.loss.probe, asymmetry.PROBES),
        ("sampling.method", config.sampling.method, ("ode", "pc")),
        ("eval.divergence", config.eval.divergence, ("exact", "hutchinson")),
    ]
    for key, value, valid in checks:
        if value not in valid:
            raise ValueError(f"--config.{key}={value!r} is not valid; choose one of {valid}.")
    if config.loss.qc_weight < 0:
        raise ValueError("--config.loss.qc_weight must be >= 0.")
    if config.loss.num_probes < 1:
        raise ValueError("--config.loss.num_probes must be >= 1.")
    if config.loss.qc_weight > 0 and config.model.family == "constrained":
        raise ValueError("A constrained (energy) model is conservative by construction; "
                         "set --config.loss.qc_weight=0 or use model.family=unconstrained.")
