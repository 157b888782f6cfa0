"""CIFAR-10/100 from TFDS ArrayRecord files via `tfds.data_source` (no TensorFlow needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from score_jax.data import Dataset, Split
from score_jax.errors import ConfigError, DataError

IMAGE_SHAPE = (32, 32, 3)
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
    return DataError(
        f"TFDS dataset {name!r} is not prepared as ArrayRecord in data_dir {shown!r} "
        f"({type(err).__name__}); on a machine with network run `tfds build {name} --data_dir "
        f"{shown} --file_format array_record`, then copy that directory here "
        "(config.dataset.data_dir)."
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


def load(name: str, data_dir: str | None = None, num_validation: int = 0) -> Dataset:
    """Loads CIFAR-10/100; the FIRST `num_validation` training images become `validation`."""
    if name not in NUM_CLASSES:
        raise ConfigError(f"Unknown CIFAR dataset {name!r}; valid: {', '.join(NUM_CLASSES)}")
    data_dir = data_dir or None
    train_source = _open(name, "train", data_dir)
    test_source = _open(name, "test", data_dir)
    full = read_split(train_source)
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
        test=read_split(test_source),
    )
