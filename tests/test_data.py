"""Tests for score_jax.data: loaders, DDPM npz, batching and augmentation."""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import logging
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from score_jax import data
from score_jax.data import Dataset, Split, TrainBatcher, augment, ddpm, digits
from score_jax.data.augment import crop, rotate
from score_jax.errors import DataError


def _config(**overrides) -> ml_collections.ConfigDict:
    config = {
        "name": "digits",
        "data_dir": "",
        "num_validation": 0,
        "ddpm_path": "",
        "real_fraction": 1.0,
    }
    config.update(overrides)
    return ml_collections.ConfigDict(config)


@pytest.fixture(scope="module")
def digits_dataset() -> Dataset:
    return data.get_dataset(_config())


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_split(digits_dataset):
    ds = digits_dataset
    assert (ds.name, ds.num_classes, ds.image_shape) == ("digits", 10, (8, 8, 1))
    sizes = {"train": 1257, "validation": 180, "test": 360}
    for name, size in sizes.items():
        split = getattr(ds, name)
        assert split.images.shape == (size, 8, 8, 1) and split.images.dtype == np.uint8
        assert split.labels.shape == (size,) and split.labels.dtype == np.int32
        assert 0 <= split.labels.min() and split.labels.max() < 10
    assert ds.generated is None
    assert ds.train.images.max() == 255


def test_digits_splits_partition_the_dataset(digits_dataset):
    from sklearn.datasets import load_digits

    raw = load_digits()
    full = np.round(raw.images * 255 / 16).astype(np.uint8)[..., None]

    def rows(images, labels):
        return sorted(im.tobytes() + bytes([lb]) for im, lb in zip(images, labels, strict=True))

    ds = digits_dataset
    splits = (ds.train, ds.validation, ds.test)
    together = rows(
        np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits])
    )
    assert together == rows(full, raw.target)


