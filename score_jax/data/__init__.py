"""Datasets for SCORE training: digits (tests), CIFAR-10/100 (archives or TFDS), DDPM data (npz).

`get_dataset(config.dataset)` returns a `Dataset` of host numpy arrays, `dataset_info` what a
model and schedule need of it (classes, image shape, mean / std, train size) without loading it;
`TrainBatcher` turns it into per-process training batches (a pure function of seed and step),
`eval_batches` into fixed-shape padded evaluation batches, and `augment` is the (jit-friendly)
crop + flip.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from score_jax.data.augment import augment
from score_jax.data.pipeline import (
    REAL_SAMPLINGS,
    TrainBatcher,
    check_real_fraction,
    eval_batches,
    num_eval_batches,
    steps_per_epoch,
)
from score_jax.errors import ConfigError, DataError

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetInfo",
    "REAL_SAMPLINGS",
    "Split",
    "TrainBatcher",
    "VALIDATION_ORDERS",
    "augment",
    "check_real_fraction",
    "dataset_info",
    "eval_batches",
    "get_dataset",
    "num_eval_batches",
    "steps_per_epoch",
]

DATASET_NAMES = ("digits", "cifar10", "cifar100")
# CIFAR: which order the first num_validation training images are taken in (cifar.load).
VALIDATION_ORDERS = ("auto", "file", "tfds")


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Images uint8 (N, H, W, C) (an ndarray or np.memmap) and labels int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the optimizer's schedule need of a dataset: its classes, image shape,
    per-channel mean / std of images in [0, 1] and the size of its train split."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_train: int


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held on the host.

    `mean` and `std` are per-channel statistics of images in [0, 1], for the model's
    internal normalisation; `generated` is the (memory-mapped) DDPM data, or None.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    validation: Split
    test: Split
    generated: Split | None = None

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(
            self.name,
            self.num_classes,
            tuple(self.image_shape),
            tuple(self.mean),
            tuple(self.std),
            len(self.train),
        )


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ConfigError(
            f"Unknown config.dataset.name={name!r}; valid names: {', '.join(DATASET_NAMES)}"
        )


def dataset_info(dataset_config: ml_collections.ConfigDict) -> DatasetInfo:
    """`get_dataset(dataset_config).info` without reading any data (the loaders' constants)."""
    name = dataset_config.name
    _check_name(name)
    if name == "digits":
        from score_jax.data import digits

        return DatasetInfo(
            name,
            digits.NUM_CLASSES,
            digits.IMAGE_SHAPE,
            digits.MEAN,
            digits.STD,
            digits.NUM_EXAMPLES - digits.NUM_TEST - digits.NUM_VALIDATION,
        )
    from score_jax.data import cifar

    num_train = cifar.NUM_TRAIN - int(dataset_config.get("num_validation", 0))
    return DatasetInfo(
        name,
        cifar.NUM_CLASSES[name],
        cifar.IMAGE_SHAPE,
        cifar.MEAN[name],
        cifar.STD[name],
        num_train,
    )


def get_dataset(dataset_config: ml_collections.ConfigDict) -> Dataset:
    """Loads the dataset described by `config.dataset` (name, data_dir, num_validation, ...)."""
    name = dataset_config.name
    _check_name(name)
    ddpm_path = dataset_config.get("ddpm_path", "") or ""
    check_real_fraction(dataset_config.get("real_fraction", 1.0), bool(ddpm_path))

    # Imported here: the loaders import `Split`/`Dataset` from this module.
    if name == "digits":
        from score_jax.data import digits

        dataset = digits.load()
    else:
        from score_jax.data import cifar

        dataset = cifar.load(
            name,
            data_dir=dataset_config.get("data_dir", "") or None,
            num_validation=int(dataset_config.get("num_validation", 0)),
            validation_order=dataset_config.get("validation_order", "auto"),
        )
    if ddpm_path:
        from score_jax.data import ddpm

        generated = ddpm.load_generated(ddpm_path, dataset.num_classes, dataset.image_shape)
        dataset = dataclasses.replace(dataset, generated=generated)
    return dataset
