"""Train the authors' 2D program and evaluate it with ours (docs/method.md, experiment 2).

The authors' code is chen-hao-chao/qcsbm, 2d_examples/ (not part of this project; pass the
checkout's path). Their own pieces train: the config (configs/<family>/<data>_config.py),
the network (models/simple_score_fn.py), the train step (losses.get_step_fn: loss,
backward, clip_grad_norm_(1.0)) and the Adam of their run_lib.py. This script replaces only
what needs CUDA or TensorFlow: the data pipeline. Their tf.data pipeline (a 50,000-point
data set, repeated, shuffled through a 10,000-element buffer, batches of 5,000) is
emulated on the host with the same buffer semantics, on our training set of the same data
set (the points `qcsbm_jax` trains on for the same data.seed), so both programs see the
same points. torch.manual_seed(seed) seeds their initialisation and their t, z and probes;
NumPy's RandomState(seed) the shuffle.

Steps, each in its own environment (torch and JAX are never in one process):
  data    (JAX)    WORKDIR/official/train_data.npy, our training set
  train   (torch)  their training for --updates steps (default: their n_iters, which is
                   our training.num_steps; their loop itself makes n_iters + 1); the
                   weights every --save_every steps from --save_from, and at the end, as
                   WORKDIR/official/step_<n>.npz (their state_dict names); loss.csv.
                   With --ema_decay d > 0 this script also keeps an EMA of their weights
                   (outside their code, which has none in 2D; it does not change their
                   training), saved beside them as step_<n>_ema.npz
  import  (JAX)    each step_<n>.npz as our checkpoint of step n in WORKDIR/checkpoints
                   (its EMA as the EMA parameters when saved), so that
                   `python -m qcsbm_jax.main --mode eval` evaluates it
reference/run_official_2d.sh runs all three and the evaluation.
"""

import argparse
import glob
import importlib
import itertools
import os
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's qcsbm_jax, not an installed one

THEIR_NAMES = {"gaussians8": "gaussian_8", "checkerboard": "checkerboard",
               "spirals2": "spiral_2"}
THEIR_BUFFER = 10_000  # 2d_examples/datasets.py: shuffle_buffer_size


def _paths(workdir: str) -> tuple[str, str]:
    official = os.path.join(workdir, "official")
    os.makedirs(official, exist_ok=True)
    return official, os.path.join(official, "train_data.npy")


# ------------------------------------------------------------------------------- data

def write_data(args) -> None:
    from qcsbm_jax import config as config_lib, data

    config = config_lib.toy_config(args.dataset, args.family)
    config.data.seed = args.data_seed
    np.save(_paths(args.workdir)[1], data.toy_training_set(config))


# ------------------------------------------------------------------------------ train

def shuffled_batches(data: np.ndarray, batch_size: int, rng: np.random.RandomState):
    """Their tf.data order: the data repeated, through a THEIR_BUFFER-element shuffle
    buffer (each output a uniform pick from the buffer, refilled by the next element),
    then batched. Yields [batch_size, 2] arrays forever."""
    stream = itertools.cycle(range(len(data)))
    buffer = np.array([next(stream) for _ in range(THEIR_BUFFER)])
    while True:
        picks = np.empty(batch_size, np.int64)
        for j in range(batch_size):
            slot = rng.randint(THEIR_BUFFER)
            picks[j], buffer[slot] = buffer[slot], next(stream)
        yield data[picks]