def test_digits_read_without_sklearn_import_equals_load_digits(monkeypatch):
    fast = digits._load_raw()  # sklearn's bundled CSV, read directly
    monkeypatch.setattr(digits, "_bundled_csv", lambda: None)
    slow = digits._load_raw()  # through sklearn.datasets.load_digits
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_digits_load_does_not_import_sklearn():
    code = (
        "import sys; from score_jax.data import digits; digits.load(); print(sorted(sys.modules))"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    modules = ast.literal_eval(out.stdout.strip())
    assert "numpy" in modules and "sklearn" not in modules


def test_digits_deterministic_and_stats(digits_dataset):
    again = digits.load()
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(
            getattr(again, name).images, getattr(digits_dataset, name).images
        )
        np.testing.assert_array_equal(
            getattr(again, name).labels, getattr(digits_dataset, name).labels
        )
    x = digits_dataset.train.images / 255.0
    np.testing.assert_allclose(digits.MEAN, [x.mean()], atol=1e-6)
    np.testing.assert_allclose(digits.STD, [x.std()], atol=1e-6)


def test_unknown_name():
    with pytest.raises(ValueError, match=r"config\.dataset\.name.*digits, cifar10, cifar100"):
        data.get_dataset(_config(name="mnist"))


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_mock(name, num_classes, mock_tfds):
    import tensorflow_datasets as tfds

    with mock_tfds(num_examples=40):
        ds = data.get_dataset(_config(name=name, num_validation=8, data_dir="/nowhere"))
        source = tfds.data_source(name, split="train", download=False)
        first = [source[i] for i in range(10)]
    assert (ds.num_classes, ds.image_shape) == (num_classes, (32, 32, 3))
    assert len(ds.mean) == len(ds.std) == 3
    for split, size in ((ds.train, 32), (ds.validation, 8), (ds.test, 40)):
        assert split.images.shape == (size, 32, 32, 3) and split.images.dtype == np.uint8
        assert split.labels.shape == (size,) and split.labels.dtype == np.int32
        assert 0 <= split.labels.min() and split.labels.max() < num_classes
    # The FIRST num_validation training records are the validation split.
    for i in range(8):
        np.testing.assert_array_equal(ds.validation.images[i], first[i]["image"])
        assert ds.validation.labels[i] == first[i]["label"]
    for i in range(2):
        np.testing.assert_array_equal(ds.train.images[i], first[8 + i]["image"])
        assert ds.train.labels[i] == first[8 + i]["label"]


def test_cifar_not_prepared(tmp_path):
    missing = tmp_path / "no_tfds_here"
    with pytest.raises(DataError, match="tfds build cifar10") as info:
        data.get_dataset(_config(name="cifar10", data_dir=str(missing)))
    message = str(info.value)
    assert "\n" not in message and "'cifar10'" in message and str(missing) in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ----------------------------------------------------------------------------- DDPM npz


def _write_npz(path, compressed: bool = False, **arrays) -> str:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return str(path)


def _generated(n: int = 12, shape=(8, 8, 1), value: int = 7):
    images = np.full((n, *shape), value, np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # Row id, to check rows are read correctly.
    return images, (np.arange(n) % 10).astype(np.int64)


def test_load_generated_memmap(tmp_path):
    images, labels = _generated()
    path = _write_npz(tmp_path / "gen.npz", image=images, label=labels)
    split = ddpm.load_generated(path, 10, (8, 8, 1))
    assert isinstance(split.images, np.memmap)
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    assert split.labels.dtype == np.int32


def test_load_generated_compressed(tmp_path, caplog):
    images, labels = _generated()
    path = _write_npz(tmp_path / "gen.npz", compressed=True, image=images, label=labels)
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("image.npy").compress_type == zipfile.ZIP_DEFLATED
    with caplog.at_level(logging.WARNING):
        split = ddpm.load_generated(path, 10, (8, 8, 1))
    assert "np.savez (not np.savez_compressed)" in caplog.text
    assert not isinstance(split.images, np.memmap)
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)


_GOOD_IMAGE, _GOOD_LABEL = _generated()


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"label": _GOOD_LABEL}, "missing key 'image'"),
        ({"image": _GOOD_IMAGE}, "missing key 'label'"),
        ({"image": _GOOD_IMAGE[..., 0], "label": _GOOD_LABEL}, r"'image' has shape \(12, 8, 8\)"),
        ({"image": np.zeros((12, 8, 8, 3), np.uint8), "label": _GOOD_LABEL}, "'image' has shape"),
        (
            {"image": _GOOD_IMAGE.astype(np.float32), "label": _GOOD_LABEL},
            "'image' has dtype float32",
        ),
        ({"image": _GOOD_IMAGE, "label": _GOOD_LABEL.astype(np.float32)}, "'label' has dtype"),
        ({"image": _GOOD_IMAGE, "label": _GOOD_LABEL[:5]}, r"'label' has shape \(5,\)"),
        ({"image": _GOOD_IMAGE, "label": _GOOD_LABEL + 1}, r"'label' has values in \[1, 10\]"),
        ({"image": _GOOD_IMAGE, "label": _GOOD_LABEL - 1}, r"'label' has values in \[-1, 8\]"),
        (
            {
                "image": np.array([_GOOD_IMAGE[i] for i in range(12)] + [None], object)[:12],
                "label": _GOOD_LABEL,
            },
            r"field 'image': has dtype object \(pickled",
        ),
        (
            {"image": _GOOD_IMAGE, "label": np.array(list(_GOOD_LABEL), object)},
            r"field 'label': has dtype object \(pickled",
        ),
    ],
)
def test_load_generated_bad(tmp_path, arrays, match):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match) as info:
        ddpm.load_generated(path, 10, (8, 8, 1))
    assert "bad.npz" in str(info.value) and "\n" not in str(info.value)


