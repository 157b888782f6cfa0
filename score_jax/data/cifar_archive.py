"""CIFAR-10/100 from the official python-version archives, read with numpy only.

`config.dataset.data_dir` may name `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz`, the
extracted `cifar-10-batches-py/` / `cifar-100-python/` (what torchvision downloads), or a
directory holding either. Each batch file is a pickled dict with bytes keys: b"data", uint8
N x 3072 (per image the 1024 red, then green, then blue values, each plane row-major) and
b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100). Every file is checked before use.

On gs:// (`data_dir` a remote path) the same three forms work: the archive object, or the batch
files of the extracted folder, are copied once to local disk (`score_jax.data.remote`).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import zlib
from typing import Any, BinaryIO

import numpy as np
from absl import logging

from score_jax.data import remote
from score_jax.errors import DataError

IMAGE_SIZE = 32
ORDERS = ("file", "tfds")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Names of one dataset's python-version files."""

    archive: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    num_classes: int
    official_sizes: tuple[int, int]


LAYOUTS = {
    "cifar10": Layout(
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key=b"labels",
        num_classes=10,
        official_sizes=(50000, 10000),
    ),
    "cifar100": Layout(
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key=b"fine_labels",
        num_classes=100,
        official_sizes=(50000, 10000),
    ),
}
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _looks_extracted(path: str, layout: Layout) -> bool:
    if os.path.basename(os.path.normpath(path)) == layout.folder:
        return True
    return any(os.path.isfile(os.path.join(path, f)) for f in (layout.meta, layout.train[0]))


def find(name: str, data_dir: str | None) -> str | None:
    """The archive or extracted folder of dataset `name` that `data_dir` names, or None (then
    `data_dir` is a TFDS data directory)."""
    layout = LAYOUTS[name]
    if not data_dir:
        return None
    if remote.is_remote(data_dir):
        return _find_remote(name, data_dir.rstrip("/"))
    if data_dir.endswith(_ARCHIVE_SUFFIXES):
        if not os.path.isfile(data_dir):
            raise DataError(f"config.dataset.data_dir={data_dir!r}: no such archive")
        return data_dir
    if os.path.isfile(data_dir):
        raise DataError(
            f"config.dataset.data_dir={data_dir!r} is a file but not a .tar.gz archive "
            f"(expected {layout.archive}, its extracted {layout.folder}/ or a directory)"
        )
    if not os.path.isdir(data_dir):
        return None
    if _looks_extracted(data_dir, layout):
        return data_dir
    for candidate in (layout.folder, layout.archive):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    for other_name, other in LAYOUTS.items():
        held = [os.path.join(data_dir, c) for c in (other.folder, other.archive)]
        if other_name != name and (
            _looks_extracted(data_dir, other) or any(map(os.path.exists, held))
        ):
            raise DataError(
                f"config.dataset.data_dir={data_dir!r} holds {other.folder} ({other_name}), but "
                f"config.dataset.name={name!r}"
            )
    return None


def _find_remote(name: str, url: str) -> str | None:
    """`find` for a gs:// `url`: the local copy of the archive object, or a local folder holding
    copies of the extracted folder's batch files; None if `url` holds neither (TFDS data)."""
    layout = LAYOUTS[name]
    what = "config.dataset.data_dir"
    if url.endswith(_ARCHIVE_SUFFIXES):
        if not remote.is_object(url):
            raise DataError(f"{what}={url!r}: no such archive")
        return remote.fetch(url, what)
    if remote.is_object(url):
        raise DataError(
            f"{what}={url!r} is an object but not a .tar.gz archive (expected {layout.archive}, "
            f"its extracted {layout.folder}/ or a prefix holding either)"
        )
    if url.rsplit("/", 1)[-1] == layout.folder or remote.exists(f"{url}/{layout.train[0]}"):
        folder = url
    elif remote.exists(f"{url}/{layout.folder}/{layout.train[0]}"):
        folder = f"{url}/{layout.folder}"
    elif remote.is_object(f"{url}/{layout.archive}"):
        return remote.fetch(f"{url}/{layout.archive}", what)
    else:
        for other_name, other in LAYOUTS.items():
            held = [f"{url}/{other.folder}/{other.train[0]}", f"{url}/{other.train[0]}"]
            held.append(f"{url}/{other.archive}")
            if other_name != name and any(map(remote.exists, held)):
                raise DataError(
                    f"{what}={url!r} holds {other.folder} ({other_name}), but "
                    f"config.dataset.name={name!r}"
                )
        return None
    copies = [remote.fetch(f"{folder}/{n}", what) for n in (*layout.train, *layout.test)]
    return os.path.dirname(copies[0])


