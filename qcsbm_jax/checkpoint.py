"""Checkpoints you can trust: orbax CheckpointManager, verified contents, clear failures.

Layout: WORKDIR/checkpoints/<step>/{state, metadata}. `state` is the training pytree
(orbax StandardSave), `metadata` a JSON dict (the run's config and model signature, and an
optional NOTE for whoever restores it) plus an integrity record: a content checksum of
every array (checksums.py, computed on the devices that hold the arrays) and a digest of
the metadata itself. Every restore checks
them, so damaged data are never restored silently; steps written before the record
existed are restored with a warning that they are not verified.
A step that cannot be read or does not verify raises CorruptCheckpointError naming its
directory and what is wrong. restore_latest_valid of a writer (training) then falls back
to the newest step that verifies and moves the damaged ones to WORKDIR/damaged_checkpoints,
from which nothing is ever resumed; a read-only Checkpointer (evaluation, init_from)
refuses with the same message. Nothing is deleted.
A read-only Checkpointer restores parts of a stored state (e.g. only the parameters of
another run, for a fine-tune) without reading the rest.
Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it when complete, so
a killed save leaves no finalized step; such leftovers are ignored, never deleted here.
Typed PRNG keys are stored as their uint32 key data and re-wrapped with the dtype of the
restore target, so callers pass their state as-is. All I/O goes through the manager,
which coordinates processes itself; every process reaches the same verdict on a step.
"""

import json
import logging as std_logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from qcsbm_jax import checksums, read_failures

STATE = "state"
METADATA = "metadata"
RESTORED_FROM = "restored_from"  # Added to restored metadata: the step directory read.
# Optional metadata entry: what the checkpoint holds and how to use it, shown when it does
# not fit a restore (e.g. an import holding parameters only, restored to resume training).
NOTE = "note"
INTEGRITY = checksums.RECORD  # Reserved metadata key: checksums and digest (module doc).
DAMAGED_DIR = "damaged_checkpoints"  # WORKDIR/damaged_checkpoints/<step>: set aside.
_MAX_LISTED = 10
READ_ONLY_ADVICE = "Point at another run of this model (same network, family and data)."


class CheckpointError(Exception):
    """Base class of the errors this module raises."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was written by another model or does not fit the restore target."""


class CorruptCheckpointError(CheckpointError):
    """A finalized step directory is incomplete or damaged."""


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _unwrap_keys(tree: Any) -> Any:
    """Replaces typed PRNG keys by their uint32 key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _storage_target(abstract_state: Any) -> Any:
    """ShapeDtypeStructs (with the caller's shardings) of what is stored on disk."""
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        if _is_key(x):
            x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, abstract_state)


def _wrap_keys(restored: Any, abstract_state: Any) -> Any:
    """Turns key data back into typed keys wherever the target holds typed keys."""
    return jax.tree.map(
        lambda x, target: jax.random.wrap_key_data(x, dtype=target.dtype)
        if _is_key(target) else x, restored, abstract_state)


def _describe(tree: Any) -> dict[str, str]:
    """'path.to.leaf' -> 'dtype[shape]' for every array (or array metadata) leaf."""
    return {name: f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
            for name, leaf in ocp.tree.to_flat_dict(tree, sep=".").items()}


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Lines 'key: checkpoint X, current Y' for every differing (nested) dict entry."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [f"{prefix}: checkpoint {saved}, current {current}"]
    lines = []
    for key in sorted(saved.keys() | current.keys()):
        lines += _differences(saved.get(key, "missing"), current.get(key, "missing"),
                              f"{prefix}.{key}" if prefix else str(key))
    return lines


def _listing(lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED]
    more = len(lines) - len(shown)
    return "\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")


def _fresh_start_advice(checkpoints_dir: str) -> str:
    return (f"Use a fresh --workdir for this model, or delete {checkpoints_dir} to start "
            "this run from scratch.")


def move_aside_advice(step_dir: str) -> str:
    """What to do with an unreadable step: set it aside (not delete it: the read may have
    failed for another reason), which makes the previous step the newest."""
    return (f"Move {step_dir} out of {os.path.dirname(step_dir)} (keep it until you know "
            "it is damaged) to fall back to the previous step, then rerun.")


