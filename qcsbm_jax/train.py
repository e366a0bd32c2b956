"""Training: the state pytree, the jitted step and the checkpointed loop."""

import functools
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from qcsbm_jax import (checkpoint, data, distributed, experiment, losses, parallel, streams,
                       workdir_lock)


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly.

    step: int32 scalar, updates applied so far. key: the 'train' stream key of config.seed
    (qcsbm_jax.streams); the randomness of step n is fold_in(key, n), so a resumed run
    draws the same numbers as an uninterrupted one.
    """
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    key: jax.Array


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with linear warm-up and global-norm clipping (grad_clip <= 0 turns it off)."""
    schedule = optim.learning_rate
    if optim.warmup_steps > 0:
        schedule = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
    adam = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.adam_eps)
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam)
    return adam


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=optimizer.init(params),
                      key=streams.stream_key(seed, "train"))


def ema_decay_schedule(optim: ml_collections.ConfigDict) -> float | Callable:
    """optim.ema_decay, or with optim.ema_warmup the official warm-up: the EMA update that
    makes step n (1, 2, ...) uses min(ema_decay, (1 + n) / (10 + n)), a function of the
    state's step (n - 1, the updates before it)."""
    if not optim.ema_warmup:
        return optim.ema_decay
    return lambda step: jnp.minimum(optim.ema_decay, (2.0 + step) / (11.0 + step))


