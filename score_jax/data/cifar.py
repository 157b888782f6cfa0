"""CIFAR-10/100 from the python-version archives (`cifar_archive`) or from TFDS ArrayRecord files
via `tfds.data_source` (neither needs TensorFlow)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from score_jax.data import VALIDATION_ORDERS, Dataset, Split, cifar_archive, remote
from score_jax.errors import ConfigError, DataError

IMAGE_SHAPE = (32, 32, 3)
NUM_TRAIN = 50000  # both CIFARs, before config.dataset.num_validation is held out
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2471, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
_READ_CHUNK = 1024

# What `tfds.data_source(download=False)` raises when the ArrayRecord data is not there:
# KeyError (no splits), NotImplementedError (TFRecord only), FileNotFoundError, AssertionError.
_NOT_PREPARED_ERRORS = (KeyError, NotImplementedError, FileNotFoundError, AssertionError)


def _not_prepared(name: str, data_dir: str | None, err: Exception) -> DataError:
    import tensorflow_datasets as tfds

    shown = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
    layout = cifar_archive.LAYOUTS[name]
    return DataError(
        f"TFDS dataset {name!r} is not prepared as ArrayRecord in data_dir {shown!r} "
        f"({type(err).__name__}) and that path holds no {layout.archive} or {layout.folder}/; "
        f"set config.dataset.data_dir to {layout.archive} (https://www.cs.toronto.edu/~kriz/"
        f"{layout.archive}) or its extracted folder, or build the TFDS files on a machine with "
        "network: `pip install tensorflow-cpu apache-beam mlcroissant importlib_resources` and "
        f"`tfds build {name} --data_dir {shown} --file_format array_record`."
    )


def _open(name: str, split: str, data_dir: str | None) -> Sequence[Any]:
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        len(source)
    except _NOT_PREPARED_ERRORS as e:
        raise _not_prepared(name, data_dir, e) from None
    return source


def read_split(source: Sequence[Any]) -> Split:
    """Reads all records of a data source into host arrays, in record order, in chunks."""
    n = len(source)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _READ_CHUNK):
        keys = list(range(start, min(start + _READ_CHUNK, n)))
        for i, record in zip(keys, source.__getitems__(keys), strict=True):
            images[i] = record["image"]
            labels[i] = record["label"]
    return Split(images, labels)


def _read_tfds(name: str, data_dir: str | None) -> tuple[Split, Split]:
    train_source = _open(name, "train", data_dir)
    test_source = _open(name, "test", data_dir)
    return read_split(train_source), read_split(test_source)


def load(
    name: str, data_dir: str | None = None, num_validation: int = 0, validation_order: str = "auto"
) -> Dataset:
    """Loads CIFAR-10/100; the FIRST `num_validation` training images become `validation`.

    `data_dir`: the python-version archive, its extracted folder or a directory holding one of
    them (`cifar_archive.find`), else a TFDS data directory. `validation_order`: "file" (the
    archive's order, torchvision's and the reference's; archives only), "tfds" (the order of
    TFDS's ArrayRecord files, also reproduced from an archive) or "auto" (file for an archive,
    tfds for TFDS data).
    """
    if name not in NUM_CLASSES:
        raise ConfigError(f"Unknown CIFAR dataset {name!r}; valid: {', '.join(NUM_CLASSES)}")
    if validation_order not in VALIDATION_ORDERS:
        raise DataError(
            f"config.dataset.validation_order={validation_order!r}; valid: {VALIDATION_ORDERS}"
        )
    data_dir = data_dir or None
    archive = cifar_archive.find(name, data_dir)
    if archive is not None:
        order = "tfds" if validation_order == "tfds" else "file"
        if remote.is_remote(data_dir):
            url = data_dir.rstrip("/")
            with remote.named_as(remote.local_path(url), url):
                splits = cifar_archive.read(name, archive, order)
        else:
            splits = cifar_archive.read(name, archive, order)
        full, test = Split(*splits["train"]), Split(*splits["test"])
    elif validation_order == "file":
        layout = cifar_archive.LAYOUTS[name]
        raise DataError(
            "config.dataset.validation_order='file' (torchvision's file order, as the reference) "
            f"needs the python-version data: set config.dataset.data_dir to {layout.archive} or "
            f"its extracted {layout.folder}/ (data_dir={data_dir!r} holds neither), or set "
            "validation_order='tfds' for the TFDS files' order"
        )
    else:
        full, test = _read_tfds(name, data_dir)
    if not 0 <= num_validation < len(full):
        raise ConfigError(
            f"config.dataset.num_validation={num_validation} must be in [0, {len(full)}) "
            f"(the size of the {name} train split)"
        )
    return Dataset(
        name=name,
        num_classes=NUM_CLASSES[name],
        image_shape=IMAGE_SHAPE,
        mean=MEAN[name],
        std=STD[name],
        train=Split(full.images[num_validation:], full.labels[num_validation:]),
        validation=Split(full.images[:num_validation], full.labels[:num_validation]),
        test=test,
    )
