"""Experiment configurations: the defaults every config file starts from, and validation.

Config files in configs/ are a few lines that call `toy_config` or `image_config` with the
paper's settings; `--config.a.b=value` overrides then apply to the locked result, so a
misspelt key fails at once with the list of valid keys.
"""

import ml_collections

from qcsbm_jax import asymmetry, data, likelihood, losses, models, restore, sampling, score
from qcsbm_jax import sde as sde_lib
from qcsbm_jax.data import images
from qcsbm_jax.data.images import IMAGE_DATASETS
from qcsbm_jax.data.toy import TOY_DATASETS
from qcsbm_jax.sampling import registry

TOY_FAMILIES = {
    # name: (model.family, loss.qc_weight, loss.estimator)
    "csbm": ("constrained", 0.0, "nonneg"),
    "usbm": ("unconstrained", 0.0, "nonneg"),
    "qcsbm": ("unconstrained", 0.1, "exact"),
}
IMAGE_FAMILIES = {
    # name: (model.family, loss.qc_weight); the penalty uses the 'nonneg' Hutchinson estimator.
    "csbm": ("constrained", 0.0),
    "usbm": ("unconstrained", 0.0),
    "qcsbm": ("unconstrained", 1e-4),
}
IMAGE_MODELS = {
    # model.name: (network preset and changes to it, SDE, data.centered); DDPM++ is the
    # VP/sub-VP network of Song et al. 2021. As in the authors' released models
    # (docs/checkpoints.md): NCSN++ with progressive_input 'residual' (the paper's text
    # says input skip, the preset's value), DDPM++ on data centred to [-1, 1].
    "ncsnpp": ("NCSNPP_DEEP", dict(progressive_input="residual"),
               dict(name="ve", sigma_min=0.01, sigma_max=50.0), False),
    "ddpmpp": ("DDPMPP_DEEP", {}, dict(name="vp", beta_min=0.1, beta_max=20.0), True),
}


# The authors' 2D code (docs/method.md, "Differences from the authors' code"): CSBM's
# energy ||x - act(f)||^2 / (2 sigma) with this act on the head, per data set.
TOY_CSBM_HEAD = {"gaussians8": "leaky_relu", "checkerboard": "elu", "spirals2": "elu"}

# Image QC fine-tune variants (docs/method.md, experiment 3): the authors' settings for the
# paper's tables, from a trained U-NCSN++ (training.init_from).
PAPER_FINE_TUNES = {
    "table2": dict(num_probes=16, batch_size=8),     # lambda 1e-4, K = 16, batch 8
    "tables3_4": dict(num_probes=1, batch_size=128),  # lambda 1e-4, K = 1, batch 128
}


def _loss_defaults(qc_weight: float, estimator: str) -> dict:
    """loss.*: exactly the keyword arguments of losses.make_loss_fn (documented there);
    train passes them through."""
    return dict(weighting="sigma2", dsm_scale=0.5, qc_weight=qc_weight, estimator=estimator,
                probe="rademacher", num_probes=1, qc_fraction=1.0, qc_every=1,
                jacobian_method="linearize", remat="none", qc_gradient="estimate", eps=1e-5)


def _solver_defaults(sde_name: str) -> dict:
    """sampling.* of the fixed-step solvers (sampling.solvers, documented there): the rho
    grid's rho and EDM's tuned churn for the SDE (edm_stochastic only)."""
    return dict(rho=7.0, **sampling.EDM_CIFAR10_CHURN["ve" if sde_name == "ve" else "vp"])


