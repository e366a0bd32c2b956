"""Every program a job runs, as jitted functions with abstract, sharded arguments.

The programs are the library's own (train.make_training_programs,
sampling.registry.sampler_program, evaluation.programs, fid.pipeline.inception_program),
built on a target's compile-only mesh, so what is compiled is what the job would run.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from qcsbm_jax import data, experiment, parallel, train
from qcsbm_jax.evaluation import programs as eval_programs
from qcsbm_jax.fid import pipeline as fid_pipeline
from qcsbm_jax.sampling import registry


@dataclasses.dataclass(frozen=True)
class Program:
    """One program of a job.

    fn(*args) is jitted; args are ShapeDtypeStructs with the job's shardings. batch: the
    examples of one call (global). calls: calls per job, when the config fixes it.
    Cost: (cost_fn, cost_args) is what one call repeats `repeats` times (XLA counts a
    loop body once): the train step itself once per micro-batch, one score evaluation
    per NFE for the samplers and the likelihood; None for the program itself once.
    """
    name: str
    kind: str
    fn: Callable
    args: tuple
    batch: int
    dtype: str
    calls: int | None = None
    cost_fn: Callable | None = None
    cost_args: tuple = ()
    repeats: float = 1.0
    nfe_assumed: bool = False


def _abstract(tree, sharding):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s),
                        tree, sharding)


def _batch(shape, dtype, mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.data_sharding(mesh))


def train_programs(config: ml_collections.ConfigDict, model: experiment.ScoreModel, mesh,
                   batch_size: int | None = None) -> list[Program]:
    """The train step of each qc_every phase at `batch_size` (default the config's)."""
    programs = train.make_training_programs(config, model, mesh)
    state = _abstract(jax.eval_shape(programs.init, model.init_params), programs.sharding)
    batch_size = batch_size or config.training.batch_size
    batch = _batch((batch_size, *model.data_shape), jnp.float32, mesh)
    steps, dtype = config.training.num_steps, config.training.compute_dtype
    accumulation = config.training.grad_accum_steps
    qc_every = config.loss.qc_every if config.loss.qc_weight > 0 else 1
    penalised = math.ceil(steps / qc_every)
    phases = [(0, "train step" if qc_every == 1 else "train step (QC phase)", penalised)]
    if qc_every > 1:
        phases.append((1, "train step (DSM phase)", steps - penalised))
    return [Program(name, "train", programs.step_for(phase), (state, batch), batch_size,
                    dtype, calls, repeats=accumulation)
            for phase, name, calls in phases]


def _params(model, mesh):
    return _abstract(model.init_params, parallel.state_sharding(mesh, model.init_params))


def _score_cost(model, mesh, batch: int, jvp: bool):
    """(fn, args) of one score evaluation of a batch (with its jvp for the likelihood)."""
    def local(params, x, t):
        if not jvp:
            return model.score_fn(params, x, t, None)
        return jax.jvp(lambda y: model.score_fn(params, y, t, None), (x,), (x,))

    fn = jax.jit(parallel.per_shard(local, mesh, num_replicated=1, num_batched=2))
    args = (_params(model, mesh), _batch((batch, *model.data_shape), jnp.float32, mesh),
            _batch((batch,), jnp.float32, mesh))
    return fn, args


def sampler_programs(config, model, mesh, ode_nfe: int) -> list[Program]:
    """The sampler of sampling.method and of each eval.fid_methods, at sampling.batch_size;
    `ode_nfe` is the NFE per sample assumed for the adaptive ODE solver."""
    batch = config.sampling.batch_size
    counts = {config.sampling.method: config.sampling.num_samples}
    if data.of(config).kind == data.IMAGE and config.eval.fid_samples:
        counts.update({m: max(counts.get(m, 0), config.eval.fid_samples)
                       for m in config.eval.fid_methods})
    keys = _batch((batch, 2), jnp.uint32, mesh)
    cost_fn, cost_args = _score_cost(model, mesh, batch, jvp=False)
    programs = []
    for method, count in counts.items():
        settings = registry.settings_from_config(config.sampling, method)
        nfe = registry.nfe_per_sample(method, settings)
        programs.append(Program(
            f"sampler {method}", "sample", registry.sampler_program(model, mesh, method,
                                                                      **settings),
            (_params(model, mesh), keys), batch, "float32", math.ceil(count / batch),
            cost_fn, cost_args, repeats=nfe or ode_nfe, nfe_assumed=nfe is None))
    return programs


def evaluation_programs(config, model, mesh, ode_nfe: int) -> list[Program]:
    """Likelihood and Jacobian asymmetry at eval.batch_size; the FID Inception features."""
    ev, batch = config.eval, config.eval.batch_size
    image = data.of(config).kind == data.IMAGE
    params, keys = _params(model, mesh), _batch((batch, 2), jnp.uint32, mesh)
    examples = _batch((batch, *model.data_shape), jnp.uint8 if image else jnp.float32, mesh)
    nll = eval_programs.nll_program(model, mesh, divergence=ev.divergence, rtol=ev.rtol,
                                    atol=ev.atol, eps=ev.eps, dequantize=image,
                                    centered=config.data.get("centered", False))
    # One jvp per NFE (Hutchinson), or one per data dimension (exact).
    jvps = 1 if ev.divergence == "hutchinson" else math.prod(model.data_shape)
    cost_fn, cost_args = _score_cost(model, mesh, batch, jvp=True)
    programs = [Program("likelihood", "likelihood", nll, (params, examples, keys), batch,
                        "float32", None, cost_fn, cost_args, repeats=ode_nfe * jvps,
                        nfe_assumed=True)]
    if not image:
        return programs
    clean = _batch((batch, *model.data_shape), jnp.float32, mesh)
    programs.append(Program(
        "asymmetry (per level)", "asymmetry", eval_programs.asymmetry_program(model, mesh),
        (params, clean, keys, _batch((batch,), jnp.float32, mesh)), batch, "float32",
        ev.num_levels))
    if ev.fid_samples:
        state, features = fid_pipeline.inception_program(mesh, logits=True)
        inception_batch = fid_pipeline.PER_DEVICE_BATCH * mesh.size
        state = _abstract(state, jax.tree.map(lambda _: parallel.replicated(mesh), state))
        pixels = _batch((inception_batch, *model.data_shape), jnp.uint8, mesh)
        programs.append(Program("Inception features", "inception", features,
                                (state, pixels), inception_batch, "float32",
                                math.ceil(ev.fid_samples / inception_batch)
                                * len(ev.fid_methods)))
    return programs


def job_programs(config, mesh, model: experiment.ScoreModel, ode_nfe: int,
                 include_evaluation: bool = True) -> list[Program]:
    """Every program of the job `config` describes (mode 'all'), in the order it runs;
    model: train.build_training_model's."""
    programs = train_programs(config, model, mesh)
    if include_evaluation:
        if config.training.compute_dtype != "float32":  # Evaluation runs in float32.
            model = experiment.build_score_model(config)
        programs += sampler_programs(config, model, mesh, ode_nfe)
        programs += evaluation_programs(config, model, mesh, ode_nfe)
    return programs
