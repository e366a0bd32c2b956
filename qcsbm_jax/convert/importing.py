"""Official PyTorch NCSN++ / DDPM++ checkpoints into a workdir of ours.

The QCSBM code and score_sde_pytorch save a dict: 'model' (the state dict of the network
wrapped in DataParallel), 'ema' ({'decay', 'num_updates', 'shadow_params': the trainable
tensors in parameter order}), 'optimizer' (Adam's state), and for score_sde 'step'.
`import_checkpoint` maps every tensor of 'model' and of the EMA onto our parameter tree
(layout.py), checks every name and shape against the config's network, and writes
WORKDIR/checkpoints/<step> with the state {step, params, ema_params} and the usual
metadata (config, signature), so evaluation, sampling and training.init_from read it like
a run of ours. The optimizer's moments are not imported: a fine-tune starts Adam afresh
(as init_from does for a run of ours), and the import cannot be resumed; its metadata
note says so to whoever tries.

The step is 'step' when saved, else the EMA's update count (the QCSBM code does not save
the step), else 0. A file without 'ema' (or a bare state dict) gives EMA = parameters.
"""

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import ml_dtypes
import numpy as np
from flax import nnx

from qcsbm_jax import checkpoint, data, experiment, models, torch_io
from qcsbm_jax.convert import architecture, layout
from qcsbm_jax.convert.layout import ConvertError

_LISTED = 12
_IMAGE_MODELS = ("ncsnpp", "ddpmpp")
# Tolerance of the noise range a VE checkpoint was trained for (its 'sigmas' buffer,
# geometric from sigma_max down to sigma_min) against config.sde's.
_SIGMA_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Official:
    """The arrays of an official checkpoint. tensors: the state dict without 'module.';
    shadow: the EMA of the trainable tensors in parameter order, or None."""
    tensors: dict[str, np.ndarray]
    shadow: list[np.ndarray] | None
    ema_decay: float | None
    step: int
    step_from: str
    ignored: tuple[str, ...]


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConvertError unless config describes a network the official ones map onto."""
    if config.model.name not in _IMAGE_MODELS:
        raise ConvertError(
            f"model.name={config.model.name!r}: only NCSN++ / DDPM++ image networks convert; "
            "use an image config such as configs/cifar10_usbm_ncsnpp.py.")
    if config.model.family != "unconstrained":
        raise ConvertError(
            "model.family='constrained': the official C-NCSN++ energy is ||F||^2 / (2 sigma) "
            "(F the output divided by sigma) where ours, the paper's, is ||F||^2 / 2, and no "
            "change of weights turns one into the other. Convert U-NCSN++ / QC-NCSN++ "
            "checkpoints with an unconstrained (usbm or qcsbm) config.")
    if config.model.output != "scaled":
        raise ConvertError("model.output must be 'scaled' (score = f / std), the official "
                           "networks' parameterisation.")


def abstract_params(config: ml_collections.ConfigDict) -> dict:
    """Shapes and dtypes (ShapeDtypeStruct) of the parameters of config's network."""
    shape = data.of(config).shape
    network = nnx.eval_shape(lambda: models.build_model(config.model, shape, jax.random.key(0)))
    return nnx.to_pure_dict(nnx.state(network, nnx.Param))


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


def read_official(path: str) -> Official:
    """The checkpoint at path (no torch needed; nothing in it is executed)."""
    obj = torch_io.load(path)
    if _is_state_dict(obj):
        obj = {"model": obj}
    if not (isinstance(obj, Mapping) and _is_state_dict(obj.get("model"))):
        what = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConvertError(
            f"{path} holds {what}, not a checkpoint of the official QCSBM or score_sde code "
            "(a dict with 'model', 'ema', 'optimizer' and maybe 'step') or a state dict.")
    tensors = dict(obj["model"])
    if all(name.startswith(layout.STATE_DICT_PREFIX) for name in tensors):
        tensors = {name[len(layout.STATE_DICT_PREFIX):]: v for name, v in tensors.items()}
    ema = obj.get("ema")
    shadow = decay = updates = None
    if ema is not None:
        shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
        if not (isinstance(shadow, list) and all(isinstance(a, np.ndarray) for a in shadow)):
            raise ConvertError(f"{path}: 'ema' has no list of tensors 'shadow_params'; it was "
                               "not saved by the official ExponentialMovingAverage.")
        decay, updates = ema.get("decay"), ema.get("num_updates")
    if isinstance(obj.get("step"), int):
        step, step_from = obj["step"], "step"
    elif isinstance(updates, int):
        step, step_from = updates, "ema.num_updates"
    else:
        step, step_from = 0, "none"
    ignored = tuple(sorted(set(obj) - {"model", "ema", "step"}))
    return Official(tensors, shadow, decay, int(step), step_from, ignored)


