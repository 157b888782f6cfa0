"""One run per workdir: an exclusive `fcntl` lock on <workdir>/run.lock, held while training.

The kernel releases the lock when its holder exits, however it exits (a crash or SIGKILL
included), so a lock is never stale; the file's text (pid, host, start time) only names the
holder in the error a second run gets. A multi-process run takes it on process 0 only.
A gs:// workdir has no fcntl: there `workdir_io.ObjectLock` creates <workdir>/run.lock only if
it is absent (GCS's create-only precondition), and a run killed without warning leaves it behind
(the error says how to delete it).
"""

import datetime
import fcntl
import json
import os
import socket

from score_jax import workdir_io
from score_jax.errors import WorkdirError

LOCK_FILE = "run.lock"


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir's lock; WorkdirError if another run has it."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.enabled = enabled
        self.fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot create the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirError(
                f"workdir {os.path.dirname(self.path)!r} is in use by another run ({holder}); "
                "wait for it to finish, stop it, or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays, naming the last holder
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def workdir_lock(workdir: str, enabled: bool = True):
    """The workdir's lock as a context manager: WorkdirLock locally, ObjectLock on gs://."""
    if enabled and workdir_io.is_remote(workdir):
        return workdir_io.ObjectLock(workdir_io.join(workdir, LOCK_FILE))
    return WorkdirLock(workdir, enabled)