def toy_config(dataset: str, family: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """The paper's 2D setting (docs/method.md, experiment 2) for one data set and model family.

    variant: None for the paper's settings, 'smoke' for a seconds-long CPU run.
    The defaults train the authors' 2D program: PyTorch's initialisation (model.init),
    their head activation for CSBM (model.head_activation), the loss without the 1/2
    (loss.dsm_scale = 1) and t ~ U(0, 1) (loss.eps = 0); model.init='flax',
    head_activation='none' and dsm_scale=0.5 give the Flax-style program.
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
                   widths=(64, 128, 256), noise_widths=(1, 1, 1), init="pytorch",
                   head_activation=TOY_CSBM_HEAD[dataset] if family == "csbm" else "none")
    c.loss = dict(_loss_defaults(qc_weight, estimator), dsm_scale=1.0, eps=0.0)
    c.optim = dict(learning_rate=7.5e-4, warmup_steps=0, grad_clip=1.0, b1=0.9, b2=0.999,
                   adam_eps=1e-8, ema_decay=0.0, ema_warmup=False)
    c.training = dict(batch_size=5000, num_steps=4000 if dataset == "checkerboard" else 2000,
                      log_every=100, checkpoint_every=500, keep_checkpoints=3,
                      init_from="", grad_accum_steps=1, compute_dtype="float32")
    # corrector 'none': the Langevin corrector's step-size rule needs high dimension and
    # scatters 2D samples far outside the data (sampling.pc._langevin).
    c.sampling = dict(method="ode", num_samples=5000, rtol=1e-3, atol=1e-5, eps=1e-5,
                      predictor="reverse_diffusion", corrector="none", snr=0.16,
                      num_steps=1000, corrector_steps=1, denoise=True, batch_size=5000,
                      **_solver_defaults(c.sde.name))
    c.eval = dict(num_points=50_000, num_levels=10, batch_size=5000, rtol=1e-3, atol=1e-5,
                  eps=1e-5, divergence="exact", score_error_points=5000, num_samples=5000,
                  pr_k=3, seed=1, watch=False, watch_timeout=0, params="raw",
                  output_dir="eval")
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


def image_config(dataset: str, family: str, variant: str | None = None,
                 model: str = "ncsnpp") -> ml_collections.ConfigDict:
    """The paper's image setting (docs/method.md, experiment 3) for one data set and model family.

    QCSBM fine-tunes a trained USBM (training.init_from = runs/<dataset>_usbm_<model>, the
    workdir `launch/run.sh local` gives that config) for 100k steps with lambda = 1e-4.
    variant: None for the paper's settings; 'small' for a small network (nf 16, 3000 steps
    at batch 32, a CPU run: docs/usage.md; the QC fine-tune, 300 steps, starts from
    runs/<dataset>_usbm_<model>_small); 'smoke' for a tiny network and a few steps (the QC
    fine-tune starts from runs/<dataset>_usbm_<model>_smoke); for QCSBM, 'table2' and
    'tables3_4', the authors' fine-tunes behind the paper's tables (PAPER_FINE_TUNES).
    """
    if dataset not in IMAGE_DATASETS:
        raise ValueError(f"Unknown image data set {dataset!r}; valid: {IMAGE_DATASETS}.")
    if family not in IMAGE_FAMILIES:
        raise ValueError(f"Unknown family {family!r}; valid: {sorted(IMAGE_FAMILIES)}.")
    if model not in IMAGE_MODELS:
        raise ValueError(f"Unknown image model {model!r}; valid: {sorted(IMAGE_MODELS)}.")
    model_family, qc_weight = IMAGE_FAMILIES[family]
    preset, preset_changes, sde, centered = IMAGE_MODELS[model]
    fine_tune = family == "qcsbm"
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = dict(name=dataset, data_dir="", fashion_mnist_dir=images.FASHION_MNIST_DIR,
                  centered=centered, random_flip=True, seed=0)
    c.sde = dict(name="ve", sigma_min=0.01, sigma_max=50.0, beta_min=0.1, beta_max=20.0)
    c.sde.update(sde)
    c.model = {**getattr(models, preset), **preset_changes, "name": model,
               "family": model_family, "output": "scaled", "center_input": not centered}
    c.loss = _loss_defaults(qc_weight, "nonneg")
    # The EMA warm-up of the authors' code (train.ema_decay_schedule) for a run from
    # scratch; a fine-tune continues the source's EMA at the full decay, as theirs does
    # (it restores the EMA with its update count, far past the warm-up).
    c.optim = dict(learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0, b1=0.9, b2=0.999,
                   adam_eps=1e-8, ema_decay=0.999, ema_warmup=not fine_tune)
    c.training = dict(batch_size=128, num_steps=100_000 if fine_tune else 1_300_000,
                      log_every=100, checkpoint_every=10_000, keep_checkpoints=3,
                      init_from=f"runs/{dataset}_usbm_{model}" if fine_tune else "",
                      grad_accum_steps=1,  # k: the same update from k micro-batches
                      # 'bfloat16': the train step's matmuls and convolutions in bfloat16,
                      # float32 everything else (models.mixed_precision).
                      compute_dtype="float32")
    sampling_eps = 1e-5 if c.sde.name == "ve" else 1e-3
    c.sampling = dict(method="pc", num_samples=50_000, rtol=1e-5, atol=1e-5, eps=sampling_eps,
                      predictor="reverse_diffusion", corrector="langevin", snr=0.16,
                      num_steps=1000, corrector_steps=1, denoise=True, batch_size=500,
                      **_solver_defaults(c.sde.name))
    c.eval = dict(num_test=0, num_levels=100, batch_size=500, rtol=1e-5, atol=1e-5, eps=1e-5,
                  divergence="hutchinson", num_samples=64, seed=1, watch=False,
                  watch_timeout=0, params="ema", output_dir="eval",
                  # Sample quality (evaluation/sample_quality.py): the paper's 50k samples
                  # of each sampler against the training split's statistics.
                  fid_samples=50_000, fid_methods=("pc", "ode"), fid_stats="",
                  fid_reference_images=0)
    c.parallel = dict(data_axis=-1, model_axis=1)

    if variant == "small":
        c.model.update(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                       dropout=0.0)
        c.optim.update(learning_rate=1e-3, warmup_steps=200)
        c.training.update(batch_size=32, num_steps=300 if fine_tune else 3000,
                          checkpoint_every=500)
        if fine_tune:
            c.training.init_from += "_small"
        c.sampling.update(num_samples=36, batch_size=64, num_steps=500, rtol=1e-3, atol=1e-3)
        # Tolerances 1e-3 instead of 1e-5: far fewer NFE per image, a slightly higher bpd.
        c.eval.update(num_test=64, batch_size=64, rtol=1e-3, atol=1e-3, num_samples=36,
                      fid_samples=256)
    elif variant == "smoke":
        c.model.update(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                       dropout=0.1)
        c.optim.update(warmup_steps=0)
        c.training.update(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2)
        if fine_tune:
            c.training.init_from += "_smoke"
        c.sampling.update(num_samples=8, batch_size=8, num_steps=4, rtol=1e-2, atol=1e-2)
        c.eval.update(num_test=8, batch_size=8, num_levels=3, rtol=1e-2, atol=1e-2,
                      num_samples=8, fid_samples=0)
    elif variant in PAPER_FINE_TUNES:
        if not fine_tune:
            raise ValueError(f"Variant {variant!r} is the QC fine-tune of the paper's tables; "
                             f"use configs/{dataset}_qcsbm_{model}.py:{variant}.")
        settings = PAPER_FINE_TUNES[variant]
        c.loss.num_probes = settings["num_probes"]
        c.training.batch_size = settings["batch_size"]
    elif variant is not None:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'small', 'smoke', "
                         f"{', '.join(repr(v) for v in PAPER_FINE_TUNES)} or none.")
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
        ("loss.qc_gradient", config.loss.qc_gradient, asymmetry.GRADIENTS),
        ("eval.params", config.eval.params, tuple(restore.PARAMS)),
        ("training.compute_dtype", config.training.get("compute_dtype", "float32"),
         models.COMPUTE_DTYPES),
        ("sampling.method", config.sampling.method, tuple(registry.METHODS)),
        ("sampling.predictor", config.sampling.predictor, sampling.PREDICTORS),
        ("sampling.corrector", config.sampling.corrector, sampling.CORRECTORS),
        # Images: the exact divergence would need one jvp per pixel per ODE step.
        ("eval.divergence", config.eval.divergence,
         likelihood.DIVERGENCES if data.of(config).kind == data.TOY else ("hutchinson",)),
    ]
    if config.model.name == "toy_mlp":
        checks += [("model.init", config.model.init, models.toy.INITS),
                   ("model.head_activation", config.model.head_activation,
                    tuple(models.toy.HEAD_ACTIVATIONS))]
    for key, value, valid in checks:
        if value not in valid:
            raise ValueError(f"--config.{key}={value!r} is not valid; choose one of {valid}.")
    methods = {config.sampling.method, *config.eval.get("fid_methods", ())}
    for method in sorted(methods):
        registry.check_settings(method, sde_lib.get_sde(**config.sde),
                                registry.settings_from_config(config.sampling, method))
    if config.loss.qc_weight < 0:
        raise ValueError("--config.loss.qc_weight must be >= 0.")
    if config.loss.num_probes < 1:
        raise ValueError("--config.loss.num_probes must be >= 1.")
    if config.loss.qc_weight > 0 and config.model.family == "constrained":
        raise ValueError("A constrained (energy) model is conservative by construction; "
                         "set --config.loss.qc_weight=0 or use model.family=unconstrained.")
    _check_numbers(config)


# Integer settings (where a config has them) and their smallest valid value.
_MINIMUM_INTS = {
    "seed": 0, "data.seed": 0, "data.num_points": 1,
    "loss.num_probes": 1, "loss.qc_every": 1, "optim.warmup_steps": 0,
    "training.batch_size": 1, "training.num_steps": 1, "training.log_every": 1,
    "training.checkpoint_every": 1, "training.keep_checkpoints": 1,
    "sampling.num_samples": 1, "sampling.num_steps": 1, "sampling.corrector_steps": 0,
    "sampling.batch_size": 1,
    "eval.num_points": 1, "eval.num_test": 0, "eval.num_levels": 1, "eval.batch_size": 1,
    "eval.score_error_points": 1, "eval.num_samples": 0, "eval.pr_k": 1, "eval.seed": 0,
    "eval.fid_samples": 0, "eval.fid_reference_images": 0, "training.grad_accum_steps": 1,
    "eval.watch_timeout": 0, "parallel.model_axis": 1,
}
# Float settings that must be positive, and those in [0, 1).
_POSITIVE = ("optim.learning_rate", "optim.adam_eps", "sampling.rtol",
             "sampling.atol", "sampling.eps", "eval.rtol", "eval.atol", "eval.eps")
_FRACTIONS = ("optim.b1", "optim.b2", "optim.ema_decay")


def _lookup(config: ml_collections.ConfigDict, key: str):
    """config's value at 'a.b', or KeyError."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _check_numbers(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key for a count, size or rate out of its range."""
    for key, minimum in _MINIMUM_INTS.items():
        try:
            value = _lookup(config, key)
        except KeyError:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"--config.{key}={value!r} is not valid; it must be an "
                             f"integer >= {minimum}.")
    checks = [(key, lambda v: v > 0, "> 0") for key in _POSITIVE] + [
        (key, lambda v: 0 <= v < 1, "in [0, 1)") for key in _FRACTIONS]
    for key, valid, expected in checks:
        try:
            value = _lookup(config, key)
        except KeyError:
            continue
        if not valid(value):
            raise ValueError(f"--config.{key}={value!r} is not valid; it must be {expected}.")
    eps, sde = config.loss.get("eps", 1e-5), config.get("sde", {}).get("name")
    if not 0 <= eps < 1 or (eps == 0 and sde != "ve"):
        raise ValueError(f"--config.loss.eps={eps!r} is not valid; it must be in [0, 1), "
                         "and > 0 unless the SDE is VE (std(0) = sigma_min > 0; VP and "
                         "sub-VP have std(0) = 0).")
    qc_fraction = config.loss.get("qc_fraction", 1.0)
    if not 0 < qc_fraction <= 1:
        raise ValueError(f"--config.loss.qc_fraction={qc_fraction!r} is not valid; it must "
                         "be in (0, 1].")


def check_devices(config: ml_collections.ConfigDict, num_devices: int,
                  num_processes: int = 1) -> None:
    """Raises ValueError unless the mesh and the training batch fit the job's devices and
    processes (what parallel.make_mesh and parallel.check_batch_size check later)."""
    data_axis, model_axis = config.parallel.data_axis, config.parallel.model_axis
    if num_devices % model_axis or data_axis not in (-1, num_devices // model_axis):
        raise ValueError(
            f"--config.parallel.data_axis={data_axis} x --config.parallel.model_axis="
            f"{model_axis} does not match the {num_devices} devices; make their product "
            "the device count (data_axis=-1 takes what model_axis leaves).")
    batch = config.training.batch_size
    if batch % num_devices or batch % num_processes:
        raise ValueError(
            f"--config.training.batch_size={batch} must be divisible by the number of "
            f"devices ({num_devices}) and of processes ({num_processes}) of this job.")
