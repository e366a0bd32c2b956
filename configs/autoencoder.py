"""Experiment 4 (docs/method.md): the one-layer untied autoencoder. Append ':smoke' for a short run.

python -m qcsbm_jax.experiments.autoencoder --config configs/autoencoder.py --workdir DIR
"""

import ml_collections


def get_config(variant=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_seeds = 10
    c.model = dict(dim=2, hidden=2, init_scale=1.0)  # W, R, b, c ~ U[-init_scale, init_scale]
    c.grid = dict(num=40, half_width=10.0)  # L_QC averaged over a num x num grid
    c.optim = dict(learning_rate=1e-4, grad_clip=1.0)  # Adam after global-norm clipping
    c.num_steps = 10_002  # the authors' n_iters = 10001: their loop makes n_iters + 1 updates
    c.log_every = 100  # thinning of the curves written to results.json
    if variant == "smoke":
        c.num_seeds = 2
        c.grid.num = 10
        c.num_steps = 300
        c.log_every = 50
    elif variant is not None:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'smoke' or none.")
    return c
