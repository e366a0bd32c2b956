"""Reading a trained (or imported) run: its config and the parameters to evaluate."""

from typing import Any

import jax
import ml_collections
import numpy as np

from qcsbm_jax import checkpoint, experiment, parallel

PARAMS = {"ema": "ema_params", "raw": "params"}


def read_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a run was trained with, from its newest (or `step`'s) checkpoint
    metadata, locked like a --config file."""
    with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"No checkpoint in {ckpt.directory}. Train first (--mode train), or point "
                "at a trained or converted run.")
        metadata = ckpt.metadata(step)
    if "config" not in metadata:
        raise ValueError(f"The checkpoint in {workdir} records no config; pass the config "
                         "it was trained with.")
    config = ml_collections.ConfigDict(_tuples(metadata["config"]))
    config.lock()
    return config


def _tuples(tree):
    """JSON lists back to the tuples configs hold."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def restore_params(config: ml_collections.ConfigDict, workdir: str,
                   model: experiment.ScoreModel, mesh, step: int | None = None,
                   params: str | None = None) -> tuple[Any, int]:
    """The parameters to evaluate, replicated over the mesh, and their step.

    params: 'ema' (EMA parameters), 'raw' (trained parameters) or None: config.eval.params
    (without an EMA, optim.ema_decay = 0, the two are equal). step None: the newest
    readable checkpoint in workdir/checkpoints; otherwise that step. Only the parameters
    and the step are read, so the optimizer settings (schedule, clipping) may differ from
    training's.
    """
    params = params or config.eval.params
    if params not in PARAMS:
        raise ValueError(f"params must be one of {sorted(PARAMS)}, got {params!r}.")
    replicated = parallel.replicated(mesh)
    shapes = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(np.shape(p), np.asarray(p).dtype, sharding=replicated),
        model.init_params)
    which = PARAMS[params]
    target = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated), which: shapes}
    with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"No checkpoint in {workdir}/checkpoints. Train first with --mode train "
                "(or --mode all), or point --workdir at a trained run.")
        restored, saved = (ckpt.restore(target, step) if step is not None
                           else ckpt.restore_latest_valid(target))
    checkpoint.check_compatible(
        saved, {"signature": experiment.model_signature(config, model.init_params)},
        advice="Evaluate with the config the run was trained with, or point --workdir at a "
               "run of this model (same network, family and data).")
    return restored[which], int(restored["step"])
