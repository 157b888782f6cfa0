"""The workdir's file I/O, for local paths and `gs://` (any etils `epath`) paths alike.

Everything a run writes or reads in its workdir (config.json, metrics.jsonl, TensorBoard, results,
exports, the lock) goes through these functions; orbax takes the same `epath.Path` for checkpoints.
A local path is made absolute; a path with a scheme (`gs://bucket/run`) is remote. Remote reads and
writes go through etils (gcsfs for `gs://`; tf.io.gfile instead where TensorFlow is installed);
uploads, the lock and the listing-cache handling use gcsfs directly (`pip install -e ".[gcs]"`).

What an object store lacks, and what this module does instead:
- No rename: `write_*_atomic` write a remote object directly. One object write is already atomic
  on GCS (a reader sees the old object or the new one, never part of it: the one-request and the
  resumable uploads both become visible only when complete). Locally they write a temporary file
  beside the target and `os.replace` it.
- No append: `MetricsLog` keeps a remote log's lines in memory and rewrites the object.
- No advisory locks (fcntl): `ObjectLock` is an object created only if absent (GCS's
  `ifGenerationMatch=0` precondition), deleted on release.
- gcsfs caches directory listings per process and never expires them, so objects written by
  another process (another host, orbax's tensorstore, tensorboardX's client) stay invisible to
  `exists` and listings; every read here drops the cached listings of its path first.
- A storage endpoint that dies leaves each client retrying (gcsfs, tensorstore, and
  google-cloud-storage for 120 s per call, in background threads too), so a run would hang.
  `StorageWatchdog` (armed by `python -m score_jax.main` for a remote workdir) bounds it: every
  storage call of the run is a `storage_call`; one that has not returned after
  `--storage_timeout_s` ends the process at once with one line naming the path; once a storage
  error leaves the run (or at SIGTERM) the process has `min(30 s, timeout)` left to exit.
"""

import contextlib
import errno
import functools
import hashlib
import json
import logging as logging_
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from etils import epath

from score_jax.errors import ScoreError, WorkdirError, one_line

PathLike = str | os.PathLike
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK = 1 << 20


