"""scikit-learn's bundled 8x8 digits: a tiny offline dataset for tests and quick runs."""

from __future__ import annotations

import numpy as np

from score_jax.data import Dataset, Split

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
NUM_TEST = 360
NUM_VALIDATION = 180
SPLIT_SEED = 0  # The split is fixed, independent of config.seed.

# Per-channel mean/std of the train split as float64 of uint8 / 255, over all its pixels:
#   x = load().train.images / 255.0; (x.mean(), x.std())
# (tests/test_data.py recomputes and checks them).
MEAN = (0.3052544,)
STD = (0.3759399,)


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "The 'digits' dataset needs scikit-learn: pip install scikit-learn"
        ) from e
    digits = load_digits()
    # Values are 0..16; scale to 0..255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int32)


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
