"""Command line: python -m qcsbm_jax.main --config CONFIG --workdir DIR --mode MODE.

Modes: train (resumes from DIR when it holds checkpoints), eval (writes
DIR/eval/metrics.json and plots), sample (writes DIR/samples/samples.npz and a PNG), and
all (train, then eval, then sample). Any config value can be overridden with
--config.a.b=value; an unknown key is an error that lists the valid ones.
"""

import importlib.util
import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/toy/gaussians8_qcsbm.py[:smoke].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample", "all"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietCheckpointing(std_logging.Filter):
    """Drops orbax's per-save INFO chatter; its warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietCheckpointing())
    # Imported here so that `--help` and flag errors are instant.
    from qcsbm_jax import config as config_lib, evaluate, train

    config = _CONFIG.value
    config_lib.validate(config)
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    mode = _MODE.value
    if mode in ("train", "all"):
        train.train(config, workdir)
    if mode in ("eval", "all"):
        metrics = evaluate.evaluate(config, workdir)
        logging.info("Metrics: %s", metrics)
    if mode in ("sample", "all"):
        path = evaluate.sample(config, workdir)
        logging.info("Samples written to %s", path)


def _load_config_file(spec: str):
    """Loads 'path/to/config.py[:variant]' the way --config does."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_qcsbm_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _unknown_override_message(argv: list[str]) -> str | None:
    """Names the first --config.a.b override whose key does not exist, with valid keys."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv:
        spec = argv[argv.index("--config") + 1]
    if spec is None:
        return None
    config = _load_config_file(spec)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, parts = config, arg[len("--config."):].split("=", 1)[0].split(".")
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(parts[:depth]) or "the top level"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return (f"Unknown config key --config.{'.'.join(parts)}: {part!r} does not "
                        f"exist under {where}. Valid keys there: {valid}.")
            node = node[part]
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one clear message for a misspelt --config.* key."""
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as error:
        message = _unknown_override_message(argv)
        raise SystemExit(message or f"Bad command-line flag: {error}") from None


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