def _listing(lines: list[str]) -> str:
    more = len(lines) - _LISTED
    return "\n  " + "\n  ".join(lines[:_LISTED]) + (f"\n  ... and {more} more" if more > 0 else "")


def _expected(config: ml_collections.ConfigDict, params: Mapping) -> dict[str, tuple]:
    ours = dict(layout.leaves(params))
    return {t.name: layout.torch_shape(t.kind, tuple(ours[t.path].shape))
            for t in layout.official_layout(config.model, params)}


def _differences(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> list[str]:
    lines = [f"{name}: {list(shape)} in the checkpoint, {list(expected[name])} for the config"
             for name, shape in found.items() if name in expected and expected[name] != shape]
    lines += [f"{name}: missing from the checkpoint" for name in expected if name not in found]
    lines += [f"{name}: {list(found[name])} in the checkpoint, not in the config's network"
              for name in found if name not in expected]
    return lines


def _flag(key: str, value: Any) -> str:
    text = repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)
    return f"--config.{key}={text!r}" if " " in text else f"--config.{key}={text}"


def _same(a: Any, b: Any) -> bool:
    """Config values equal, tuples and lists alike."""
    return tuple(a) == tuple(b) if isinstance(a, (tuple, list)) else a == b


def _fix(config: ml_collections.ConfigDict, found: Mapping[str, tuple]) -> str:
    """The overrides that make the config's network this checkpoint's, when the tensors
    show them and the layout they imply fits exactly; else ''."""
    try:
        settings, channels, attention = architecture.infer_model(found)
    except (ValueError, KeyError, IndexError):
        return ""
    data_channels = data.of(config).shape[-1]
    if channels != data_channels:
        return (f"\nIts network reads {channels}-channel images; data.name="
                f"{config.data.name!r} has {data_channels}: use a config for such data.")
    image_size = data.of(config).shape[0]
    settings["attn_resolutions"] = tuple(image_size >> level for level in attention)
    changes = {k: v for k, v in settings.items() if not _same(config.model[k], v)}
    candidate = ml_collections.ConfigDict(config.to_dict())
    candidate.model.update(changes)
    try:
        fits = not _differences(_expected(candidate, abstract_params(candidate)), found)
    except (ValueError, KeyError):
        fits = False
    if not fits or not changes:
        return ""
    flags = " ".join(_flag(f"model.{k}", v) for k, v in sorted(changes.items()))
    hint = ("\nIt fits the config with these overrides (the tensors do not show dropout, "
            f"fourier_scale, skip_rescale or init_scale; check those):\n  {flags}")
    if "embedding_type" in changes:
        hint += ("\nA positional embedding is DDPM++ (VP / sub-VP SDE), a Fourier one NCSN++ "
                 "(VE SDE): start from a *_ddpmpp.py or *_ncsnpp.py config accordingly.")
    return hint


def check_fits(official: Official, config: ml_collections.ConfigDict, params: Mapping,
               path: str) -> None:
    """Raises ConvertError, naming the differing tensors and the config keys that would
    fix them, unless the checkpoint has exactly the tensors of config's network."""
    found = {n: tuple(a.shape) for n, a in official.tensors.items() if n != layout.SIGMAS}
    if not any(name.startswith("all_modules.") for name in found):
        raise ConvertError(
            f"{path} is not an NCSN++ / DDPM++ state dict: none of its {len(found)} tensors "
            f"is named all_modules.* (first: {sorted(found)[:3]}). The converter reads the "
            "NCSN++ and DDPM++ checkpoints of the official QCSBM code and of score_sde_pytorch.")
    lines = _differences(_expected(config, params), found)
    if lines:
        raise ConvertError(
            f"{path} does not fit the config's network ({len(lines)} differences):"
            f"{_listing(lines)}{_fix(config, found)}")
    sigmas = official.tensors.get(layout.SIGMAS)
    if (config.sde.name == "ve" and sigmas is not None and sigmas.ndim == 1
            and sigmas.size > 1):
        trained = (float(sigmas[-1]), float(sigmas[0]))
        if not np.allclose(trained, (config.sde.sigma_min, config.sde.sigma_max),
                           rtol=_SIGMA_RTOL):
            raise ConvertError(
                f"{path} was trained for sigma from {trained[0]:g} to {trained[1]:g} (its "
                f"'sigmas' buffer); the config's VE SDE has {config.sde.sigma_min:g} to "
                f"{config.sde.sigma_max:g}. Pass --config.sde.sigma_min={trained[0]:g} "
                f"--config.sde.sigma_max={trained[1]:g}.")


