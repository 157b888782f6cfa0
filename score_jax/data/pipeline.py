"""Host-side batching: stateless training batches and padded evaluation batches.

A training batch is a pure function of (seed, step), so a run resumed at step s sees
exactly the batches it would have seen. Each process builds only its contiguous slice of
the global batch, reading only those rows (from memory or a memory-mapped file).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import numpy as np

from score_jax.errors import ConfigError, DataError

if TYPE_CHECKING:
    from score_jax.data import Dataset, Split

# Tags that keep the random streams of one (seed, step) apart.
_GENERATED_TAG = 1
_MIX_TAG = 2
_PER_EPOCH_TAG = 3
_PERM_CACHE_SIZE = 3
# How the real images of the batches are drawn (TrainBatcher).
REAL_SAMPLINGS = ("stream", "per_epoch")


def check_real_fraction(real_fraction: float, has_generated: bool) -> float:
    """Validates `config.dataset.real_fraction` against the presence of DDPM data."""
    real_fraction = float(real_fraction)
    if not 0.0 < real_fraction <= 1.0:
        raise ConfigError(f"config.dataset.real_fraction must be in (0, 1], got {real_fraction}")
    if real_fraction < 1.0 and not has_generated:
        raise ConfigError(
            f"config.dataset.real_fraction={real_fraction} < 1 needs generated data, but "
            "config.dataset.ddpm_path is empty"
        )
    return real_fraction


def _process_slice(
    global_batch_size: int,
    process_index: int | None,
    process_count: int | None,
    field: str = "config.batch_size",
) -> tuple[int, int, int]:
    """Returns (process_index, process_count, local batch size)."""
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(
            f"{field}={global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count, global_batch_size // process_count


def _take(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """array[indices], reading each needed row once and in increasing order (memmap-friendly)."""
    unique, inverse = np.unique(indices, return_inverse=True)
    return np.asarray(array[unique])[inverse]


def steps_per_epoch(num_train: int, global_batch_size: int, epoch_size: int | None = None) -> int:
    """ceil(epoch_size / global_batch_size); epoch_size 0 / None: the train split's size."""
    return math.ceil((int(epoch_size) if epoch_size else num_train) / global_batch_size)