def _member_offset(path: str, key: str) -> int:
    """Offset in the file of member `key`'s bytes (found independently of the loader)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
    return info.header_offset + 30 + int(name_len) + int(extra_len)


def test_load_generated_detects_overwritten_bytes_once_per_file_version(tmp_path, monkeypatch):
    images, labels = _generated(n=200)  # larger than zipfile's read-ahead of the header
    path = _write_npz(tmp_path / "gen.npz", image=images, label=labels)
    calls = []
    crc_ok = ddpm._Member.crc_ok
    monkeypatch.setattr(ddpm._Member, "crc_ok", lambda self: calls.append(self.key) or crc_ok(self))
    ddpm.load_generated(path, 10, (8, 8, 1))
    assert sorted(calls) == ["image", "label"] and os.path.exists(path + ddpm.VERIFIED_SUFFIX)
    ddpm.load_generated(path, 10, (8, 8, 1))  # same size and mtime: not read again
    assert len(calls) == 2

    with open(path, "r+b") as f:  # overwrite pixels of row 150 in place (the size stays)
        f.seek(_member_offset(path, "image") + 128 + 150 * 64 + 10)
        f.write(b"\xff\xfe")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"gen\.npz.*field 'image' fails its zip CRC-32") as info:
        ddpm.load_generated(path, 10, (8, 8, 1))
    assert "\n" not in str(info.value)


def test_load_generated_header_claiming_more_rows_than_stored(tmp_path):
    images, labels = _generated()
    path = str(tmp_path / "short.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (20, 8, 8, 1)}
    )
    label_bytes = io.BytesIO()
    np.save(label_bytes, np.arange(20) % 10)
    with zipfile.ZipFile(path, "w") as archive:  # stored, as np.savez writes
        archive.writestr("image.npy", header.getvalue() + images.tobytes())  # 12 of 20 rows
        archive.writestr("label.npy", label_bytes.getvalue())
    with pytest.raises(DataError, match=r"short\.npz.*field 'image'.*claims shape \(20, 8, 8, 1\)"):
        ddpm.load_generated(path, 10, (8, 8, 1))


def test_load_generated_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nothing.npz.*file not found"):
        ddpm.load_generated(str(tmp_path / "nothing.npz"), 10, (8, 8, 1))


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_bad_real_fraction(fraction):
    with pytest.raises(ValueError, match=r"config\.dataset\.real_fraction"):
        data.get_dataset(_config(real_fraction=fraction))


def test_real_fraction_needs_ddpm_path(digits_dataset):
    with pytest.raises(ValueError, match=r"config\.dataset\.ddpm_path"):
        data.get_dataset(_config(real_fraction=0.5))
    with pytest.raises(ValueError, match=r"config\.dataset\.ddpm_path"):
        TrainBatcher(digits_dataset, 8, seed=0, real_fraction=0.5, process_count=1)


def test_get_dataset_with_generated(tmp_path):
    images, labels = _generated(n=20, value=7)  # Digits pixels are never 7.
    path = _write_npz(tmp_path / "gen.npz", image=images, label=labels)
    ds = data.get_dataset(_config(ddpm_path=path, real_fraction=0.3))
    assert isinstance(ds.generated.images, np.memmap)
    batcher = TrainBatcher(ds, 32, seed=1, real_fraction=0.3, process_index=0, process_count=1)
    for step in range(3):
        batch = batcher.batch(step)
        is_generated = (batch["image"][:, 1:] == 7).all(axis=(1, 2, 3))
        assert is_generated.sum() == 32 - round(32 * 0.3)
        rows = batch["image"][is_generated, 0, 0, 0]
        np.testing.assert_array_equal(batch["label"][is_generated], labels[rows])


# ----------------------------------------------------------------------------- batching


def _indexed_dataset(num_train: int = 50, num_generated: int = 30) -> Dataset:
    """Images (2, 2, 1) encoding (index // 256, index % 256, is_generated)."""

    def split(n, generated):
        idx = np.arange(n)
        images = np.zeros((n, 2, 2, 1), np.uint8)
        images[:, 0, 0, 0], images[:, 0, 1, 0] = idx // 256, idx % 256
        images[:, 1, 0, 0] = generated
        return Split(images, ((idx + 5 * generated) % 10).astype(np.int32))

    return Dataset(
        name="indexed",
        num_classes=10,
        image_shape=(2, 2, 1),
        mean=(0.5,),
        std=(0.5,),
        train=split(num_train, 0),
        validation=split(0, 0),
        test=split(0, 0),
        generated=split(num_generated, 1) if num_generated else None,
    )


def _decode(batch):
    images = batch["image"].astype(np.int64)
    index = images[:, 0, 0, 0] * 256 + images[:, 0, 1, 0]
    return index, images[:, 1, 0, 0].astype(bool)


@pytest.mark.parametrize("global_batch,fraction", [(16, 0.3), (10, 0.25), (8, 1.0)])
def test_mixer_counts(global_batch, fraction):
    ds = _indexed_dataset()
    batcher = TrainBatcher(ds, global_batch, 3, fraction, process_index=0, process_count=1)
    n_real = round(global_batch * fraction)
    for step in range(5):
        batch = batcher.batch(step)
        index, generated = _decode(batch)
        assert (~generated).sum() == n_real and generated.sum() == global_batch - n_real
        assert index[generated].max(initial=0) < 30 and index[~generated].max() < 50
        np.testing.assert_array_equal(batch["label"], (index + 5 * generated) % 10)
        np.testing.assert_array_equal(batch["pos"], np.arange(global_batch))
        assert batch["image"].dtype == np.uint8
        assert batch["label"].dtype == batch["pos"].dtype == np.int32


def test_batch_deterministic_and_process_slices():
    ds = _indexed_dataset()
    single = TrainBatcher(ds, 12, 7, 0.5, process_index=0, process_count=1)
    parts = [TrainBatcher(ds, 12, 7, 0.5, process_index=i, process_count=2) for i in range(2)]
    resumed = TrainBatcher(ds, 12, 7, 0.5, process_index=0, process_count=1)
    for step in (0, 1, 5, 13, 4, 0):
        full = single.batch(step)
        for key, value in resumed.batch(step).items():
            np.testing.assert_array_equal(value, full[key])
        halves = [p.batch(step) for p in parts]
        assert halves[0]["image"].shape == (6, 2, 2, 1)
        np.testing.assert_array_equal(halves[1]["pos"], np.arange(6, 12))
        for key in full:
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])
    # Different steps and seeds give different batches.
    assert not np.array_equal(single.batch(0)["image"], single.batch(1)["image"])
    other = TrainBatcher(ds, 12, 8, 0.5, process_index=0, process_count=1)
    assert not np.array_equal(single.batch(0)["image"], other.batch(0)["image"])


