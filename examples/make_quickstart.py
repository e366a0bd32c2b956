"""Writes examples/quickstart.ipynb from the cells below and executes it in place.

    .venv/bin/python examples/make_quickstart.py

The notebook is committed with its outputs; tests/test_examples.py executes it again.
"""

import os
import tempfile

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))

CELLS = [
    ("markdown", """# qcsbm_jax quickstart

Train a quasi-conservative score model (QCSBM) and an unconstrained one (USBM) on the
two-spirals toy data, then draw samples, compute likelihoods and measure how far each
score field is from being conservative. Everything below runs on a laptop CPU in about a
minute; `docs/method.md` explains the method."""),
    ("code", """import matplotlib.pyplot as plt
import numpy as np

import qcsbm_jax
from qcsbm_jax import config as config_lib, data, train"""),
    ("markdown", """## Train briefly

`toy_config` holds the paper's 2D settings (2000 steps at batch 5000, learning rate
7.5e-4); 1500 steps at batch 1000 with a larger learning rate are enough to see the
difference between the families. `train.train` writes checkpoints to
the workdir and resumes from them when run again; `qcsbm_jax.load` reads a run back
(also one trained with `launch/run.sh`, or a converted PyTorch checkpoint)."""),
    ("code", """runs = {}
for family in ("usbm", "qcsbm"):
    config = config_lib.toy_config("spirals2", family)
    with config.unlocked():
        config.training.update(num_steps=1500, batch_size=1000, log_every=100,
                               checkpoint_every=1500)
        config.optim.learning_rate = 2e-3
    train.train(config, f"runs/quickstart_{family}")
    runs[family] = qcsbm_jax.load(f"runs/quickstart_{family}")
runs"""),
    ("markdown", """## Sample

`run.sample(n, method=..., seed=...)` returns the samples and, per sample, the number of
score evaluations (NFE). Sample i of a seed does not depend on n."""),
    ("code", """test_points = data.toy_test_set(runs["qcsbm"].config)[:2000]
fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
axes[0].scatter(*test_points.T, s=1)
axes[0].set_title("data")
for ax, (family, run) in zip(axes[1:], runs.items()):
    samples, info = run.sample(2000, method="ode", seed=0)
    ax.scatter(*samples.T, s=1, color="C1")
    ax.set_title(f"{family}: ODE samples, mean NFE {info['nfe'].mean():.0f}")
plt.show()"""),
    ("markdown", """## Likelihood

`run.log_likelihood(x)` integrates the probability-flow ODE per point (exact divergence in
2D) and returns -log p(x) in nats."""),
    ("code", """for family, run in runs.items():
    nll = run.log_likelihood(test_points[:500])["nll"]
    print(f"{family}: NLL {nll.mean():.3f} ± {nll.std() / np.sqrt(len(nll)):.3f} nats")"""),
    ("markdown", """## Conservativeness

`run.asymmetry(x, t)` gives, per point, Asym = 1/2 ||J - J^T||_F^2 and the normalised
NAsym in [0, 1] of the score's Jacobian J (exact in 2D). A conservative field (the
gradient of a scalar) has 0. The penalty keeps the QCSBM's field closer to conservative
at every noise level."""),
    ("code", """times = np.linspace(0.01, 1.0, 12)
sde = runs["qcsbm"].model.sde
noise = np.random.default_rng(0).standard_normal((len(times), 500, 2))
noisy = [(test_points[:500] + float(sde.std(t)) * z).astype(np.float32)  # x_t, shared
         for t, z in zip(times, noise)]
fig, ax = plt.subplots(figsize=(5, 3.5))
for family, run in runs.items():
    curve = [run.asymmetry(x_t, t)["nasym"].mean() for t, x_t in zip(times, noisy)]
    ax.plot(times, curve, label=family)
ax.set(xlabel="t", ylabel="mean NAsym", yscale="log", title="Jacobian asymmetry")
ax.legend()
plt.show()"""),
]


def build() -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    for kind, source in CELLS:
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        notebook.cells.append(make(source))
    return notebook


def execute(notebook: nbformat.NotebookNode, cwd: str, timeout: int = 900) -> None:
    """Runs every cell in a fresh kernel with working directory cwd (raises on an error)."""
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": cwd}}).execute()


if __name__ == "__main__":
    nb = build()
    with tempfile.TemporaryDirectory() as workdir:  # its runs/ are not kept
        execute(nb, workdir)
    nbformat.write(nb, os.path.join(HERE, "quickstart.ipynb"))
