"""Fault injection: every kind of file of a saved step (array data, manifest, metadata,
sharding, commit marker) flipped, truncated or deleted; a run never resumes from damaged
data. A restore either returns exactly what was saved for the step it names, or (a
writer) sets the damaged step aside and falls back to the newest step that verifies, or
(read-only: evaluation, init_from) refuses with CorruptCheckpointError.

`python tests/test_checkpoint_faults.py` runs the whole campaign (every file of a step,
every damage) and prints the table of docs/robustness.md.
"""

import collections
import glob
import logging
import os
import shutil
import sys

if __name__ == "__main__":  # The tests' set-up: this repository, eight CPU devices.
    sys.path[:1] = [os.path.dirname(os.path.abspath(__file__)),
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    import conftest  # noqa: F401

import jax
import numpy as np
import pytest

from qcsbm_jax import checkpoint, train
from test_train import _smoke

# Kinds of file of a step directory, by path relative to it (glob patterns), the main
# file of each kind first.
KINDS = {
    "array data": ("state/ocdbt.process_*/d/*", "state/d/*"),
    "manifest": ("state/manifest.ocdbt", "state/ocdbt.process_*/manifest.ocdbt"),
    "metadata": ("metadata/metadata", "state/_METADATA", "_CHECKPOINT_METADATA",
                 "state/array_metadatas/process_*"),
    "sharding": ("state/_sharding",),
    "commit marker": ("commit_success.txt", "state/commit_success.txt",
                      "metadata/commit_success.txt"),
}
DAMAGES = ("flip", "truncate", "delete")


def step_files(step_dir: str, representative: bool = False) -> list[tuple[str, str]]:
    """(kind, path relative to step_dir) of the step's files; representative: per pattern
    only the largest file (the one most likely to hold an array)."""
    found = []
    for kind, patterns in KINDS.items():
        for pattern in patterns:
            paths = sorted(glob.glob(os.path.join(step_dir, pattern)), key=os.path.getsize)
            for path in paths[-1:] if representative else paths:
                found.append((kind, os.path.relpath(path, step_dir)))
    return found


def damage(path: str, how: str) -> None:
    """flip: inverts 64 bytes in the middle; truncate: keeps the first third; delete."""
    if how == "delete":
        os.remove(path)
        return
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if how == "flip":
        middle = slice(len(data) // 2, len(data) // 2 + 64)
        data[middle] = bytes(b ^ 0xFF for b in data[middle])
    else:
        data = data[:len(data) // 3]
    with open(path, "wb") as f:
        f.write(bytes(data))


def same(a, b) -> bool:
    leaves = lambda t: jax.tree.leaves(checkpoint._unwrap_keys(t))
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(leaves(a), leaves(b), strict=True))


def outcome(workdir: str, saved: dict, target) -> str:
    """What a training and an evaluation do with the damaged step 4 of `workdir`
    (steps 2 and 4, whose saved states are saved[2] and saved[4]); raises AssertionError
    if either restores anything but what was saved for the step it names."""
    parts = {"params": target.params, "ema_params": target.ema_params}
    try:
        with checkpoint.Checkpointer(workdir, read_only=True) as ckpt:
            restored, _ = ckpt.restore_latest_valid(parts)
        assert same(restored, {"params": saved[4].params, "ema_params": saved[4].ema_params})
        evaluation = "reads step 4"
    except checkpoint.CorruptCheckpointError as error:
        assert "/checkpoints/4 is damaged or incomplete: " in str(error)
        evaluation = "refuses"
    with checkpoint.Checkpointer(workdir) as ckpt:
        state, metadata = ckpt.restore_latest_valid(target)
        step = int(state.step)
        assert metadata[checkpoint.RESTORED_FROM].endswith(f"/checkpoints/{step}")
        assert same(state, saved[step]), f"restored step {step} differs from what was saved"
    aside = os.path.isdir(os.path.join(workdir, checkpoint.DAMAGED_DIR, "4"))
    assert aside == (step == 2)
    training = "resumes from step 4" if step == 4 else "sets step 4 aside, resumes from 2"
    return f"training {training}; evaluation {evaluation}"


# Orbax keeps the data of small arrays in the step's root database (state/d) and those of
# large ones in per-process files (state/ocdbt.process_<i>/d), as for image models.
WIDE = (256, 256)  # Toy MLP widths whose kernels (256 KiB) are large in that sense.


def train_toy_run(workdir: str, widths: tuple[int, ...] = WIDE):
    """(config, workdir, {step: saved state}) of a toy run with steps 2 and 4."""
    config = _smoke("usbm", **{"training.num_steps": 4, "training.checkpoint_every": 2,
                               "model.widths": widths})
    final = train.train(config, workdir)
    with checkpoint.Checkpointer(workdir) as ckpt:
        saved = {step: ckpt.restore(final, step)[0] for step in (2, 4)}
    assert same(saved[4], final)
    return config, workdir, saved


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_toy_run(str(tmp_path_factory.mktemp("faults") / "run"))


def _copy(workdir: str, tmp_path) -> str:
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    return copy


# Every damage of the main file of each kind by default; of the other files in slow runs.
CASES = [pytest.param(kind, pattern, how, marks=[pytest.mark.slow] if pattern != patterns[0]
                      else []) for kind, patterns in KINDS.items() for pattern in patterns
         for how in DAMAGES]


@pytest.mark.parametrize("kind,pattern,how", CASES)
def test_damaged_file_is_never_resumed_from(trained, tmp_path, kind, pattern, how):
    _, workdir, saved = trained
    copy = _copy(workdir, tmp_path)
    step_dir = os.path.join(copy, "checkpoints", "4")
    paths = sorted(glob.glob(os.path.join(step_dir, pattern)), key=os.path.getsize)
    assert paths, f"no {kind} file {pattern} in a step"
    damage(paths[-1], how)
    result = outcome(copy, saved, saved[4])
    if pattern in ("state/ocdbt.process_*/d/*", "state/manifest.ocdbt", "metadata/metadata"):
        assert "sets step 4 aside" in result  # Files that every restore reads.


def test_training_falls_back_bit_for_bit_past_flipped_array_data(trained, tmp_path, caplog):
    """The defect that started this: flipped bytes in the largest array file were resumed
    from silently. Now the run resumes from step 2 and ends exactly where it ended."""
    config, workdir, saved = trained
    copy = _copy(workdir, tmp_path)
    step_dir = os.path.join(copy, "checkpoints", "4")
    damage(max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True),
               key=os.path.getsize), "flip")
    with caplog.at_level(logging.INFO):
        final = train.train(config, copy)
    assert same(final, saved[4])
    assert f"{step_dir} is damaged or incomplete" in caplog.text
    assert "Falling back to step 2" in caplog.text and "Resumed from step 2" in caplog.text
    assert os.listdir(os.path.join(copy, checkpoint.DAMAGED_DIR)) == ["4"]


