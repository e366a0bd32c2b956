"""--mode eval and --mode sample: restore, evaluate or sample, write (outputs.py).

Watching (eval.watch): evaluates each new checkpoint as training writes it, waiting with
orbax's checkpoints_iterator (process 0 looks, all processes get the step), until the
step training.num_steps. Each step is read from a snapshot orbax copies to
DIR/eval/snapshot/checkpoints, so the trainer may delete it meanwhile. A step written while
another is being evaluated is skipped when a newer one exists (the newest is taken).
Steps that already have metrics_S.json are skipped, so a killed evaluator just reruns.
eval.watch_timeout > 0 ends the watch after that many seconds without a new checkpoint.
"""

import contextlib
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_utils

from qcsbm_jax import checkpoint, data, experiment, parallel, restore, streams
from qcsbm_jax.evaluation import images, toy
from qcsbm_jax.evaluation.outputs import (SAMPLES_DIR, Evaluation, write_evaluation,
                                          write_samples)
from qcsbm_jax.sampling import registry

SNAPSHOT_DIR = "snapshot"  # Under eval.output_dir; holds a checkpoints/ directory.


def make_evaluator(config, model, mesh, test_images: np.ndarray | None = None
                   ) -> Callable[[Any], Evaluation]:
    """The evaluator of the config's data set (toy or image; images on test_images, or
    the test split when None); jitted once, reusable."""
    if data.of(config).kind == data.TOY:
        return toy.make_toy_evaluator(config, model, mesh)
    return images.make_image_evaluator(config, model, mesh, test_images)


def _evaluated(out: str, step: int) -> bool:
    """Whether out/metrics_<step>.json exists (the same answer on every process)."""
    done = epath.Path(out, f"metrics_{step}.json").exists()
    return bool(multihost_utils.broadcast_one_to_all(np.int32(done)))


def _evaluate_step(config, workdir, evaluator, params, step, writer) -> dict:
    """Evaluates params of `step`, writes the files and the summary scalars; the metrics."""
    results = write_evaluation(config, workdir, step, evaluator(params))
    summary = {k: v for k, v in results.items() if "/" not in k and k != "step"}
    writer.write_scalars(step, summary)
    writer.flush()
    logging.info("Step %d: %s", step, summary)
    return results


def _watch(config, workdir, model, mesh, evaluator, writer) -> dict:
    """Evaluates checkpoints as they appear until training.num_steps (module doc)."""
    final = config.training.num_steps
    timeout = config.eval.watch_timeout or None
    out = os.path.join(workdir, config.eval.output_dir)
    snapshot_root = os.path.join(out, SNAPSHOT_DIR)
    steps = checkpoint_utils.checkpoints_iterator(
        os.path.join(workdir, "checkpoints"), timeout=timeout,
        snapshot_dir=epath.Path(snapshot_root) / "checkpoints")
    results, step = {}, None
    with contextlib.closing(steps):
        for step in steps:
            if _evaluated(out, step):
                logging.info("Step %d was evaluated before; skipped.", step)
            else:
                try:
                    params, _ = restore.restore_params(config, snapshot_root, model, mesh, step)
                except checkpoint.CorruptCheckpointError as e:
                    logging.warning("%s Skipped.", e)
                else:
                    results = _evaluate_step(config, workdir, evaluator, params, step, writer)
            if step >= final:
                return results
    logging.warning("No new checkpoint for %s s after step %s; stopped watching before "
                    "step %d (training.num_steps).", timeout, step, final)
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Evaluates the newest checkpoint, or with eval.watch every new one until
    training.num_steps; writes DIR/<eval.output_dir> (outputs.py). Returns the last
    metrics computed ({} when watching found only evaluated steps)."""
    dataset = data.of(config)
    test_images = (images.load_test_images(config, dataset.shape)  # before the model:
                   if dataset.kind == data.IMAGE else None)       # a bad data set fails fast
    mesh = parallel.make_mesh(config.parallel.data_axis, config.parallel.model_axis)
    model = experiment.build_score_model(config)
    watch = config.eval.watch
    if not watch:
        params, step = restore.restore_params(config, workdir, model, mesh)
    evaluator = make_evaluator(config, model, mesh, test_images)
    writer = metric_writers.create_default_writer(
        os.path.join(workdir, config.eval.output_dir), just_logging=jax.process_index() > 0)
    try:
        if watch:
            return _watch(config, workdir, model, mesh, evaluator, writer)
        return _evaluate_step(config, workdir, evaluator, params, step, writer)
    finally:
        writer.close()


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Draws sampling.num_samples samples of the newest checkpoint with sampling.method
    from the 'sample' stream of config.seed; writes DIR/samples/<method>.npz (samples,
    step, nfe, method, settings as JSON, uint8 images for image data) and <method>.png.
    Returns the npz path."""
    mesh = parallel.make_mesh(config.parallel.data_axis, config.parallel.model_axis)
    model = experiment.build_score_model(config)
    params, step = restore.restore_params(config, workdir, model, mesh)
    sc = config.sampling
    settings = registry.settings_from_config(sc, sc.method)
    sample_fn = registry.make_sampler(model, mesh, sc.method, batch_size=sc.batch_size,
                                      **settings)
    samples, nfe = sample_fn(params, streams.stream_key(config.seed, "sample"), sc.num_samples)
    logging.info("%s sampling: %d samples, mean NFE %.1f", sc.method, len(samples), nfe.mean())
    out = os.path.join(workdir, SAMPLES_DIR)
    if jax.process_index() == 0:
        epath.Path(out).mkdir(parents=True, exist_ok=True)
        write_samples(config, out, sc.method, samples, step, nfe=nfe, method=sc.method,
                      settings=settings,
                      title=f"{config.data.name}, step {step}, {sc.method} "
                            f"(mean NFE {nfe.mean():.0f})")
    return os.path.join(out, sc.method + ".npz")
