"""scikit-learn's bundled 8x8 digits: a tiny offline dataset for tests and quick runs."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from score_jax.data import Dataset, Split

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
NUM_EXAMPLES = 1797
NUM_TEST = 360
NUM_VALIDATION = 180
SPLIT_SEED = 0  # The split is fixed, independent of config.seed.

# Per-channel mean/std of the train split as float64 of uint8 / 255, over all its pixels:
#   x = load().train.images / 255.0; (x.mean(), x.std())
# (tests/test_data.py recomputes and checks them).
MEAN = (0.3052544,)
STD = (0.3759399,)


def _bundled_csv() -> str | None:
    """scikit-learn's own copy of the digits (datasets/data/digits.csv.gz), found without
    importing scikit-learn, whose import takes ~2 s of every process's start."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec and spec.submodule_search_locations) or ():
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    return None


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """(images 0..255 uint8 (N, 8, 8, 1), labels int32): the rows of `load_digits()`."""
    path = _bundled_csv()
    if path is not None:  # 64 pixel values 0..16, then the label (what load_digits parses)
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError(
                "The 'digits' dataset needs scikit-learn: pip install scikit-learn"
            ) from e
        digits = load_digits()
        pixels, target = digits.images, digits.target
    # Values are 0..16; scale to 0..255.
    images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, target.astype(np.int32)


def load() -> Dataset:
    """1797 uint8 (8, 8, 1) images, split by a fixed permutation: 360 test, 180 val, rest train."""
    images, labels = _load_raw()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test = perm[:NUM_TEST]
    validation = perm[NUM_TEST : NUM_TEST + NUM_VALIDATION]
    train = perm[NUM_TEST + NUM_VALIDATION :]
    return Dataset(
        name="digits",
        num_classes=NUM_CLASSES,
        image_shape=IMAGE_SHAPE,
        mean=MEAN,
        std=STD,
        train=Split(images[train], labels[train]),
        validation=Split(images[validation], labels[validation]),
        test=Split(images[test], labels[test]),
    )