def _all_processes(ok: bool) -> bool:
    """Whether `ok` holds on every process of the job (a collective)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_compatible(saved_metadata: dict, current_metadata: dict,
                     advice: str | None = None) -> None:
    """Raises IncompatibleCheckpointError unless both model signatures agree.

    Only metadata['signature'] is compared (model, family, parameter shapes, ...); other
    config changes such as the learning rate are allowed when resuming. advice: what the
    message tells the user to do (default: start this run in a fresh workdir).
    """
    as_json = lambda m: json.loads(json.dumps(m.get("signature", "missing")))
    lines = _differences(as_json(saved_metadata), as_json(current_metadata), "signature")
    if lines:
        step_dir = saved_metadata.get(RESTORED_FROM, "WORKDIR/checkpoints/STEP")
        advice = advice or _fresh_start_advice(os.path.dirname(step_dir))
        raise IncompatibleCheckpointError(
            f"The checkpoint {step_dir} was written by a different model; its signature "
            f"differs in:{_listing(lines)}\n{advice}")


def _drop_read_only_notice(record: std_logging.LogRecord) -> bool:
    return "Given directory is read only" not in record.getMessage()


def _absolute(path: str) -> str:
    """A local path made absolute (orbax restores only from absolute paths); URLs as given."""
    return path if "://" in path else os.path.abspath(path)


class Checkpointer:
    """Saves and restores (state, metadata) under WORKDIR/checkpoints.

    Use as a context manager, or call close(): it waits for a pending async save, whose
    step is otherwise left unfinalized (and ignored) if the process exits first.

    read_only: for reading another run. Nothing is created or saved, and restore() takes
    a dict holding only some top-level entries of the stored state (e.g. {'params': ...,
    'ema_params': ...}); only those are read.
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.join(_absolute(os.fspath(workdir)), "checkpoints")
        self._read_only = read_only
        self._advice = (READ_ONLY_ADVICE if read_only
                        else _fresh_start_advice(self.directory))
        options = ocp.CheckpointManagerOptions(  # read-only: what orbax would set, unasked
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else save_interval_steps,
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
        # Both handlers read the same files; only the PyTree one restores a subtree.
        state_handler = (ocp.PyTreeCheckpointHandler() if read_only
                         else ocp.StandardCheckpointHandler())
        absl_logger = std_logging.getLogger("absl")
        absl_logger.addFilter(_drop_read_only_notice)  # orbax's notice of our own choice
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={STATE: state_handler, METADATA: ocp.JsonCheckpointHandler()})
        finally:
            absl_logger.removeFilter(_drop_read_only_notice)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def all_steps(self) -> list[int]:
        """Finalized steps, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, metadata: dict, force: bool = False) -> bool:
        """Starts saving; returns False when save_interval_steps skips this step (the
        first save into an empty directory always happens; force=True always saves).

        The arrays are checksummed on their devices and copied before this returns, so
        the caller may donate or delete them; with async_save the files are written in
        the background (see wait()). A collective: every process calls it.
        """
        if self._read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; nothing is saved.")
        if not (force or self._manager.should_save(step)):
            return False
        storage = _unwrap_keys(state)
        sealed = checksums.seal(metadata, storage)
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(storage),
                                     METADATA: ocp.args.JsonSave(sealed)})
        try:
            return self._manager.save(step, args=args, force=force)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(
                f"{self.step_dir(step)} already exists and is never overwritten. If it is "
                f"damaged: {move_aside_advice(self.step_dir(step))}") from e

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores `step` (default: the newest) onto the shapes, dtypes and shardings of
        `abstract_state` (ShapeDtypeStructs or arrays; read-only: a dict of some top-level
        entries, leaves without a sharding come back as NumPy arrays) and verifies the
        contents against the checksums saved with them. Returns (state, metadata), the
        metadata with RESTORED_FROM added. A collective: every process calls it.

        Raises IncompatibleCheckpointError if the stored tree does not match the target,
        CorruptCheckpointError if the step cannot be read or does not verify.
        """
        read_failures.ignore_noise_after_failed_reads()
        step = self._existing_step(step)
        target = _storage_target(abstract_state)
        problem, cause = None, None
        try:
            self._check_fits(step, target)
            restored = self._manager.restore(step, args=self._restore_args(target))
            metadata = restored[METADATA]
            if not isinstance(metadata, dict):
                raise ValueError(f"{METADATA}/{METADATA} holds no JSON object")
        except Exception as error:  # pylint: disable=broad-except; read_problem re-raises
            problem, cause = read_failures.read_problem(error)
        if not _all_processes(problem is None):
            raise self._corrupt(step, problem or "another process of the job could not "
                                "read it (see its log)") from cause
        metadata = dict(metadata)
        problem = checksums.verify(metadata, restored[STATE], self.step_dir(step))
        if problem:
            raise self._corrupt(step, problem)
        metadata[RESTORED_FROM] = self.step_dir(step)
        return _wrap_keys(restored[STATE], abstract_state), metadata

    def restore_latest_valid(self, abstract_state: Any) -> tuple[Any, dict]:
        """restore() of the newest step that verifies.

        Training (a writable Checkpointer) falls back past damaged steps, warning about
        each, and moves them to WORKDIR/damaged_checkpoints once an older step verifies
        (if none does, nothing is moved and CorruptCheckpointError lists them). A
        read-only Checkpointer restores the newest step or raises its error: evaluating
        or fine-tuning an older step than the newest is left to the user.
        """
        steps = self._existing_steps()
        if self._read_only:
            return self.restore(abstract_state, steps[-1])
        damaged = []
        for step in reversed(steps):
            try:
                result = self.restore(abstract_state, step)
            except CorruptCheckpointError as e:
                logging.warning("%s", e)
                damaged.append(step)
                continue
            for bad in damaged:
                logging.warning("Set aside the damaged step %d as %s; it is never resumed "
                                "from.", bad, self._set_aside(bad))
            if damaged:
                logging.warning("Falling back to step %d, the newest checkpoint in %s that "
                                "verifies.", step, self.directory)
            return result
        raise CorruptCheckpointError(
            f"No checkpoint in {self.directory} can be restored (steps {steps}; what is "
            f"wrong with each is in the warnings above); nothing was moved. {self._advice}")

    def metadata(self, step: int | None = None) -> dict:
        """The metadata of `step` (default: the newest), with RESTORED_FROM added; the
        state is not read."""
        step = self._existing_step(step)
        args = ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()})
        try:
            metadata = dict(self._manager.restore(step, args=args)[METADATA])
        except read_failures.READ_ERRORS as e:
            raise self._corrupt(step, e) from e
        metadata[RESTORED_FROM] = self.step_dir(step)
        return metadata

    def wait(self) -> None:
        """Blocks until pending async saves are finalized."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.close()

    def _existing_steps(self) -> list[int]:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"No checkpoint in {self.directory}. Train first (--mode train), or point "
                "--workdir at a trained run.")
        return steps

    def _existing_step(self, step: int | None) -> int:
        steps = self._existing_steps()
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; it has {steps}.")
        return step

    def _restore_args(self, target: Any) -> ocp.args.Composite:
        if self._read_only:
            state_args = ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)
        else:
            state_args = ocp.args.StandardRestore(target)
        return ocp.args.Composite(**{STATE: state_args, METADATA: ocp.args.JsonRestore()})

    def _check_fits(self, step: int, target: Any) -> None:
        """Compares the stored tree's paths, shapes and dtypes with the target's (orbax
        would silently cast dtypes, and its errors do not tell damage from mismatch)."""
        stored = self._manager.item_metadata(step)[STATE]
        if stored is None:
            raise FileNotFoundError(f"{STATE}/_METADATA is missing or unreadable")
        stored = stored.tree
        if self._read_only:
            stored = {key: value for key, value in stored.items() if key in target}
        lines = _differences(_describe(stored), _describe(target))
        if lines:
            advice = (self._note(step) or
                      f"It was probably written by another model or config. {self._advice}")
            raise IncompatibleCheckpointError(
                f"The checkpoint {self.step_dir(step)} does not fit the state being "
                f"restored ({len(lines)} differences):{_listing(lines)}\n{advice}")

    def _note(self, step: int) -> str | None:
        try:
            return self.metadata(step).get(NOTE)
        except CheckpointError:
            return None

    def _corrupt(self, step: int, problem: str) -> CorruptCheckpointError:
        step_dir = self.step_dir(step)
        return CorruptCheckpointError(
            f"The checkpoint {step_dir} is damaged or incomplete: {problem}. Training on "
            f"this workdir sets it aside (in {self._damaged_dir()}) and resumes from the "
            f"newest step that verifies. {move_aside_advice(step_dir)}")

    def _damaged_dir(self) -> str:
        return os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)

    def _set_aside(self, step: int) -> str:
        """Moves a damaged step to WORKDIR/damaged_checkpoints/<step>[.n] (process 0, the
        others wait); returns the new path."""
        names = [str(step)] + [f"{step}.{n}" for n in range(2, 1000)]
        aside = epath.Path(self._damaged_dir())
        _sync(f"before setting aside step {step}")
        destination = next(aside / name for name in names if not (aside / name).exists())
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            epath.Path(self.step_dir(step)).rename(destination)
        _sync(f"set aside step {step}")
        self._manager.reload()
        return os.fspath(destination)