def test_batch_size_not_divisible():
    with pytest.raises(ValueError, match=r"config\.batch_size"):
        TrainBatcher(_indexed_dataset(), 10, 0, process_index=0, process_count=4)


def test_real_only_epochs():
    ds = _indexed_dataset(num_train=50, num_generated=0)
    batcher = TrainBatcher(ds, 8, 0, process_index=0, process_count=1)
    assert batcher.steps_per_epoch == 7
    seen = [_decode(batcher.batch(step))[0] for step in range(20)]
    # Steps 0..5 are stream positions 0..47, all in epoch 0: all different.
    assert len(set(np.concatenate(seen[:6]))) == 48
    # One epoch of steps covers every example (step 6 straddles epochs 0 and 1).
    assert set(np.concatenate(seen[:7])) == set(range(50))
    # Positions 56..95 (steps 7..11) lie in epoch 1, after step 6's 6 epoch-1 examples.
    epoch1 = np.concatenate(seen[7:12])
    assert len(set(epoch1)) == 40
    # Every window of N stream positions holds each example once: check via the stream.
    stream = batcher.real_indices(np.arange(160))
    for start in (0, 50, 100):
        assert sorted(stream[start : start + 50]) == list(range(50))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen[:20])), np.sort(stream[: 20 * 8]))


