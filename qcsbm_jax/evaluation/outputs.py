"""What evaluation and sampling write, on process 0.

DIR/<eval.output_dir> (default DIR/eval) for an evaluated step S: asymmetry_S.png
(per-level curves against t / T, log scale), samples_S.png (toy: scatter beside test
points; images: a grid of the first GRID_IMAGES), samples_S.npz, each also copied to its
name without _S (the latest); then metrics_S.json, which marks S as done, and
metrics.json (with a 'protocol' entry when sample metrics were computed).
DIR/samples: <method>.npz and <method>.png per sampler (write_samples).
"""

import json
import os
from typing import NamedTuple

import jax
import numpy as np
from etils import epath

from qcsbm_jax import data, plotting

SAMPLES_DIR = "samples"
GRID_IMAGES = 64  # Samples shown in a sample-grid PNG.


class Evaluation(NamedTuple):
    """What evaluating one set of parameters gives."""
    metrics: dict[str, float]
    level_times: np.ndarray  # [L] t / T of the per-level metrics
    samples: np.ndarray  # [M, *data_shape], M >= 0
    reference: np.ndarray | None  # toy test points drawn beside the samples
    protocol: dict = {}  # how sample metrics were computed (sample_quality.py)


def value_range(config) -> tuple[float, float]:
    """The range of image values in model space."""
    return (-1.0, 1.0) if config.data.centered else (0.0, 1.0)


def saved_pixels(samples, config) -> np.ndarray:
    """uint8 pixels [N, H, W, C] that a saved image sample holds: model-space values
    mapped from value_range(config), clipped (plotting.to_pixels); what FID scores."""
    return plotting.to_pixels(samples, value_range(config))


def write_json(path: str, values: dict) -> None:
    """Writes JSON through a temporary file, so a killed writer leaves no partial file."""
    temporary = epath.Path(path + ".tmp")
    temporary.parent.mkdir(parents=True, exist_ok=True)
    temporary.write_text(json.dumps(values, indent=2, sort_keys=True))
    temporary.replace(path)


def write_samples(config, directory: str, name: str, samples: np.ndarray, step: int, *,
                  title: str, nfe: np.ndarray | None = None,
                  reference: np.ndarray | None = None, **records) -> list[str]:
    """Writes name.npz (samples, step, nfe if any, uint8 `images` for image data, and
    records, e.g. the sampler's name and settings as JSON) and name.png (toy: scatter beside
    `reference`; images: a grid of the first GRID_IMAGES). Returns the file names."""
    extra = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in records.items()}
    if nfe is not None:
        extra["nfe"] = nfe
    png = os.path.join(directory, name + ".png")
    if data.of(config).kind == data.TOY:
        plotting.scatter_png(png, samples if reference is None
                             else {"data": reference, "samples": samples}, title=title)
    else:
        extra["images"] = saved_pixels(samples, config)
        plotting.image_grid_png(png, samples[:GRID_IMAGES], value_range=value_range(config))
    with epath.Path(directory, name + ".npz").open("wb") as f:
        np.savez(f, samples=samples, step=step, **extra)
    return [name + ".png", name + ".npz"]


def write_evaluation(config, workdir: str, step: int, evaluation: Evaluation) -> dict:
    """Writes DIR/<eval.output_dir>/*_<step> files and their latest copies (module doc);
    returns the metrics."""
    results = dict(evaluation.metrics, step=float(step))
    if jax.process_index() != 0:
        return results
    out = os.path.join(workdir, config.eval.output_dir)
    epath.Path(out).mkdir(parents=True, exist_ok=True)
    names = []
    num_levels = len(evaluation.level_times)
    if num_levels:
        names.append(f"asymmetry_{step}.png")
        plotting.curves_png(
            os.path.join(out, names[-1]), evaluation.level_times,
            {name: [results[f"{name}/level_{i}"] for i in range(num_levels)]
             for name in ("asym", "nasym")},
            xlabel="t / T", ylabel="value", logy=True,
            title=f"Jacobian asymmetry per noise level, step {step}")
    if len(evaluation.samples):
        names += write_samples(config, out, f"samples_{step}", evaluation.samples, step,
                               title=f"{config.data.name}, step {step}",
                               reference=evaluation.reference)
    for name in names:
        epath.Path(out, name).copy(epath.Path(out, name.replace(f"_{step}.", ".")),
                                   overwrite=True)
    written = dict(results, protocol=evaluation.protocol) if evaluation.protocol else results
    write_json(os.path.join(out, f"metrics_{step}.json"), written)
    write_json(os.path.join(out, "metrics.json"), written)
    return results