class StorageWatchdog:
    """Bounds how long a run with a remote workdir waits for its storage (module doc).

    `storage_call(what)` contexts (nestable; the outermost counts) set a deadline of
    `timeout_s`; a daemon thread prints `score_jax: error: <message>` and `os._exit(1)`s when a
    deadline passes. `shutdown(reason)` (after a storage error, at SIGTERM) sets one final
    deadline, `grace_s` from now, that no later call extends.
    """

    def __init__(self, workdir: str, timeout_s: float, grace_s: float = 30.0):
        self.workdir = workdir
        self.timeout_s = float(timeout_s)
        self.grace_s = min(float(grace_s), self.timeout_s)
        # Reentrant: the SIGTERM handler (sigterm_received) may run while the main thread holds it.
        self._lock = threading.RLock()
        self._depth = 0
        self._what = ""
        self._deadline: float | None = None
        self._final: tuple[float, str, float] | None = None  # (deadline, reason, seconds)
        self.reported = False  # main printed its own error line: the watchdog stays silent
        self._thread = threading.Thread(target=self._watch, name="storage-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def call(self, what: str) -> Iterator[None]:
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self._what, self._deadline = what, time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._deadline = None

    def shutdown(self, reason: str, seconds: float | None = None) -> None:
        """From now on the process has `seconds` (default `grace_s`) left to exit."""
        seconds = self.grace_s if seconds is None else seconds
        with self._lock:
            if self._final is None:
                self._final = (time.monotonic() + seconds, reason, seconds)

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            with self._lock:
                hung = self._deadline is not None and now > self._deadline
                final = self._final is not None and now > self._final[0]
                what = self._what
            if hung:
                message = (
                    f"storage of workdir {self.workdir} did not answer within "
                    f"{self.timeout_s:g} s (--storage_timeout_s) while {what}; the run stopped: "
                    "its last complete checkpoint is kept, run the same command again once the "
                    "storage is back"
                )
            elif final:
                _, reason, seconds = self._final
                message = (
                    f"the run did not stop within {seconds:g} s after {reason} (workdir "
                    f"{self.workdir}, --storage_timeout_s); stopped it: its last complete "
                    "checkpoint is kept"
                )
            else:
                continue
            if not self.reported:
                sys.stderr.write(f"score_jax: error: {message}\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)


_WATCHDOG: StorageWatchdog | None = None


def arm_storage_watchdog(workdir: str, timeout_s: float) -> StorageWatchdog | None:
    """Starts the process's StorageWatchdog for a remote `workdir` (None for a local one)."""
    global _WATCHDOG
    if is_remote(workdir) and _WATCHDOG is None:
        _WATCHDOG = StorageWatchdog(workdir, timeout_s)
    return _WATCHDOG


def shutdown_within_grace(reason: str, seconds: float | None = None) -> None:
    """The process is on its way out (a storage error left the run, SIGTERM): with a watchdog,
    it gets `seconds` (default its `grace_s`) more, then ends (nothing remote can hang its exit
    for longer)."""
    if _WATCHDOG is not None:
        _WATCHDOG.shutdown(reason, seconds)


def sigterm_received() -> None:
    """SIGTERM: the run saves a checkpoint and stops; with a watchdog it has `timeout_s` left."""
    if _WATCHDOG is not None:
        _WATCHDOG.shutdown("SIGTERM", _WATCHDOG.timeout_s)


def mark_reported() -> None:
    """The error line was printed: a watchdog that ends the process later prints nothing."""
    if _WATCHDOG is not None:
        _WATCHDOG.reported = True


@contextlib.contextmanager
def storage_call(what: str, path: "PathLike | None" = None) -> Iterator[None]:
    """Marks a call that talks to the storage (module doc); a no-op without a watchdog or for a
    local `path`."""
    if _WATCHDOG is None or (path is not None and not is_remote(path)):
        yield
        return
    with _WATCHDOG.call(what):
        yield


# Exceptions of a path or call that a working store answers (control flow here and in callers).
_NOT_STORAGE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def is_storage_error(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is the storage failing rather than bad input or a
    bug: a connection or I/O error (gcsfs / aiohttp raise OSErrors), google-api-core's errors
    (RetryError, ServiceUnavailable), or a tensorstore status error (UNAVAILABLE, ...)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and not isinstance(error, _NOT_STORAGE_ERRORS):
            return True
        module = type(error).__module__ or ""
        if module.startswith(("google.api_core", "aiohttp", "google.auth")):
            return True
        text = str(error)
        if any(s in text for s in ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "Connect call failed")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _guarded(verb: str) -> Callable:
    """Makes `fn(path, ...)` a `storage_call` named "<verb> <path>"."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(path: PathLike, *args: Any, **kwargs: Any) -> Any:
            with storage_call(f"{verb} {os.fspath(path)}", path):
                return fn(path, *args, **kwargs)

        return wrapper

    return decorate


def is_no_space_error(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk or quota: an OSError ENOSPC / EDQUOT,
    or tensorstore's RESOURCE_EXHAUSTED naming one (orbax raises it as a ValueError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _no_space_detail(error: BaseException) -> str:
    """The file a full-disk error names (tensorstore: 'Failed writing: "<path>"'), else its type."""
    found = re.search(r'(?:Failed writing|local file): "([^"]+)"', str(error))
    if found:
        return found.group(1)
    filename = getattr(error, "filename", None)
    return str(filename) if filename else type(error).__name__


def storage_failure_line(workdir: str, error: BaseException) -> str | None:
    """The one line that reports `error` as the workdir's storage failing (a full disk, or a
    remote workdir's store not answering): not a bug, the last complete checkpoint is kept.
    None if it is neither (a bug keeps its traceback)."""
    if is_no_space_error(error):
        return (
            f"no space left on the device of workdir {workdir} (a write failed: "
            f"{_no_space_detail(error)}); free space or use another --workdir: the last "
            "complete checkpoint is kept, and the same command resumes from it"
        )
    if not (is_remote(workdir) and is_storage_error(error)):
        return None
    text = " ".join(str(error).split())[:300]
    return (
        f"storage of workdir {workdir} failed ({type(error).__name__}: {text}); the run "
        "stopped: its last complete checkpoint is kept, run the same command again once the "
        "storage is back"
    )


def _no_space_record(record: logging_.LogRecord) -> bool:
    """Whether a log record reports a full-disk error."""
    error = record.exc_info[1] if record.exc_info else None
    text = record.getMessage() if isinstance(record.msg, str) else ""
    return (error is not None and is_no_space_error(error)) or "No space left on device" in text


def _closed_loop_unraisable(unraisable) -> bool:
    """Whether an unraisable exception is tensorstore's callback of a failed write finding the
    asyncio loop of orbax's save already closed."""
    error = unraisable.exc_value
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def quiet_failed_writes(handler: logging_.Handler) -> None:
    """Silences the echoes of a failed checkpoint write, which the run reports in one line
    (`no space left ...`): orbax's log records of a full disk (with a traceback from each of
    its threads) on `handler`, and the "Event loop is closed" tracebacks tensorstore prints
    (as unraisable exceptions) for each write still completing after orbax closed its save's
    event loop. Every other record and unraisable exception passes."""
    handler.addFilter(lambda record: not _no_space_record(record))
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _closed_loop_unraisable(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook


def is_remote(path: PathLike) -> bool:
    """Whether `path` has a scheme (`gs://...`), i.e. is not on the local file system."""
    return bool(_SCHEME.match(os.fspath(path)))


def as_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path`; a local one made absolute (orbax requires absolute paths)."""
    if is_remote(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.fspath(path)))


def join(path: PathLike, *parts: str) -> epath.Path:
    return as_path(path).joinpath(*parts)


def _fs(path: PathLike):
    """The fsspec file system etils uses for a remote `path` (one cached instance per scheme)."""
    from etils.epath import backend

    return backend.fsspec_backend.fs(os.fspath(path))


def _fresh(path: PathLike) -> epath.Path:
    """`as_path(path)`, with the listings cached for it and its parents dropped (remote only)."""
    p = as_path(path)
    if is_remote(p) and "fsspec" in sys.modules:
        _fs(p).invalidate_cache(os.fspath(p))
    return p


@_guarded("checking")
def exists(path: PathLike) -> bool:
    """Whether a file or directory is at `path` (remote: an object, or objects under the prefix)."""
    return _fresh(path).exists()


@_guarded("checking")
def is_dir(path: PathLike) -> bool:
    return _fresh(path).is_dir()


@_guarded("listing")
def listdir(path: PathLike) -> list[str]:
    """Sorted names of the entries in the directory `path`; [] if it does not exist."""
    p = _fresh(path)
    return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


@_guarded("creating")
def makedirs(path: PathLike) -> epath.Path:
    """Creates the directory `path` and its parents (remote: nothing to do, GCS has no
    directories); returns it."""
    p = as_path(path)
    if not is_remote(p):  # remote: not even a call (gcsfs's mkdir would create a missing bucket)
        p.mkdir(parents=True, exist_ok=True)
    return p


def bucket(path: PathLike) -> str:
    """The bucket of a remote path: gs://bucket/run -> gs://bucket."""
    scheme, _, rest = os.fspath(as_path(path)).partition("://")
    return f"{scheme}://{rest.split('/')[0]}"


@_guarded("checking the bucket of")
def bucket_exists(path: PathLike) -> bool:
    """Whether the bucket of the remote `path` exists."""
    _fs(path).invalidate_cache()
    return bool(_fs(path).exists(bucket(path)))


@_guarded("deleting")
def remove(path: PathLike) -> None:
    """Deletes the file at `path` if there is one."""
    p = _fresh(path)
    if p.exists():
        p.unlink()


def _local_tmp(path: epath.Path) -> str:
    """A temporary name beside the local `path`, whose directory is created (as on GCS, where a
    write needs no directory)."""
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    return os.path.join(os.path.dirname(os.fspath(path)), f".{path.name}.tmp-{os.getpid()}")


@_guarded("writing")
def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` (its directory created) so that no reader ever sees part of it."""
    p = as_path(path)
    if is_remote(p):
        p.write_bytes(data)
        return
    tmp = _local_tmp(p)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(p))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, value: Any) -> None:
    """`value` as indented JSON with sorted keys."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def open_read(path: PathLike, mode: str = "rb"):
    """The file at `path` opened for reading (e.g. for `torch.load`), seen afresh if remote."""
    return _fresh(path).open(mode)


@_guarded("reading")
def read_text(path: PathLike, error: type[ScoreError] = ScoreError) -> str:
    """The text at `path`; `error` (one line naming the file) if it is missing or unreadable."""
    p = _fresh(path)
    try:
        return p.read_text()
    except FileNotFoundError:
        raise error(f"{p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {p}: {one_line(e)}") from None


def read_json(path: PathLike, error: type[ScoreError] = ScoreError) -> Any:
    """The JSON value at `path`; `error` (one line naming the file) if missing or corrupt."""
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{as_path(path)} is not valid JSON: {one_line(e)}") from None


def copy_local_file_to(src: PathLike, dest: PathLike) -> None:
    """Copies the local file `src` to `dest` (local or remote), atomically as `write_*_atomic`."""
    d = as_path(dest)
    if is_remote(d):
        # put_file streams the upload; an upload that fails midway never becomes an object.
        with storage_call(f"uploading {d}", d):
            _fs(d).put_file(os.fspath(src), os.fspath(d))
        return
    tmp = _local_tmp(d)
    try:
        shutil.copyfile(os.fspath(src), tmp)
        os.replace(tmp, os.fspath(d))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def local_file_for(dest: PathLike) -> Iterator[str]:
    """A local path to write `dest`'s content to (e.g. with `torch.save`); on a normal exit it
    becomes `dest` atomically (renamed, or uploaded), on an exception `dest` is left untouched."""
    d = as_path(dest)
    if is_remote(d):
        fd, tmp = tempfile.mkstemp(prefix=f"{d.name}.", suffix=".upload")
        os.close(fd)
    else:
        tmp = _local_tmp(d)
    try:
        yield tmp
        if is_remote(d):
            copy_local_file_to(tmp, d)
        else:
            os.replace(tmp, os.fspath(d))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@_guarded("reading")
def sha256(path: PathLike) -> str:
    """Hex SHA-256 of the file at `path`, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with _fresh(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with an integer "step".

    Locally each `append` appends a line. A remote object cannot be appended to, so the lines
    are kept in memory and the whole object is rewritten: each rewrite uploads the whole file (at
    the defaults, ~1k lines of ~0.4 kB for a 110-epoch CIFAR run: < 0.5 MB per rewrite).
    `sync_every_s > 0` bounds the rewrites to one per that many seconds; the caller must then
    `flush()` before it saves a checkpoint, or lines up to the checkpoint's step that were not yet
    written are lost for good if the run dies (lines after it are dropped on resume anyway).
    """

    def __init__(self, path: PathLike, sync_every_s: float = 0.0):
        self.path = as_path(path)
        self.remote = is_remote(self.path)
        self.sync_every_s = sync_every_s
        self._lines: list[str] | None = None  # remote: the object's lines, "\n"-terminated
        self._dirty = False
        self._synced_at = -float("inf")

    def _load(self) -> tuple[str, list[str]]:
        """(the file's text, its complete lines); a torn last line (a write cut short by a crash)
        is not among the lines."""
        if not exists(self.path):
            return "", []
        text = read_text(self.path, WorkdirError)
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        return text, [line for line in lines if line.strip()]

    def _records(self, lines: list[str]) -> list[dict[str, Any]]:
        records = []
        for i, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                int(record["step"])
            except (ValueError, KeyError, TypeError):
                raise WorkdirError(
                    f"{self.path} line {i} is not a JSON object with a step: {line[:80]!r}"
                ) from None
            records.append(record)
        return records

    def read(self) -> list[dict[str, Any]]:
        """Every record logged so far (including unflushed remote ones)."""
        return self._records(self._lines if self._lines is not None else self._load()[1])

    def retain(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keeps the records for which `keep(record)` is true, rewriting the file if that drops
        any (or a torn last line). Remote: rewrite through the instance that appends, or its next
        rewrite brings the dropped lines back from its memory."""
        if self.remote and self._lines is not None:
            lines = self._lines
            self._lines = [ln for ln, r in zip(lines, self._records(lines), strict=True) if keep(r)]
            if self._lines != lines or self._dirty:
                self._dirty = True
                self.flush()
            return
        text, lines = self._load()
        kept = [ln for ln, r in zip(lines, self._records(lines), strict=True) if keep(r)]
        if "".join(kept) != text:
            write_text_atomic(self.path, "".join(kept))
        if self.remote:
            self._lines = kept

    def truncate_after(self, step: int) -> None:
        """Drops the records of steps after `step` (logged before a crash, to be logged again)."""
        self.retain(lambda record: record["step"] <= step)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        if not self.remote:
            os.makedirs(os.path.dirname(os.fspath(self.path)), exist_ok=True)
            with open(os.fspath(self.path), "a") as f:
                f.write(line)
            return
        if self._lines is None:
            self._lines = self._load()[1]
        self._lines.append(line)
        self._dirty = True
        if time.monotonic() - self._synced_at >= self.sync_every_s:
            self.flush()

    def flush(self) -> None:
        """Writes the unwritten remote records (local appends are written at once)."""
        if self.remote and self._dirty:
            write_text_atomic(self.path, "".join(self._lines))
            self._dirty = False
            self._synced_at = time.monotonic()

    def close(self) -> None:
        self.flush()


def _import_summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without importing torch where it is not yet: with
    torch installed, tensorboardX imports it (about a second) only to accept torch tensors, and
    score_jax logs Python floats."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def summary_writer(logdir: PathLike, **kwargs: Any):
    """A tensorboardX `SummaryWriter` for a local, `gs://` or `s3://` logdir.

    tensorboardX writes `gs://` through google-cloud-storage and uploads the whole event file at
    each flush (it cannot append either), so flush at the logging interval, not per scalar.
    """
    SummaryWriter = _import_summary_writer()
    p = as_path(logdir)
    with storage_call(f"opening {p}", p):
        return _summary_writer(SummaryWriter, p, **kwargs)


def _summary_writer(SummaryWriter: type, p: epath.Path, **kwargs: Any):
    scheme = os.fspath(p).split("://", 1)[0] if is_remote(p) else ""
    if scheme not in ("", "gs", "s3"):
        raise WorkdirError(
            f"TensorBoard cannot write to {p}: tensorboardX supports local, gs:// and s3:// logdirs"
        )
    return SummaryWriter(os.fspath(p), **kwargs)


class ObjectLock:
    """A lock for a remote workdir: the object `path`, created only if absent, deleted on release.

    fcntl locks do not exist on an object store. `acquire` writes a JSON owner record with GCS's
    create-only precondition (`ifGenerationMatch=0`, which gcsfs sends for `mode="create"` and
    maps a 412 to FileExistsError), so of two runs racing for one workdir exactly one gets it;
    the other gets a WorkdirError naming the holder. Unlike an fcntl lock it outlives a process
    that dies without releasing it (SIGKILL, a lost VM; a SIGTERM that the trainer handles
    releases it): the error says how to delete it.
    """

    def __init__(self, path: PathLike):
        if not is_remote(path):
            raise ValueError(f"ObjectLock is for remote paths; {path} is local (use fcntl there)")
        self.path = as_path(path)
        self.owner: dict[str, Any] | None = None

    def holder(self) -> dict[str, Any] | None:
        """The owner record of the current lock object, None if there is none."""
        with storage_call(f"reading {self.path}", self.path):
            return self._holder()

    def _holder(self) -> dict[str, Any] | None:
        if not exists(self.path):
            return None
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"owner": "unreadable lock object"}

    def acquire(self) -> None:
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        data = json.dumps(owner, sort_keys=True).encode()
        # The existence check is redundant on GCS (the precondition decides); it is what refuses
        # on stores and emulators that ignore preconditions, without their race-freedom.
        held = self.holder()
        if held is None:
            try:
                with storage_call(f"writing {self.path}", self.path):
                    _fs(self.path).pipe_file(os.fspath(self.path), data, mode="create")
                self.owner = owner
                return
            except FileExistsError:
                held = self.holder() or {}
        raise WorkdirError(
            f"workdir {self.path.parent} is in use by another run ({_describe(held)}; lock object "
            f"{self.path}); if that run is dead, delete the lock object "
            f"(`gcloud storage rm {self.path}`) and start again"
        )

    def release(self) -> None:
        """Deletes the lock object if it is still the one this process wrote."""
        if self.owner is not None and self.holder() == self.owner:
            with storage_call(f"deleting {self.path}", self.path):
                self.path.unlink()
        self.owner = None

    def __enter__(self) -> "ObjectLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and is_storage_error(exc):
            shutdown_within_grace(f"a storage error ({type(exc).__name__})")
        try:
            self.release()
        except Exception as e:  # noqa: BLE001 - the run's own error is the one to report
            if exc is None:
                raise
            from absl import logging

            logging.warning("Could not delete the lock object %s: %s", self.path, one_line(e))


def _describe(owner: dict[str, Any]) -> str:
    if "pid" not in owner:
        return str(owner.get("owner", "owner unknown"))
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(owner.get("time", 0))))
    return f"pid {owner['pid']} on {owner.get('host', '?')} since {since}"