def loss_gradients(loss: losses.Loss, params: Any, batch: jax.Array, key: jax.Array, *,
                   step: int | None = None, grad_accum_steps: int = 1):
    """(metrics, gradients) of loss on batch [B, *S], its randomness drawn from key for
    the whole batch (loss.draw); step goes to loss.evaluate (the qc_every branch).

    grad_accum_steps = k > 1: k micro-batches, micro-batch i the rows i, i + k, i + 2k, ...
    with their rows of the batch's draws (t, z, probes), evaluated one after the other in
    a lax.scan, their gradients and metrics averaged. That is the whole batch's gradient
    up to rounding (each term is a per-sample mean), in the memory of one micro-batch.
    Strided rows keep a data-parallel batch's micro-batches on every device. Not the same
    numbers: dropout masks (micro-batch i folds i into the dropout key) and, with
    qc_fraction < 1, which rows are penalised (as many, other ones).
    """
    noise = loss.draw(key, batch)
    value_and_grad = jax.value_and_grad(
        lambda p, x, n: loss.evaluate(p, x, n, step), has_aux=True)
    k = grad_accum_steps
    if k == 1:
        (_, metrics), grads = value_and_grad(params, batch, noise)
        return metrics, grads
    if batch.shape[0] % k:
        raise ValueError(f"training.grad_accum_steps={k} must divide the batch size "
                         f"{batch.shape[0]}.")
    strided = lambda a: jnp.swapaxes(a.reshape(a.shape[0] // k, k, *a.shape[1:]), 0, 1)
    micro_batches = jax.tree.map(strided, (batch, noise._replace(dropout_key=None)))

    def micro_step(i, x, part):
        part = part._replace(dropout_key=jax.random.fold_in(noise.dropout_key, i))
        (_, metrics), grads = value_and_grad(params, x, part)
        return metrics, grads

    def accumulate(total, inputs):
        return jax.tree.map(jnp.add, total, micro_step(*inputs)), None

    inputs = (jnp.arange(k), *micro_batches)
    shapes = jax.eval_shape(micro_step, *jax.tree.map(lambda a: a[0], inputs))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(accumulate, zeros, inputs)
    return jax.tree.map(lambda a: a / k, total)


def make_train_step(loss: losses.Loss, optimizer: optax.GradientTransformation,
                    ema_decay: float | Callable, *, step: int | None = None,
                    grad_accum_steps: int = 1):
    """Returns train_step(state, batch [B, *S]) -> (state, metrics) for a losses.Loss.

    ema_decay: a number, or a function of state.step (ema_decay_schedule). step: the host
    step's qc_every branch (make_step_selector); grad_accum_steps: the batch in that many
    micro-batches (loss_gradients). A step whose loss or gradients are
    not finite leaves the state unchanged and reports metrics['nonfinite'] = 1, so a NaN
    never reaches the parameters or a checkpoint.
    """
    def train_step(state: TrainState, batch: jax.Array):
        key = jax.random.fold_in(state.key, state.step)
        metrics, grads = loss_gradients(loss, state.params, batch, key, step=step,
                                        grad_accum_steps=grad_accum_steps)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step) if callable(ema_decay) else ema_decay
        # e - (1 - d)(e - p): exactly e where p == e (the never-trained parameters).
        ema = jax.tree.map(lambda e, p: e - (1 - decay) * (e - p), state.ema_params, params)
        keep_finite = lambda new, old: jax.tree.map(
            lambda a, b: jnp.where(finite, a, b), new, old)
        new = state.replace(step=state.step + finite.astype(state.step.dtype),
                            params=keep_finite(params, state.params),
                            ema_params=keep_finite(ema, state.ema_params),
                            opt_state=keep_finite(opt_state, state.opt_state))
        metrics = dict(metrics, grad_norm=grad_norm,
                       nonfinite=jnp.logical_not(finite).astype(jnp.float32))
        return new, metrics

    return train_step


def make_step_selector(loss: losses.Loss, optimizer: optax.GradientTransformation,
                       ema_decay: float | Callable, qc_every: int, jit: Callable = jax.jit, *,
                       grad_accum_steps: int = 1) -> Callable[[int], Callable]:
    """Returns step_for(step) -> the jitted train step to run at host step `step`.

    loss is losses.make_loss_fn's. With qc_every = k > 1 there are two programs, both
    without a conditional: the penalised one for step % k == 0, the plain DSM one
    otherwise, each compiled by `jit` on first use.
    """
    programs = {}

    def step_for(step: int) -> Callable:
        phase = 0 if step % qc_every == 0 else 1
        if phase not in programs:
            programs[phase] = jit(make_train_step(loss, optimizer, ema_decay, step=phase,
                                                  grad_accum_steps=grad_accum_steps))
        return programs[phase]

    return step_for


PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM'd process.


class Preempted(SystemExit):
    """A pre-emption notice (SIGTERM) stopped training after its checkpoint was saved.

    A SystemExit: unless a caller catches it, the program ends quietly with
    PREEMPTED_EXIT_CODE and nothing after training (evaluation, metrics) runs. Rerunning
    the same command resumes from `step`.
    """

    def __init__(self, step: int, workdir: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step
        self.workdir = workdir

    def __str__(self) -> str:
        return (f"Pre-empted (SIGTERM): saved step {self.step} in {self.workdir}/checkpoints "
                "and stopped; rerun the same command to resume.")


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    stacked = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _check_finite(scalars: dict[str, float], step: int, workdir: str,
                  resumed_from: str | None = None) -> None:
    """Raises FloatingPointError if a step since the last report was not finite;
    resumed_from: the checkpoint this run resumed from, if that is within the report."""
    if scalars["nonfinite"] > 0:
        suspect = "" if resumed_from is None else (
            f"This began right after resuming from {resumed_from}: if the run was finite "
            "before that checkpoint was saved, the checkpoint may be damaged; "
            f"{checkpoint.move_aside_advice(resumed_from)} Otherwise: ")
        raise FloatingPointError(
            f"The loss or its gradient became NaN/inf before step {step}; those updates "
            f"were skipped, so the parameters are the last finite ones and were saved in "
            f"{workdir}/checkpoints. {suspect}Lower --config.optim.learning_rate, keep "
            "--config.optim.grad_clip on, or check the data; then rerun to resume.")


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains from scratch, from config.training.init_from, or resumes from the newest
    checkpoint in workdir that verifies (damaged newer ones are set aside, with warnings;
    checkpoint.Checkpointer.restore_latest_valid). Holds the workdir's writer lock
    (workdir_lock) throughout. Raises Preempted after saving if SIGTERM arrives."""
    with workdir_lock.WorkdirLock(workdir):
        return _train(config, workdir)


class TrainingPrograms(NamedTuple):
    """What a run trains with (make_training_programs). init: params -> TrainState;
    sharding: the state's shardings on the mesh; step_for: make_step_selector's, jitted
    with those shardings and the batch split over the mesh's data axis."""
    optimizer: optax.GradientTransformation
    init: Callable[[Any], TrainState]
    sharding: Any
    step_for: Callable[[int], Callable]


def build_training_model(config: ml_collections.ConfigDict) -> experiment.ScoreModel:
    """The score model as training runs it: in training.compute_dtype (evaluation and
    sampling build theirs in float32)."""
    return experiment.build_score_model(config, config.training.get("compute_dtype", "float32"))


def make_training_programs(config: ml_collections.ConfigDict, model: experiment.ScoreModel,
                           mesh) -> TrainingPrograms:
    """The optimizer, state initialiser and jitted train steps of `config` for `model`
    (build_training_model's) on `mesh`, exactly as train() runs them; the benchmarks time
    these."""
    optimizer = make_optimizer(config.optim)
    loss_fn = losses.make_loss_fn(model.score_fn, model.sde, **config.loss)
    init = lambda p: init_state(p, optimizer, config.seed)
    sharding = parallel.state_sharding(mesh, jax.eval_shape(init, model.init_params))
    qc_every = config.loss.qc_every if config.loss.qc_weight > 0 else 1
    step_for = make_step_selector(
        loss_fn, optimizer, ema_decay_schedule(config.optim), qc_every,
        functools.partial(jax.jit, in_shardings=(sharding, parallel.data_sharding(mesh)),
                          out_shardings=(sharding, parallel.replicated(mesh)),
                          donate_argnums=0),
        grad_accum_steps=config.training.grad_accum_steps)
    return TrainingPrograms(optimizer, init, sharding, step_for)


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    mesh = parallel.make_mesh(config.parallel.data_axis, config.parallel.model_axis)
    batch_size = config.training.batch_size
    parallel.check_batch_size(batch_size, mesh)
    _check_accumulation(batch_size, config.training.grad_accum_steps, mesh)
    local_batch = data.make_train_batches(config)  # Bad data fail before the model is built.
    model = build_training_model(config)
    programs = make_training_programs(config, model, mesh)
    optimizer = programs.optimizer
    state = jax.jit(programs.init, out_shardings=programs.sharding)(model.init_params)
    metadata = {"config": config.to_dict(),
                "signature": experiment.model_signature(config, model.init_params)}

    def batch_at(step: int) -> jax.Array:
        return parallel.global_batch(local_batch(step), mesh)

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    num_steps = config.training.num_steps
    with checkpoint.Checkpointer(workdir, max_to_keep=config.training.keep_checkpoints) as ckpt, \
            distributed.PreemptionWatch() as preemption:
        resumed_from = None
        if ckpt.latest_step() is not None:
            state, saved = ckpt.restore_latest_valid(state)
            checkpoint.check_compatible(saved, metadata)
            resumed_from = saved[checkpoint.RESTORED_FROM]
            logging.info("Resumed from step %d in %s.", int(state.step), workdir)
        else:
            if config.training.init_from:
                state = _init_from(config.training.init_from, state, optimizer, metadata)
            elif config.loss.qc_weight > 0 and data.of(config).kind == data.IMAGE:
                logging.warning(
                    "training.init_from is empty: this QCSBM trains from scratch, not as the "
                    "paper's fine-tune of a trained USBM. To fine-tune, train the USBM first "
                    "and pass --config.training.init_from=ITS_WORKDIR.")
            writer.write_hparams(_flat_hparams(config))
        start = int(state.step)
        report = periodic_actions.ReportProgress(
            num_train_steps=num_steps, writer=writer,
            every_steps=config.training.log_every, every_secs=None)
        history = []
        try:
            for step in range(start, num_steps):
                state, metrics = programs.step_for(step)(state, batch_at(step))
                history.append(metrics)
                done = step + 1
                report(done, time.time())
                if done % config.training.log_every == 0 or done == num_steps:
                    scalars = _mean_metrics(history)
                    history = []
                    writer.write_scalars(done, scalars)
                    if scalars["nonfinite"] > 0:
                        _save(ckpt, state, metadata)
                        _check_finite(scalars, done, workdir, resumed_from
                                      if done - start <= config.training.log_every else None)
                if done % config.training.checkpoint_every == 0 or done == num_steps:
                    _save(ckpt, state, metadata)
                if preemption.reached(done):
                    _save(ckpt, state, metadata)
                    ckpt.wait()
                    preempted = Preempted(int(state.step), workdir)
                    logging.warning("%s", preempted)
                    raise preempted
        finally:
            ckpt.wait()
            writer.flush()
    return state


def _check_accumulation(batch_size: int, steps, mesh) -> None:
    """grad_accum_steps must be a positive int whose micro-batches split over the mesh."""
    if not isinstance(steps, int) or steps < 1 or batch_size % steps:
        raise ValueError(f"--config.training.grad_accum_steps={steps!r} must be a positive "
                         f"integer that divides training.batch_size={batch_size}.")
    parallel.check_batch_size(batch_size // steps, mesh,
                              "micro-batch size (training.batch_size / grad_accum_steps)")


def _init_from(source: str, state: TrainState, optimizer: optax.GradientTransformation,
               metadata: dict) -> TrainState:
    """`state` with the parameters (and EMA parameters) of the newest valid checkpoint in
    the workdir `source`, a fresh optimizer state and step 0: a fine-tune of another run
    of the same model (e.g. a QCSBM from a trained USBM)."""
    flag = f"--config.training.init_from={source}"
    with checkpoint.Checkpointer(source, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{flag} holds no checkpoint in {ckpt.directory}; train "
                                    "that run first or fix the path.")
        parts, saved = ckpt.restore_latest_valid(
            {"params": state.params, "ema_params": state.ema_params})
    checkpoint.check_compatible(saved, metadata, advice=(
        f"{flag} must name a run of this model (same network, family and data: a USBM can "
        "seed a QCSBM, a CSBM cannot)."))
    logging.info("Initialised the parameters from %s (fresh optimizer, step 0).",
                 saved[checkpoint.RESTORED_FROM])
    params = parts["params"]
    opt_state = jax.jit(optimizer.init, out_shardings=jax.tree.map(
        lambda x: x.sharding, state.opt_state))(params)
    return state.replace(params=params, ema_params=parts["ema_params"], opt_state=opt_state)


def _save(ckpt: "checkpoint.Checkpointer", state: TrainState, metadata: dict) -> None:
    """Saves the state under its own step unless that step is already saved."""
    step = int(state.step)
    if ckpt.latest_step() != step:
        ckpt.save(step, state, metadata=metadata, force=True)


def _flat_hparams(config: ml_collections.ConfigDict) -> dict:
    flat = {}

    def visit(prefix, node):
        for k, v in node.items():
            if isinstance(v, dict):
                visit(f"{prefix}{k}.", v)
            else:
                flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    visit("", config.to_dict())
    return flat