def test_nan_right_after_resume_suspects_the_checkpoint(trained, tmp_path):
    """A checkpoint that verifies yet holds NaN (damaged before it was saved, or written
    without checksums): the error names it, not only the learning rate."""
    config, workdir, saved = trained
    copy = _copy(workdir, tmp_path)
    nan = saved[4].replace(step=saved[4].step + 1,
                           params=jax.tree.map(lambda p: p * np.nan, saved[4].params))
    with checkpoint.Checkpointer(copy) as ckpt:
        _, metadata = ckpt.restore(saved[4])
        metadata.pop(checkpoint.RESTORED_FROM)
        ckpt.save(5, nan, metadata=metadata)
    config = _smoke("usbm", **{"training.num_steps": 8, "training.log_every": 2,
                               "model.widths": WIDE})
    with pytest.raises(FloatingPointError) as error:
        train.train(config, copy)
    message = str(error.value)
    assert f"right after resuming from {copy}/checkpoints/5" in message
    assert "the checkpoint may be damaged" in message and "learning_rate" in message


def campaign(widths: tuple[int, ...]) -> list[tuple[str, str, str, str, int]]:
    """(kind, file, damage, outcome, file size) for every file of step 4 of a toy run
    and every damage."""
    import tempfile  # pylint: disable=import-outside-toplevel
    root = tempfile.mkdtemp()
    _, workdir, saved = train_toy_run(os.path.join(root, "run"), widths)
    step_dir = os.path.join(workdir, "checkpoints", "4")
    rows = []
    for kind, relative in step_files(step_dir):
        for how in DAMAGES:
            copy = os.path.join(root, f"case{len(rows)}")
            shutil.copytree(workdir, copy)
            damage(os.path.join(copy, "checkpoints", "4", relative), how)
            try:
                result = outcome(copy, saved, saved[4])
            except Exception as error:  # pylint: disable=broad-except; must never happen
                result = f"FAILED: {type(error).__name__}: {error}"
            rows.append((kind, relative, how, result,
                         os.path.getsize(os.path.join(step_dir, relative))))
            shutil.rmtree(copy)
    shutil.rmtree(root)
    return rows


if __name__ == "__main__":
    total = collections.Counter()
    for widths in [(32, 32), WIDE]:
        results = campaign(widths)
        print(f"\n## toy MLP, widths {widths}\n\n| kind | file (bytes) | damage | outcome |"
              "\n|---|---|---|---|")
        for kind, relative, how, result, size in results:
            print(f"| {kind} | {relative} ({size}) | {how} | {result} |")
        counts = collections.Counter(row[3] for row in results)
        total.update(counts)
        print(f"\n{len(results)} faults tried:")
        for result, count in counts.most_common():
            print(f"- {count}: {result}")
    print(f"\nBoth: {sum(total.values())} faults tried: " +
          "; ".join(f"{count} {result}" for result, count in total.most_common()))
