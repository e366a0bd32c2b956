"""What the content checksums of checkpoints cost (docs/benchmarks.md, "Checkpoint
checksums"): saving and restoring a real train state with and without them.

  python -m benchmarks.checkpoint_cost --models toy,ncsnpp_small --devices 1 --rounds 5

The state is train.init_state of the model's config (parameters, EMA, Adam moments, key),
replicated over a data-parallel mesh of --devices devices, as training holds it. Each
round saves and restores it once with checksums and once without (checksums.seal and
checksums.verify replaced by no-ops), side by side, so machine load hits both alike.
Columns: checksum_compile_s, the first checksum of the state (compiling one small program
per distinct array shape; once per process); checksum_ms, the checksums of the whole
state, the work a save and a restore each add (median over rounds, minimum in
parentheses); save_block_ms, how long save() blocks the training loop (async save: the
checksums, then the copy to the host); save_ms, until the step is on disk; restore_ms, a
full restore (verified, with checksums); "with vs without", minima over rounds, the
least disturbed by other load on the machine; checksum_of_save and checksum_of_restore,
the minimal checksum time over the minimal save or restore time without checksums.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile

MODELS = ("toy", "ncsnpp_small")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_cost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="toy,ncsnpp_small",
                        help=f"comma-separated, from {MODELS}")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices of the data-parallel mesh (virtual ones on CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _without_checksums():
    """checksums.seal / verify as no-ops: what saving and restoring cost before them."""
    from qcsbm_jax import checksums  # pylint: disable=import-outside-toplevel
    seal, verify = checksums.seal, checksums.verify
    checksums.seal = lambda metadata, tree: json.loads(json.dumps(metadata))
    checksums.verify = lambda metadata, tree, where: None
    try:
        yield
    finally:
        checksums.seal, checksums.verify = seal, verify


def measure(model: str, devices: int, rounds: int) -> dict:
    # pylint: disable=import-outside-toplevel
    import jax
    from benchmarks import common
    from qcsbm_jax import checkpoint, checksums, experiment, parallel, train
    config = common.MODELS[model].config()
    mesh = parallel.make_mesh(devices, 1, jax.devices()[:devices])
    built = experiment.build_score_model(config)
    init = lambda p: train.init_state(p, train.make_optimizer(config.optim), 0)
    sharding = parallel.state_sharding(mesh, jax.eval_shape(init, built.init_params))
    state = jax.block_until_ready(jax.jit(init, out_shardings=sharding)(built.init_params))
    storage = checkpoint._unwrap_keys(state)  # pylint: disable=protected-access
    leaves = jax.tree.leaves(storage)
    compile_s = common.seconds(lambda: checksums.tree_checksums(storage))
    metadata = {"config": config.to_dict()}
    times = {k: [] for k in ("checksum", "block", "save", "restore", "block_plain",
                             "save_plain", "restore_plain")}
    with tempfile.TemporaryDirectory() as root:
        for step in range(rounds + 1):  # Round 0 warms up (orbax and the restore's jit).
            for suffix, context in (("", contextlib.nullcontext), ("_plain",
                                                                   _without_checksums)):
                with context(), checkpoint.Checkpointer(os.path.join(root, f"run{suffix}"),
                                                        max_to_keep=2) as ckpt:
                    block = common.seconds(lambda: ckpt.save(step, state, metadata=metadata))
                    save = block + common.seconds(ckpt.wait)
                    restore = common.seconds(lambda: ckpt.restore(state, step))
                if step:
                    times["block" + suffix].append(block)
                    times["save" + suffix].append(save)
                    times["restore" + suffix].append(restore)
            if step:
                times["checksum"].append(common.seconds(lambda: checksums.tree_checksums(storage)))
    low = {k: 1e3 * min(v) for k, v in times.items()}
    return dict(
        model=model, devices=devices, backend=jax.default_backend(), arrays=len(leaves),
        state_mb=round(sum(x.nbytes for x in leaves) / 2**20, 2),
        checksum_compile_s=round(compile_s, 2),
        checksum_ms=f"{1e3 * statistics.median(times['checksum']):.1f} ({low['checksum']:.1f})",
        save_block_ms=f"{low['block']:.0f} vs {low['block_plain']:.0f}",
        save_ms=f"{low['save']:.0f} vs {low['save_plain']:.0f}",
        restore_ms=f"{low['restore']:.0f} vs {low['restore_plain']:.0f}",
        checksum_of_save=f"{low['checksum'] / low['save_plain']:.1%}",
        checksum_of_restore=f"{low['checksum'] / low['restore_plain']:.1%}",
        rounds={k: [round(1e3 * t, 1) for t in v] for k, v in times.items()},
        load_average=[round(x, 1) for x in os.getloadavg()])


COLUMNS = ("model", "devices", "backend", "arrays", "state_mb", "checksum_compile_s",
           "checksum_ms", "save_block_ms", "save_ms", "restore_ms", "checksum_of_save",
           "checksum_of_restore", "load_average")


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(args.devices))
    rows = [measure(model, args.devices, args.rounds) for model in args.models.split(",")]
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    if args.json:
        from benchmarks import common  # pylint: disable=import-outside-toplevel
        common.write_json(args.json, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
