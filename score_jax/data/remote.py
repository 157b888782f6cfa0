"""Data files on gs:// (any remote `score_jax.workdir_io` path), copied to local disk once per host.

`config.dataset.data_dir` and `config.dataset.ddpm_path` may name objects in a bucket. Training
reads them at random (the DDPM file is memory-mapped and indexed per batch), so each object is
downloaded in full to a local cache and read from there; the readers then run exactly as on a
local file. The cache is `$SCORE_JAX_DATA_CACHE` (default `~/.cache/score_jax/data`); the copy of
`gs://bucket/path` is `<cache>/gs/bucket/path`, and `<copy>.source.json` records the object it
came from (generation, size, MD5 or CRC32C as GCS reports them) and the copy's size and mtime.

On every start one metadata request per object decides: if the object and the local copy are
the ones recorded, the copy is used as is; otherwise the object is streamed to a temporary file
beside the copy, hashed on the way (MD5, or CRC32C for composite objects, which have no MD5),
compared with the object's checksum and renamed into place. A file lock per copy makes the
processes of one host wait for one download instead of each making its own.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

from score_jax import workdir_io
from score_jax.errors import DataError

CACHE_ENV = "SCORE_JAX_DATA_CACHE"
SOURCE_SUFFIX = ".source.json"
_CHUNK = 1 << 23


def is_remote(path: str | None) -> bool:
    return bool(path) and workdir_io.is_remote(path)


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "score_jax", "data"
    )


def local_path(url: str) -> str:
    """Where the copy of `url` lives: <cache>/<scheme>/<bucket>/<object name>."""
    scheme, rest = url.split("://", 1)
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise DataError(f"{url}: not an object path")
    return os.path.join(cache_root(), scheme, *parts)


def _info(url: str, what: str) -> dict[str, Any]:
    fs = workdir_io._fs(url)
    try:
        fs.invalidate_cache(url)
        info = fs.info(url)
    except FileNotFoundError:
        raise DataError(f"{url} ({what}): no such object") from None
    except OSError as e:
        raise DataError(f"{url} ({what}): cannot read it: {workdir_io._one_line(e)}") from None
    if info.get("type") == "directory":
        raise DataError(f"{url} ({what}): a directory (a prefix of objects), not an object")
    return info


def _checksum(info: dict[str, Any]) -> tuple[str, str]:
    """("md5", hex) from GCS's base64 md5Hash, else ("crc32c", hex) for composite objects."""
    if info.get("md5Hash"):
        return "md5", base64.b64decode(info["md5Hash"]).hex()
    if info.get("crc32c"):
        return "crc32c", base64.b64decode(info["crc32c"]).hex()
    return "size", str(info["size"])


def _hasher(kind: str):
    if kind == "md5":
        return hashlib.md5()
    if kind == "crc32c":
        import google_crc32c

        return google_crc32c.Checksum()
    return None


def _source_record(info: dict[str, Any]) -> dict[str, Any]:
    kind, value = _checksum(info)
    return {
        "generation": str(info.get("generation", "")),
        "size": int(info["size"]),
        "checksum": [kind, value],
    }


def _copy_matches(copy: str, source: dict[str, Any]) -> bool:
    try:
        with open(copy + SOURCE_SUFFIX) as f:
            record = json.load(f)
        stat = os.stat(copy)
    except (OSError, ValueError):
        return False
    local = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return record == {"source": source, "local": local}


@contextlib.contextmanager
def _locked(copy: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(copy), exist_ok=True)
    with open(copy + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(url: str, copy: str, source: dict[str, Any], what: str) -> None:
    kind, expected = source["checksum"]
    hasher = _hasher(kind)
    tmp = f"{copy}.download-{os.getpid()}"
    size = 0
    try:
        with workdir_io._fs(url).open(url, "rb", block_size=_CHUNK) as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                if hasher is not None:
                    hasher.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        got = hasher.digest().hex() if hasher is not None else str(size)
        if got != expected or size != source["size"]:
            raise DataError(
                f"{url} ({what}): the download does not match the object ({size} of "
                f"{source['size']} bytes, {kind} {got} instead of {expected}); try again"
            )
        os.replace(tmp, copy)
        stat = os.stat(copy)
        record = {"source": source, "local": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}}
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, copy + SOURCE_SUFFIX)
    except OSError as e:
        raise DataError(f"{url} ({what}): download failed: {workdir_io._one_line(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch(url: str, what: str) -> str:
    """The local copy of the object `url`, downloaded unless the cached copy is that object's
    (see the module docstring); `what` names the config field in errors."""
    copy = local_path(url)
    source = _source_record(_info(url, what))
    with _locked(copy):
        if not _copy_matches(copy, source):
            _download(url, copy, source, what)
    return copy


def exists(url: str) -> bool:
    return workdir_io.exists(url)


def is_object(url: str) -> bool:
    """Whether `url` is an object (not only a prefix of objects)."""
    return workdir_io.exists(url) and not workdir_io.is_dir(url)


@contextlib.contextmanager
def named_as(copy: str, url: str) -> Iterator[None]:
    """Errors about the local copy `copy` name the object `url` instead."""
    try:
        yield
    except DataError as e:
        raise DataError(str(e).replace(copy, url)) from None
