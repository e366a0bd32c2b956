"""Experiment 1 (docs/method.md): the Gaussian example. Append ':smoke' for a seconds-long run.

python -m qcsbm_jax.experiments.gaussian_example --config configs/gaussian_example.py \
    --workdir DIR [--config.floor=0.0 ...]
"""

import ml_collections


def get_config(variant=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_seeds = 10  # particle initialisations
    c.float64 = True
    c.sigma = 0.1  # target N(0, sigma^2 I)
    c.mixture = dict(num_modes=10, radius=3.0)  # mu: unit-variance modes on a circle
    c.floor = 1e-8  # delta under the denominator of c(x)^2; 0.0 = the exact formula
    c.eps_offset = 1e-6  # added to every eps > 0 inside c(x)^2, as the authors' code; 0.0: none
    c.epsilons = (0.0, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 1.75e-3, 2.25e-3)
    c.sampling = dict(num_steps=300, num_particles=10, init_mean=-2.0, init_std=0.5,
                      step_size=0.0125, step_size_exact=0.01, decay=1000.0)
    c.threshold = 1e-3  # on the particles' mean clipped / relative -log p
    c.quadrature = dict(radial_edges=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0,
                                      3.0, 4.0, 5.0, 6.5, 8.0),
                        nodes_per_panel=48, num_angles=512)
    c.plot = dict(epsilons=(1e-3, 2.25e-3), half_width=3.0, grid=20)
    if variant == "smoke":
        c.num_seeds = 2
        c.epsilons = (0.0, 1e-3)
        c.sampling.num_steps = 40
        c.quadrature.update(nodes_per_panel=8, num_angles=64)
        c.plot.epsilons = (1e-3,)
    elif variant is not None:
        raise ValueError(f"Unknown config variant {variant!r}; valid: 'smoke' or none.")
    return c