def test_eval_batches():
    n, batch_size = 23, 8
    split = _indexed_dataset(num_train=n).train
    assert data.num_eval_batches(n, batch_size) == 3
    seen = []
    for p in range(2):
        batches = list(data.eval_batches(split, batch_size, process_index=p, process_count=2))
        assert len(batches) == 3
        for batch in batches:
            assert batch["image"].shape == (4, 2, 2, 1) and batch["mask"].dtype == np.float32
            index, _ = _decode(batch)
            real = batch["mask"] == 1
            assert ((batch["mask"] == 0) | real).all()
            assert (batch["image"][~real] == 0).all() and (batch["label"][~real] == 0).all()
            np.testing.assert_array_equal(batch["label"][real], index[real] % 10)
            seen.extend(index[real])
    assert sorted(seen) == list(range(n))
    single = list(data.eval_batches(split, batch_size, process_index=0, process_count=1))
    assert [b["mask"].sum() for b in single] == [8, 8, 7]


# ----------------------------------------------------------------------------- augment


def _images(batch: int = 16, size: int = 6) -> jax.Array:
    values = np.arange(batch * size * size * 3, dtype=np.float32) + 1.0
    return jnp.asarray(values.reshape(batch, size, size, 3) / values.max())


def test_augment_identity_and_shapes():
    images, keys = _images(), jax.random.split(jax.random.key(0), 16)
    assert augment(images, keys, crop_padding=0, flip=False) is images
    out = jax.jit(functools.partial(augment, crop_padding=2, flip=True))(images, keys)
    assert out.shape == images.shape and out.dtype == images.dtype


def test_crop_windows():
    image = _images(1)[0]
    padded = np.pad(np.asarray(image), ((2, 2), (2, 2), (0, 0)))
    for dy, dx in ((0, 0), (2, 2), (4, 1), (3, 4)):
        window = crop(image, jnp.array([dy, dx]), 2)
        np.testing.assert_array_equal(window, padded[dy : dy + 6, dx : dx + 6])
    np.testing.assert_array_equal(crop(image, jnp.array([2, 2]), 2), image)

    # Random crops: each output is one window of the padded image; offsets cover [0, 4].
    images, keys = _images(64), jax.random.split(jax.random.key(1), 64)
    out = np.asarray(augment(images, keys, crop_padding=2, flip=False))
    offsets = []
    for x, y in zip(np.asarray(images), out, strict=True):
        padded = np.pad(x, ((2, 2), (2, 2), (0, 0)))
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(padded[dy : dy + 6, dx : dx + 6], y)
        ]
        assert len(found) == 1
        offsets.append(found[0])
    offsets = np.array(offsets)
    assert offsets.min() == 0 and offsets.max() == 4 and len(set(map(tuple, offsets))) > 10


def test_flip_and_per_key_determinism():
    images, keys = _images(32), jax.random.split(jax.random.key(2), 32)
    out = np.asarray(augment(images, keys, crop_padding=0, flip=True))
    x = np.asarray(images)
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x, strict=True)])
    same = np.array([np.array_equal(o, i) for o, i in zip(out, x, strict=True)])
    assert (flipped ^ same).all() and 4 < flipped.sum() < 28
    # Same keys, same result; each example depends only on its own key.
    aug = jax.jit(functools.partial(augment, crop_padding=2, flip=True))
    again = aug(images, keys)
    np.testing.assert_array_equal(again, aug(images, keys))
    reordered = aug(images[::-1], keys[::-1])
    np.testing.assert_array_equal(reordered[::-1], again)
    mixed = aug(images.at[:16].set(0.0), keys)  # Other examples' content changes nothing.
    np.testing.assert_array_equal(mixed[16:], again[16:])


