"""One writer per workdir: the lock a training holds on WORKDIR/training.lock.

The lock file is a JSON record of its holder (host, pid, the process's start time and the
host's boot id, command line, when it was taken and last refreshed). It is created
exclusively (O_EXCL; on gs:// and other URLs a check-then-write, which leaves a window
of a few milliseconds), refreshed every HEARTBEAT_S seconds by a daemon thread, and
removed on exit, SIGTERM and errors included. A lock whose holder is known to be gone is
taken over with a warning:
  same host      the pid no longer runs the process that wrote the lock (kill -9, crash);
  another host   the lock was not refreshed for STALE_AFTER_S seconds (a lost node).
Otherwise a second writer is refused with WorkdirLockedError naming the holder. In a
multi-process job only process 0 takes the lock, and every process gets its outcome.
Readers (evaluation, eval.watch, training.init_from) never take it.
"""

import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = "training.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_MAX_MESSAGE_BYTES = 4096  # Refusals are shorter; they travel to every process as bytes.


class WorkdirLockedError(RuntimeError):
    """Another training holds the workdir."""


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _is_running(holder: dict) -> bool:
    """Whether the process a lock record of this host names still runs."""
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # It exists, under another user.
    started = _start_ticks(int(holder["pid"]))
    return not (started and holder.get("start") and started != holder["start"])


def _stale_reason(holder: dict | None, age_s: float) -> str | None:
    """Why the holder of a lock is gone, or None if it may still be running."""
    if holder is None:
        return (f"its record is unreadable and {age_s:.0f} s old" if age_s > STALE_AFTER_S
                else None)
    if holder.get("host") == socket.gethostname():
        return None if _is_running(holder) else (
            f"process {holder.get('pid')} that took it no longer runs on this host")
    if age_s > STALE_AFTER_S:
        return f"it was last refreshed {age_s:.0f} s ago (more than {STALE_AFTER_S:.0f} s)"
    return None


def _write(path: epath.Path, text: str) -> None:
    """Replaces the file's content at once (readers never see it half written)."""
    if "://" in os.fspath(path):
        path.write_text(text)
        return
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def _create_exclusive(path: epath.Path, text: str) -> bool:
    """Creates the file with `text` unless it exists; returns whether it did."""
    if "://" in os.fspath(path):
        if path.exists():
            return False
        path.write_text(text)
        return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def _read(path: epath.Path) -> tuple[str, dict | None]:
    """(raw text, the record or None if it is not one); FileNotFoundError if gone."""
    text = path.read_text()
    try:
        record = json.loads(text)
    except ValueError:
        return text, None
    return text, record if isinstance(record, dict) and "pid" in record else None


def _age_s(path: epath.Path, holder: dict | None) -> float:
    refreshed = holder.get("refreshed") if holder else None
    if refreshed is None:
        refreshed = path.stat().mtime
    return max(0.0, time.time() - float(refreshed))


def _describe(holder: dict | None, age_s: float) -> str:
    if holder is None:
        return f"an unreadable lock record, last written {age_s:.0f} s ago"
    return (f"process {holder.get('pid')} on host {holder.get('host')} (`{holder.get('command')}`,"
            f" since {holder.get('since')}; lock refreshed {age_s:.0f} s ago)")


def _same_outcome(message: str | None) -> str | None:
    """Process 0's message (None: success), on every process of the job."""
    if jax.process_count() == 1:
        return message
    data = np.zeros(_MAX_MESSAGE_BYTES, np.uint8)
    if jax.process_index() == 0 and message:
        encoded = message.encode()[:_MAX_MESSAGE_BYTES]
        data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    text = bytes(multihost_utils.broadcast_one_to_all(data)).rstrip(b"\0").decode(
        errors="replace")
    return text or None


class WorkdirLock:
    """Context manager holding WORKDIR/training.lock (module doc); raises
    WorkdirLockedError on entry if another live training holds it."""

    def __init__(self, workdir: str):
        self.workdir = os.fspath(workdir)
        self.path = epath.Path(self.workdir) / LOCK_FILE
        self._record = None
        self._stop = threading.Event()
        self._heartbeat = None

    def __enter__(self) -> "WorkdirLock":
        refusal = self._acquire() if jax.process_index() == 0 else None
        refusal = _same_outcome(refusal)
        if refusal:
            raise WorkdirLockedError(refusal)
        if self._record is not None:
            self._heartbeat = threading.Thread(target=self._refresh, daemon=True,
                                               name="workdir-lock-heartbeat")
            self._heartbeat.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._record is not None and self._still_mine():
            self.path.unlink(missing_ok=True)
        self._record = None

    def _acquire(self) -> str | None:
        """Takes the lock; returns None, or the refusal naming the holder."""
        now = time.time()
        record = dict(host=socket.gethostname(), pid=os.getpid(), start=_start_ticks(os.getpid()),
                      boot_id=_boot_id(), command=" ".join(sys.argv)[:300],
                      since=time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
                      refreshed=now, token=uuid.uuid4().hex)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # Tries again after taking over a stale lock.
            if _create_exclusive(self.path, json.dumps(record)):
                self._record = record
                return None
            try:
                text, holder = _read(self.path)
                age = _age_s(self.path, holder)
            except FileNotFoundError:
                continue  # Released meanwhile.
            reason = _stale_reason(holder, age)
            if reason is None:
                return (f"{self.workdir} is in use by another training: {self.path} names "
                        f"{_describe(holder, age)}. Wait for it to finish or use another "
                        f"--workdir; if that process is gone, delete {self.path} and rerun.")
            logging.warning("Taking over the lock %s left by %s: %s.", self.path,
                            _describe(holder, age), reason)
            try:
                if self.path.read_text() == text:  # Not taken by someone else meanwhile.
                    self.path.unlink()
            except FileNotFoundError:
                pass
        return f"Could not take the lock {self.path}: other processes keep taking it."

    def _still_mine(self) -> bool:
        try:
            _, holder = _read(self.path)
        except FileNotFoundError:
            return False
        return bool(holder) and holder.get("token") == self._record["token"]

    def _refresh(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._still_mine():
                    logging.error("The lock %s is no longer this training's (deleted or taken "
                                  "over); another writer may be using %s.", self.path,
                                  self.workdir)
                    return
                self._record["refreshed"] = time.time()
                _write(self.path, json.dumps(self._record))
            except OSError as error:
                logging.warning("Could not refresh the lock %s: %s", self.path, error)