_NP_CORE = np._core if hasattr(np, "_core") else np.core
_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _NP_CORE.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _NP_CORE.multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _NP_CORE.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _NP_CORE.numeric._frombuffer,
    ("_codecs", "encode"): codecs.encode,
}


class _Unpickler(pickle.Unpickler):
    """Loads plain data and numpy arrays only: a pickle cannot run code while it is read."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refuses to load {module}.{name}")
        return _ALLOWED[(module, name)]


def _read_batch(f: BinaryIO, where: str, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images uint8 (N, 32, 32, 3) and labels int32 (N,), checked."""
    raw = f.read()  # a truncated archive fails here, in the caller's terms
    try:
        batch = _Unpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{where}: not a CIFAR python-version batch ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        got = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"{where}: expected a dict with b'data' and {layout.label_key!r}, got {got}"
        )
    images = batch[b"data"]
    plane = IMAGE_SIZE * IMAGE_SIZE
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2):
        shown = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{where}: b'data' must be a uint8 N x {3 * plane} array, not {shown}")
    if images.shape[1] != 3 * plane:
        raise DataError(f"{where}: b'data' has shape {images.shape}, expected (N, {3 * plane})")
    labels = np.asarray(batch[layout.label_key])
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: {layout.label_key!r} must be {len(images)} integers (one per image), got "
            f"shape {labels.shape} of {labels.dtype}"
        )
    if len(labels) and not (0 <= labels.min() and labels.max() < layout.num_classes):
        raise DataError(
            f"{where}: labels out of range [0, {layout.num_classes}): min {labels.min()}, "
            f"max {labels.max()}"
        )
    # Channel-first planes -> NHWC.
    hwc = images.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(hwc), labels.astype(np.int32)


def _read_members(path: str, folder: str, names: list[str], layout: Layout) -> dict[str, Any]:
    """Reads the batch files `names` of a tar archive in one sequential pass."""
    wanted = {f"{folder}/{n}": n for n in names}
    out = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = os.path.normpath(member.name)  # "./cifar-10-batches-py/..." too
                if name in wanted and member.isfile():
                    where = f"{path}:{member.name}"
                    out[wanted[name]] = _read_batch(tar.extractfile(member), where, layout)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: truncated or not a tar archive ({e})") from None
    missing = [m for m, n in wanted.items() if n not in out]
    if missing:
        raise DataError(f"{path}: missing batch file {missing[0]} (is it {layout.archive}?)")
    return out


def _read_folder(path: str, names: list[str], layout: Layout) -> dict[str, Any]:
    out = {}
    for n in names:
        file = os.path.join(path, n)
        if not os.path.isfile(file):
            raise DataError(f"{file}: missing batch file (is {path} {layout.folder}?)")
        with open(file, "rb") as f:
            out[n] = _read_batch(f, file, layout)
    return out


def tfds_order(split: str, n: int) -> np.ndarray:
    """The permutation TFDS's writer applies to the examples 0..n-1 of a split: ascending
    md5(split name + decimal index) (tfds.core.hashing with the split name as salt)."""
    salt = hashlib.md5(split.encode())

    def key(i: int) -> int:
        h = salt.copy()
        h.update(str(i).encode())
        return int(h.hexdigest(), 16)

    return np.array(sorted(range(n), key=key), dtype=np.int64)


def read(name: str, path: str, order: str = "file") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "test": ...} of the archive or extracted folder `path`.

    order "file": the files' order (data_batch_1..5, as torchvision reads them); "tfds": the
    order TFDS's ArrayRecord files of the same data hold (`tfds_order`; TFDS builds from the
    binary version, assumed to hold the images in the python version's order: not checked
    against a real `tfds build` here)."""
    if order not in ORDERS:
        raise DataError(f"order {order!r}: valid {ORDERS}")
    layout = LAYOUTS[name]
    names = [*layout.train, *layout.test]
    if os.path.isdir(path):
        batches = _read_folder(path, names, layout)
    else:
        batches = _read_members(path, layout.folder, names, layout)
    splits = {}
    for split, files in (("train", layout.train), ("test", layout.test)):
        images = np.concatenate([batches[f][0] for f in files])
        labels = np.concatenate([batches[f][1] for f in files])
        if order == "tfds":
            perm = tfds_order(split, len(labels))
            images, labels = images[perm], labels[perm]
        splits[split] = (images, labels)
    sizes = (len(splits["train"][1]), len(splits["test"][1]))
    if sizes != layout.official_sizes:
        logging.warning(
            "%s holds %d training and %d test images, not the official %d and %d",
            path,
            *sizes,
            *layout.official_sizes,
        )
    return splits