def train(args) -> None:
    import torch

    sys.path.insert(0, os.path.join(args.qcsbm, "2d_examples"))
    losses = importlib.import_module("losses")
    networks = importlib.import_module("models.simple_score_fn")
    config = importlib.import_module(
        f"configs.{args.family}.{THEIR_NAMES[args.dataset]}_config").get_config()
    official, data_path = _paths(args.workdir)
    updates = args.updates or config.training.n_iters
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = config.data.dtype
    model = networks.simple_noise_conditioned_score_fn(config).to(dtype=dtype)
    step_fn = losses.get_step_fn(
        reg_type=config.loss.reg_type, std_value_max=config.loss.std_max,
        std_value_min=config.loss.std_min, balancing_fac=config.loss.balancing_fac,
        slices=config.loss.slices, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr,
                                 betas=(config.optim.beta1, 0.999), eps=config.optim.eps,
                                 weight_decay=config.optim.weight_decay)
    batches = shuffled_batches(np.load(data_path), config.training.batch_size,
                               np.random.RandomState(args.seed))
    start, rows = time.time(), ["step,loss,reg,seconds"]
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for step in range(1, updates + 1):
        batch = torch.as_tensor(next(batches), dtype=dtype)
        loss, reg = step_fn(model, optimizer, batch, config.model.type == "score_model")
        if args.ema_decay > 0:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    ema[k].mul_(args.ema_decay).add_(v, alpha=1 - args.ema_decay)
        if step % 100 == 0 or step == updates:
            rows.append(f"{step},{loss.item():.6g},{reg.item():.6g},{time.time() - start:.1f}")
            print(rows[-1], flush=True)
        if step == updates or (step >= args.save_from and step % args.save_every == 0):
            np.savez(os.path.join(official, f"step_{step}.npz"),
                     **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
            if args.ema_decay > 0:
                np.savez(os.path.join(official, f"step_{step}_ema.npz"),
                         **{k: v.cpu().numpy() for k, v in ema.items()})
    with open(os.path.join(official, "loss.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


# ----------------------------------------------------------------------------- import

def _read_params(path: str) -> dict:
    """Our toy network's parameters from their state dict saved as .npz."""
    import jax
    from qcsbm_jax.models import toy

    with np.load(path) as state_dict:
        return jax.tree.map(np.asarray, toy.params_from_torch(dict(state_dict)))


def import_checkpoints(args) -> None:
    import jax
    from qcsbm_jax import checkpoint, config as config_lib, experiment, train as train_lib

    config = config_lib.toy_config(args.dataset, args.family)
    model = experiment.build_score_model(config)
    optimizer = train_lib.make_optimizer(config.optim)
    official, _ = _paths(args.workdir)
    files = sorted(glob.glob(os.path.join(official, "step_*[0-9].npz")),
                   key=lambda p: int(re.findall(r"\d+", os.path.basename(p))[0]))
    if not files:
        raise FileNotFoundError(f"No step_<n>.npz in {official}; run 'train' first.")
    with checkpoint.Checkpointer(args.workdir, max_to_keep=len(files)) as ckpt:
        for path in files:
            step = int(re.findall(r"\d+", os.path.basename(path))[0])
            params = _read_params(path)
            jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), params,
                         model.init_params)
            ema_path = path[:-len(".npz")] + "_ema.npz"
            state = train_lib.init_state(params, optimizer, args.seed).replace(
                step=np.int32(step),
                ema_params=_read_params(ema_path) if os.path.exists(ema_path) else params)
            metadata = {"config": config.to_dict(),
                        "signature": experiment.model_signature(config, params)}
            ckpt.save(step, state, metadata=metadata, force=True)
            print(f"saved step {step} from {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("data", "train", "import"))
    parser.add_argument("--dataset", required=True, choices=sorted(THEIR_NAMES))
    parser.add_argument("--family", required=True, choices=("csbm", "usbm", "qcsbm"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_seed", type=int, default=0, help="our config's data.seed")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--qcsbm", help="checkout of chen-hao-chao/qcsbm (train)")
    parser.add_argument("--updates", type=int, default=0, help="0: their n_iters")
    parser.add_argument("--save_every", type=int, default=100)
    parser.add_argument("--save_from", type=int, default=1500)
    parser.add_argument("--ema_decay", type=float, default=0.0,
                        help="train: also keep an EMA of their weights with this decay")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (train); on a shared 2-core machine one thread "
                             "ran a QCSBM step 3x faster than two")
    args = parser.parse_args()
    if args.command == "train" and not args.qcsbm:
        parser.error("train needs --qcsbm")
    {"data": write_data, "train": train, "import": import_checkpoints}[args.command](args)


if __name__ == "__main__":
    main()