def _float32(name: str, array: np.ndarray) -> np.ndarray:
    """The tensor as float32 (from float16, bfloat16, float32 or float64)."""
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16):
        raise ConvertError(f"Tensor {name} has dtype {array.dtype}, not a floating type.")
    return np.asarray(array, np.float32)


def _trees(official: Official, tensors: list[layout.Tensor], negated: set[tuple],
           path: str) -> tuple[dict, dict]:
    """(params, ema_params) as nested dicts of float32 arrays."""
    trainable = [t for t in tensors if t.trainable]
    averaged = dict(official.tensors)
    if official.shadow is not None:
        if len(official.shadow) != len(trainable):
            raise ConvertError(
                f"{path}: ema.shadow_params holds {len(official.shadow)} tensors, the network "
                f"{len(trainable)} trainable ones; the EMA was saved from another network.")
        for i, (t, array) in enumerate(zip(trainable, official.shadow)):
            if array.shape != official.tensors[t.name].shape:
                raise ConvertError(
                    f"{path}: ema.shadow_params[{i}] has shape {list(array.shape)}, the "
                    f"parameter {t.name} {list(official.tensors[t.name].shape)}; the EMA does "
                    "not follow the network's parameter order.")
            averaged[t.name] = array
    trees = ({}, {})
    for tree, source in zip(trees, (official.tensors, averaged)):
        for t in tensors:
            value = layout.TO_OURS[t.kind](_float32(t.name, source[t.name]))
            layout.put(tree, t.path, np.ascontiguousarray(-value if t.path in negated else value))
    return trees


def _check_new_workdir(workdir: str) -> str:
    if "://" in workdir:
        raise ConvertError(f"--workdir={workdir}: the converter writes a local directory; copy "
                           "it to cloud storage afterwards (e.g. gsutil -m cp -r).")
    workdir = os.path.abspath(workdir)
    existing = os.path.join(workdir, "checkpoints")
    if os.path.isdir(existing) and os.listdir(existing):
        raise ConvertError(f"{existing} already holds checkpoints; convert into a new "
                           "--workdir (nothing was written).")
    return workdir


def _write(workdir: str, step: int, state: dict, metadata: dict) -> None:
    """Saves under a temporary directory beside workdir, then moves its checkpoints/ in,
    so workdir gets a complete checkpoint or nothing."""
    parent = os.path.dirname(workdir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    created = not os.path.exists(workdir)
    try:
        with checkpoint.Checkpointer(staging, async_save=False) as ckpt:
            ckpt.save(step, state, metadata=metadata, force=True)
        os.makedirs(workdir, exist_ok=True)
        os.rename(os.path.join(staging, "checkpoints"), os.path.join(workdir, "checkpoints"))
    except BaseException:
        if created and os.path.isdir(workdir) and not os.listdir(workdir):
            os.rmdir(workdir)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def import_checkpoint(path: str, config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Converts the official checkpoint at `path` for config's network into
    WORKDIR/checkpoints/<step> (module doc); returns the metadata written.

    Raises ConvertError (or torch_io.TorchFileError, FileNotFoundError) saying what to do;
    then nothing has been written.
    """
    workdir = _check_new_workdir(workdir)
    check_config(config)
    official = read_official(path)
    params = abstract_params(config)
    check_fits(official, config, params, path)
    tensors = layout.official_layout(config.model, params)
    negated = (set(layout.output_paths(config.model, len(config.model.ch_mult)))
               if config.sde.name in layout.NEGATED_OUTPUT_SDES else set())
    params, ema_params = _trees(official, tensors, negated, path)
    source = os.path.abspath(path)
    metadata = {
        "config": config.to_dict(),
        "signature": experiment.model_signature(config, params),
        checkpoint.NOTE: (
            f"Imported from {source} by qcsbm_jax.convert: step, parameters and EMA "
            "parameters, no optimizer state. Evaluate or sample it in this workdir, or "
            f"fine-tune from it in another one with --config.training.init_from={workdir}; "
            "it cannot be resumed."),
        "imported": {"source": source, "step_from": official.step_from,
                     "ema": "ema.shadow_params" if official.shadow is not None
                            else "none (EMA = parameters)",
                     "ema_decay": official.ema_decay, "output_negated": bool(negated),
                     "not_imported": list(official.ignored)},
    }
    state = {"step": np.int32(official.step), "params": params, "ema_params": ema_params}
    _write(workdir, official.step, state, metadata)
    return metadata
