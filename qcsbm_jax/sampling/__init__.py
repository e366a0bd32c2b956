"""Samplers of a score model: pure, jittable functions of (params, per-sample keys or
prior draws). pc: predictor-corrector; flow: the probability-flow ODE (adaptive RK45);
solvers: fixed-step ODE and SDE solvers (Euler, Heun, EDM, DPM-Solver++(2M),
Euler-Maruyama) with a set NFE."""

from qcsbm_jax.sampling.flow import (ode_sample, ode_sample_from_prior,
                                     probability_flow_drift)
from qcsbm_jax.sampling.pc import (CORRECTORS, PREDICTORS, pc_sample, pc_sample_per_key,
                                   tweedie_denoise)
from qcsbm_jax.sampling.solvers import (EDM_CIFAR10_CHURN, SETTINGS, SOLVERS,
                                        check_settings)
