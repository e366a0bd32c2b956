"""A workdir of ours out to a checkpoint the official PyTorch code loads.

`export_checkpoint(workdir, out)` writes, for the newest (or a given) step, what the
official save_checkpoint writes: 'model' (the DataParallel state dict, 'module.' names,
with the 'sigmas' buffer), 'ema' (decay, num_updates = step, shadow_params: our EMA
parameters), 'optimizer' (Adam's param_groups with our learning rate, betas and eps, and
no moments: the official restore_checkpoint loads it; training there would start Adam
afresh) and 'step'. The file is torch.save's zip format, written without torch
(torch_io.save), so a QC fine-tune made here can be evaluated with the authors' scripts.
"""

import collections
import os

import jax
import ml_collections
import numpy as np

from qcsbm_jax import checkpoint, torch_io
from qcsbm_jax.convert import layout
from qcsbm_jax.convert.importing import abstract_params, check_config

# The official configs' model.num_scales, the length of NCSNpp's 'sigmas' buffer.
OFFICIAL_NUM_SCALES = 1000


def official_sigmas(config: ml_collections.ConfigDict) -> np.ndarray:
    """NCSNpp's 'sigmas' buffer: sigma_max down to sigma_min, geometric, float64."""
    return np.exp(np.linspace(np.log(config.sde.sigma_max), np.log(config.sde.sigma_min),
                              OFFICIAL_NUM_SCALES))


def _restore(workdir: str, step: int | None) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(config, {'params', 'ema_params'} as NumPy trees, step) of a checkpoint in workdir."""
    with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {ckpt.directory}; nothing to export.")
        config = ml_collections.ConfigDict(ckpt.metadata(step)["config"])
        check_config(config)
        params = abstract_params(config)
        target = {"step": jax.ShapeDtypeStruct((), np.int32), "params": params,
                  "ema_params": params}
        restored, _ = ckpt.restore(target, step)
    return config, restored, int(restored["step"])


def export_checkpoint(workdir: str, out: str, step: int | None = None) -> dict:
    """Writes the checkpoint of `step` (default: the newest) in workdir to `out` in the
    official format (module doc); returns {'step', 'tensors', 'out'}."""
    config, restored, step = _restore(workdir, step)
    tensors = layout.official_layout(config.model, restored["params"])
    negated = (set(layout.output_paths(config.model, len(config.model.ch_mult)))
               if config.sde.name in layout.NEGATED_OUTPUT_SDES else set())

    def official(tree: dict, tensor: layout.Tensor) -> np.ndarray:
        value = np.asarray(layout.get(tree, tensor.path), np.float32)
        value = -value if tensor.path in negated else value
        return np.ascontiguousarray(layout.TO_TORCH[tensor.kind](value))

    prefix = layout.STATE_DICT_PREFIX
    model = collections.OrderedDict([(prefix + layout.SIGMAS, official_sigmas(config))])
    model.update((prefix + t.name, official(restored["params"], t)) for t in tensors)
    optim = config.optim
    saved = {
        "optimizer": {"state": {}, "param_groups": [{
            "lr": float(optim.learning_rate), "betas": (float(optim.b1), float(optim.b2)),
            "eps": float(optim.adam_eps), "weight_decay": 0, "amsgrad": False,
            "params": list(range(len(tensors)))}]},
        "model": model,
        "ema": {"decay": float(optim.ema_decay), "num_updates": step,
                "shadow_params": [official(restored["ema_params"], t)
                                  for t in tensors if t.trainable]},
        "step": step,
    }
    torch_io.save(saved, out)
    return {"step": step, "tensors": len(tensors), "out": os.path.abspath(out)}
