"""Command line of the PyTorch checkpoint converter.

  python -m qcsbm_jax.convert CHECKPOINT.pth --config CONFIG --workdir DIR
      [--config.a.b=value ...]
      imports an official NCSN++ / DDPM++ checkpoint for the network of CONFIG (with its
      overrides) into DIR/checkpoints; then --mode eval / sample on DIR, or
      --config.training.init_from=DIR for a fine-tune in another workdir.
  python -m qcsbm_jax.convert --to pytorch WORKDIR OUT.pth
      exports WORKDIR's newest checkpoint (its config comes from its metadata).

A checkpoint that cannot be converted gives one message saying why and what to do, exit
status 1, and nothing written.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config of the network to import into (not needed for --to pytorch).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir to import into (a new one).")
_TO = flags.DEFINE_enum("to", "jax", ["jax", "pytorch"],
                        "jax: import a PyTorch checkpoint; pytorch: export a workdir.")


def main(argv):
    from qcsbm_jax import checkpoint, torch_io  # after flag parsing: --help stays instant
    from qcsbm_jax.convert import ConvertError, export_checkpoint, import_checkpoint

    arguments = argv[1:]
    logging.set_verbosity(logging.WARNING)  # orbax reports every step of a save
    try:
        if _TO.value == "pytorch":
            if len(arguments) != 2 or _CONFIG.value is not None:
                raise app.UsageError("--to pytorch takes WORKDIR OUT.pth and no --config.")
            result = export_checkpoint(*arguments)
            print(f"Wrote step {result['step']} ({result['tensors']} tensors) to "
                  f"{result['out']}.")
            return
        if len(arguments) != 1 or _CONFIG.value is None or not _WORKDIR.value:
            raise app.UsageError("Importing takes CHECKPOINT.pth, --config and --workdir.")
        metadata = import_checkpoint(arguments[0], _CONFIG.value, _WORKDIR.value)
        print(metadata[checkpoint.NOTE])
    except (ConvertError, torch_io.TorchFileError, FileNotFoundError,
            checkpoint.CheckpointError) as error:
        raise SystemExit(f"Not converted: {error}") from None


def run():
    app.run(main)


if __name__ == "__main__":
    run()