class TrainBatcher:
    """Stateless training batches mixing real and (optionally) generated examples.

    Real examples, `real_sampling` "stream": an endless stream of permutations, stream position
    p = step * n_real + j is example perm_e[p % N] with e = p // N and
    perm_e = default_rng([seed, e]).permutation(N), so every image is seen once before any is
    seen twice. "per_epoch" (the reference's DDPM sampler, core/data/semisup.py): the stream
    restarts at every epoch E from fresh permutations, position q = (step % steps_per_epoch) *
    n_real + j of epoch E = step // steps_per_epoch being perm_{E,c}[q % N], c = q // N,
    perm_{E,c} = default_rng([seed, 3, E, c]).permutation(N): an epoch uses the first
    steps_per_epoch * n_real images of its permutation. The global - n_real generated examples
    of a step are drawn with replacement by default_rng([seed, step, 1]). The global batch is
    then shuffled by default_rng([seed, step, 2]) so that both kinds spread over processes.

    An epoch is ceil(epoch_size / global_batch_size) steps; epoch_size defaults to the train
    split's size (the reference's DDPM setting counts the full 50000 CIFAR images, the held-out
    validation images included).
    """

    def __init__(
        self,
        dataset: Dataset,
        global_batch_size: int,
        seed: int,
        real_fraction: float = 1.0,
        process_index: int | None = None,
        process_count: int | None = None,
        epoch_size: int | None = None,
        real_sampling: str = "stream",
    ):
        if real_sampling not in REAL_SAMPLINGS:
            raise ConfigError(
                f"config.dataset.real_sampling={real_sampling!r}; valid: {REAL_SAMPLINGS}"
            )
        self.real_sampling = real_sampling
        self.real_fraction = check_real_fraction(real_fraction, dataset.generated is not None)
        if seed < 0:
            raise ConfigError(f"config.seed must be non-negative, got {seed}")
        self.process_index, self.process_count, self.local_batch_size = _process_slice(
            global_batch_size, process_index, process_count
        )
        self.train = dataset.train
        self.generated = dataset.generated if self.real_fraction < 1.0 else None
        self.global_batch_size = global_batch_size
        self.seed = int(seed)
        self.num_train = len(self.train)
        if self.num_train == 0:
            raise DataError("the train split is empty")
        if self.real_fraction == 1.0:
            self.num_real = global_batch_size
        else:
            self.num_real = int(round(global_batch_size * self.real_fraction))
        self.num_generated = global_batch_size - self.num_real
        if epoch_size is not None and epoch_size < 0:
            raise ValueError(f"config.dataset.epoch_size must be >= 0, got {epoch_size}")
        self.epoch_size = int(epoch_size) if epoch_size else self.num_train
        self.steps_per_epoch = steps_per_epoch(self.num_train, global_batch_size, epoch_size)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _perm(self, seed: tuple[int, ...]) -> np.ndarray:
        perm = self._perms.get(seed)
        if perm is None:
            perm = np.random.default_rng([self.seed, *seed]).permutation(self.num_train)
            self._perms[seed] = perm
            while len(self._perms) > _PERM_CACHE_SIZE:
                self._perms.popitem(last=False)
        return perm

    def real_indices(self, stream_positions: np.ndarray, epoch: int | None = None) -> np.ndarray:
        """Train-split indices of positions in the stream of permutations: the endless one, or
        with `epoch` ("per_epoch" sampling) that epoch's own."""
        passes = stream_positions // self.num_train
        out = np.empty_like(stream_positions)
        for c in np.unique(passes):
            sel = passes == c
            seed = (int(c),) if epoch is None else (_PER_EPOCH_TAG, epoch, int(c))
            out[sel] = self._perm(seed)[stream_positions[sel] % self.num_train]
        return out

    def sources(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pos, is_generated, index) of this process's rows of the global batch of `step`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        start = self.process_index * self.local_batch_size
        pos = np.arange(start, start + self.local_batch_size, dtype=np.int64)
        # Global row r holds entry mix[r] of [n_real real..., n_generated generated...].
        mix = np.random.default_rng([self.seed, step, _MIX_TAG]).permutation(self.global_batch_size)
        entry = mix[pos]
        is_generated = entry >= self.num_real
        index = np.empty_like(entry)
        real = ~is_generated
        if self.real_sampling == "stream":
            index[real] = self.real_indices(step * self.num_real + entry[real])
        else:
            epoch, k = divmod(step, self.steps_per_epoch)
            index[real] = self.real_indices(k * self.num_real + entry[real], epoch)
        if self.num_generated:
            drawn = np.random.default_rng([self.seed, step, _GENERATED_TAG]).integers(
                0, len(self.generated), self.num_generated
            )
            index[is_generated] = drawn[entry[is_generated] - self.num_real]
        return pos, is_generated, index

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the global batch of `step`: image, label, pos."""
        pos, is_generated, index = self.sources(step)
        images = np.empty((self.local_batch_size, *self.train.images.shape[1:]), np.uint8)
        labels = np.empty((self.local_batch_size,), np.int32)
        for split, sel in ((self.train, ~is_generated), (self.generated, is_generated)):
            if sel.any():
                images[sel] = _take(split.images, index[sel])
                labels[sel] = _take(split.labels, index[sel])
        return {"image": images, "label": labels, "pos": pos.astype(np.int32)}


def num_eval_batches(n: int, batch_size: int) -> int:
    """Number of (padded) global batches covering n examples."""
    return math.ceil(n / batch_size)


def eval_batches(
    split: Split,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's slice of each global batch: image, label and mask (0 = padding).

    Every batch has the same shape; the last is zero-padded.
    """
    process_index, _, local = _process_slice(
        batch_size, process_index, process_count, field="eval batch_size"
    )
    n = len(split)
    image_shape = split.images.shape[1:]
    for b in range(num_eval_batches(n, batch_size)):
        start = b * batch_size + process_index * local
        stop = min(start + local, n)
        count = max(stop - start, 0)
        images = np.zeros((local, *image_shape), np.uint8)
        labels = np.zeros((local,), np.int32)
        mask = np.zeros((local,), np.float32)
        if count:
            images[:count] = split.images[start:stop]
            labels[:count] = split.labels[start:stop]
            mask[:count] = 1.0
        yield {"image": images, "label": labels, "mask": mask}