def _np_rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Counter-clockwise nearest-neighbour rotation about the centre, zero fill, by inverse
    mapping in float64 (PIL's Image.rotate, which torchvision's RandomRotation calls): output
    pixel (i, j) reads input (floor(v), floor(u)), x = j + 0.5 - W/2, y = i + 0.5 - H/2,
    u = cos(a) x - sin(a) y + W/2, v = sin(a) x + cos(a) y + H/2."""
    h, w = image.shape[:2]
    a = np.deg2rad(degrees)
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x, y = j + 0.5 - w / 2, i + 0.5 - h / 2
    u = np.floor(np.cos(a) * x - np.sin(a) * y + w / 2).astype(int)
    v = np.floor(np.sin(a) * x + np.cos(a) * y + h / 2).astype(int)
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    out = image[np.clip(v, 0, h - 1), np.clip(u, 0, w - 1)]
    return np.where(inside[..., None], out, 0)


@pytest.mark.parametrize("degrees", [0.0, 10.0, -15.0, 7.3, -3.21, 90.0])
def test_rotate_equals_inverse_mapping(degrees):
    # Every pixel distinct and non-zero, so each output pixel names its source (or the fill).
    image = (np.arange(32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3) + 1) / (32 * 32 * 3)
    ours = np.asarray(jax.jit(rotate)(jnp.asarray(image), degrees))
    expected = _np_rotate(image, degrees)
    np.testing.assert_array_equal(ours, expected)
    if degrees == 90.0:  # a quarter turn counter-clockwise is exact: np.rot90
        np.testing.assert_array_equal(ours, np.rot90(image))
    if degrees == 10.0:
        assert (expected == 0).all(-1).sum() == 72  # the corners are zero-filled


def test_rotate_equals_pil_when_available():
    pil = pytest.importorskip("PIL.Image")
    pattern = (np.arange(32 * 32).reshape(32, 32) % 251 + 1).astype(np.uint8)
    for degrees in (12.5, -14.0, 3.7):
        expected = np.asarray(
            pil.fromarray(pattern).rotate(degrees, resample=pil.NEAREST, fillcolor=0)
        )
        ours = np.asarray(rotate(jnp.asarray(pattern, jnp.float32)[..., None], degrees))[..., 0]
        # PIL walks the output rows with accumulated increments; where the exact source
        # coordinate is within 1e-3 of a pixel edge its rounding may pick the neighbour.
        a = np.deg2rad(degrees)
        i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
        x, y = j + 0.5 - 16, i + 0.5 - 16
        u, v = np.cos(a) * x - np.sin(a) * y + 16, np.sin(a) * x + np.cos(a) * y + 16
        tie = (np.abs(u - np.round(u)) < 1e-3) | (np.abs(v - np.round(v)) < 1e-3)
        differ = ours != expected
        assert not (differ & ~tie).any() and differ.sum() <= 2


def test_random_rotation_angles_within_degrees():
    # One bright pixel 30.5 pixels above the centre of a 64x64 image: after a counter-clockwise
    # rotation by a it sits at angle a to the left of the vertical (to within ~1 degree).
    image = np.zeros((64, 64, 1), np.float32)
    image[1, 32] = 1.0
    images = jnp.asarray(np.repeat(image[None], 64, 0))
    keys = jax.random.split(jax.random.key(3), 64)
    aug = jax.jit(functools.partial(augment, crop_padding=0, flip=False, rotation_degrees=15.0))
    out = np.asarray(aug(images, keys))
    angles = []
    for o in out:
        i, j = np.mean(np.nonzero(o[..., 0]), axis=1)  # nearest may copy the pixel twice
        angles.append(np.rad2deg(np.arctan2(32 - (j + 0.5), 32 - (i + 0.5))))
    angles = np.array(angles)
    assert np.abs(angles).max() <= 15.0 + 1.5
    assert np.abs(angles).max() > 12.0  # the whole range is used
    assert (angles > 3).sum() > 10 and (angles < -3).sum() > 10
    np.testing.assert_array_equal(aug(images, keys), out)
    assert augment(images, keys, crop_padding=0, flip=False, rotation_degrees=0.0) is images


def test_dataset_info_is_what_loading_gives(digits_dataset):
    # The loaders' constants (read without any data) against the loaded dataset.
    assert data.dataset_info(_config()) == digits_dataset.info


def test_cifar_dataset_info(mock_tfds):
    with mock_tfds(num_examples=40):
        ds = data.get_dataset(_config(name="cifar100", num_validation=8, data_dir="/nowhere"))
    info = data.dataset_info(_config(name="cifar100", num_validation=8))
    assert dataclasses.replace(info, num_train=len(ds.train)) == ds.info  # the mock holds 40
    assert info.num_train == 50000 - 8  # CIFAR's train split, less the held-out validation
