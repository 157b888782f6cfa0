"""CIFAR-10/100 from the official python-version archives (score_jax.data.cifar_archive).

The archives are built here in the layout the CIFAR page documents: per batch a pickled dict with
bytes keys, b"data" uint8 N x 3072 (the 1024 red values of the image, then green, then blue, each
32 x 32 plane row-major) and b"labels" (CIFAR-10) or b"fine_labels" + b"coarse_labels"
(CIFAR-100), pickled as Python 2's cPickle wrote the real files. The expected arrays are the
images the test encoded, so any mix-up of rows, columns, channels, batches or label keys fails.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pytest
from cli_helpers import OVERRIDES, REPO

from score_jax import data
from score_jax.data import cifar_archive
from score_jax.errors import DataError

BATCH = 6  # images per CIFAR-10 training batch file here (10000 in the real archive)
TEST = 5


def _encode(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 -> N x 3072 as the CIFAR page describes the rows (element by element)."""
    rows = np.empty((len(images), 3072), np.uint8)
    for n, image in enumerate(images):
        for ch in range(3):
            for r in range(32):
                for c in range(32):
                    rows[n, ch * 1024 + r * 32 + c] = image[r, c, ch]
    return rows


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the archives: protocol 2, every str and bytes a Python
    2 str (BINSTRING, read back as bytes), numpy's functions under `numpy.core`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_str
    dispatch[bytes] = _save_str

    def save_global(self, obj, name=None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _dump(path, obj) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _make(root, name: str, rng: np.random.Generator, tar: bool) -> tuple[str, dict]:
    """Writes a tiny archive (tar.gz) or extracted folder; returns its path and the truth."""
    layout = cifar_archive.LAYOUTS[name]
    folder = os.path.join(root, layout.folder)
    os.makedirs(folder)
    truth = {}
    sizes = {f: BATCH for f in layout.train} if name == "cifar10" else {"train": 5 * BATCH}
    sizes.update({f: TEST for f in layout.test})
    for file, n in sizes.items():
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, layout.num_classes, n)
        batch = {b"batch_label": file.encode(), b"data": _encode(images)}
        batch[b"filenames"] = [b"img_%d.png" % i for i in range(n)]
        if name == "cifar10":
            batch[b"labels"] = fine.tolist()
        else:
            batch[b"fine_labels"] = fine.tolist()
            batch[b"coarse_labels"] = (fine // 5 + 1).tolist()  # differs from fine: not read
        _dump(os.path.join(folder, file), batch)
        truth[file] = (images, fine)
    meta = (
        {b"label_names": [b"c%d" % i for i in range(10)]}
        if name == "cifar10"
        else {b"fine_label_names": [b"f"] * 100, b"coarse_label_names": [b"c"] * 20}
    )
    _dump(os.path.join(folder, layout.meta), meta)
    if not tar:
        return folder, truth
    archive = os.path.join(root, layout.archive)
    with tarfile.open(archive, "w:gz") as t:
        t.add(folder, arcname=layout.folder)
    for file in os.listdir(folder):
        os.remove(os.path.join(folder, file))
    os.rmdir(folder)
    return archive, truth


def _concat(truth: dict, files) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([truth[f][0] for f in files]),
        np.concatenate([truth[f][1] for f in files]),
    )


def _config(name: str, data_dir, num_validation: int = 4, order: str = "auto"):
    return ml_collections.ConfigDict(
        dict(
            name=name,
            data_dir=str(data_dir),
            num_validation=num_validation,
            validation_order=order,
            ddpm_path="",
            real_fraction=1.0,
        )
    )


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["tar.gz", "folder", "parent of tar.gz", "parent of folder"])
def test_pixels_and_labels_arrive_exactly(tmp_path, name, form):
    path, truth = _make(tmp_path, name, np.random.default_rng(1), tar="tar" in form)
    data_dir = tmp_path if form.startswith("parent") else path
    layout = cifar_archive.LAYOUTS[name]
    nv = BATCH + 2  # crosses the boundary between the first two CIFAR-10 batch files
    ds = data.get_dataset(_config(name, data_dir, num_validation=nv))
    train_x, train_y = _concat(truth, layout.train)
    test_x, test_y = _concat(truth, layout.test)
    assert (ds.name, ds.num_classes, ds.image_shape) == (name, layout.num_classes, (32, 32, 3))
    for split, (x, y) in (
        (ds.validation, (train_x[:nv], train_y[:nv])),
        (ds.train, (train_x[nv:], train_y[nv:])),
        (ds.test, (test_x, test_y)),
    ):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        np.testing.assert_array_equal(split.images, x)
        np.testing.assert_array_equal(split.labels, y)
    assert len(ds.train) + len(ds.validation) == 5 * BATCH and len(ds.test) == TEST


def test_orientation_of_a_drawn_image(tmp_path):
    """Red top row, green left column, blue at row 1 / column 2: read back where drawn."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    image = np.zeros((32, 32, 3), np.uint8)
    image[0, :, 0] = 255
    image[:, 0, 1] = 200
    image[1, 2, 2] = 100
    rows = np.zeros((BATCH, 3072), np.uint8)
    rows[0, :32] = 255  # red plane, row 0
    rows[0, 1024:2048:32] = 200  # green plane, column 0
    rows[0, 2048 + 1 * 32 + 2] = 100  # blue plane, row 1, column 2
    np.testing.assert_array_equal(rows[:1], _encode(image[None]))  # the test's two encodings agree
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _dump(folder / file, {b"data": rows, b"labels": [3] * BATCH})
    ds = data.get_dataset(_config("cifar10", folder, num_validation=1))
    np.testing.assert_array_equal(ds.validation.images[0], image)


def _shuffler_order(tmp_path, split: str, n: int) -> list[int]:
    """The order TFDS's own Shuffler (what `tfds build` writes the records with) gives 0..n-1."""
    from tensorflow_datasets.core import shuffle

    shuffler = shuffle.Shuffler(str(tmp_path), hash_salt=split)
    for i in range(n):
        shuffler.add(i, str(i).encode())  # the CIFAR builder's key is the file-order index
    return [int(record) for _, record in shuffler]


def test_tfds_order_is_the_tfds_writers(tmp_path):
    for split, n in (("train", 300), ("test", 50)):
        expected = _shuffler_order(tmp_path, split, n)
        np.testing.assert_array_equal(cifar_archive.tfds_order(split, n), expected)

    path, truth = _make(tmp_path / "a", "cifar10", np.random.default_rng(2), tar=True)
    ds = data.get_dataset(_config("cifar10", path, num_validation=4, order="tfds"))
    layout = cifar_archive.LAYOUTS["cifar10"]
    train_x, train_y = _concat(truth, layout.train)
    test_x, _ = _concat(truth, layout.test)
    perm = _shuffler_order(tmp_path, "train", len(train_y))
    np.testing.assert_array_equal(ds.validation.images, train_x[perm[:4]])
    np.testing.assert_array_equal(ds.train.labels, train_y[perm[4:]])
    np.testing.assert_array_equal(ds.test.images, test_x[_shuffler_order(tmp_path, "test", TEST)])


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_file_order_with_tfds_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="validation_order='file'") as info:
        data.get_dataset(_config("cifar10", tmp_path, order="file"))
    assert "cifar-10-python.tar.gz" in _one_line(info)


def test_not_prepared_gives_recipes_that_work(tmp_path):
    with pytest.raises(DataError) as info:
        data.get_dataset(_config("cifar100", tmp_path / "empty"))
    message = _one_line(info)
    for part in ("cifar-100-python.tar.gz", "pip install tensorflow-cpu", "tfds build cifar100"):
        assert part in message


def _rewrite(folder, file: str, **changes) -> None:
    with open(folder / file, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch.update({k.encode(): v for k, v in changes.items()})
    _dump(folder / file, batch)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _damage(folder, case: str) -> None:
    if case == "wrong shape":
        _rewrite(folder, "data_batch_2", data=np.zeros((BATCH, 3000), np.uint8))
    elif case == "wrong dtype":
        _rewrite(folder, "data_batch_1", data=np.zeros((BATCH, 3072), np.int64))
    elif case == "label out of range":
        _rewrite(folder, "test_batch", labels=[0, 1, 2, 3, 10])
    elif case == "labels too few":
        _rewrite(folder, "data_batch_4", labels=[1, 2])
    elif case == "missing file":
        os.remove(folder / "data_batch_3")
    elif case == "not a pickle":
        (folder / "data_batch_5").write_bytes(b"garbage")
    elif case == "code in the pickle":
        _dump(folder / "data_batch_1", {b"data": _Evil(), b"labels": []})


BAD = [  # case, the file the message must name, what it must say
    ("wrong shape", "data_batch_2", r"\(6, 3000\)"),
    ("wrong dtype", "data_batch_1", "uint8"),
    ("label out of range", "test_batch", r"out of range \[0, 10\)"),
    ("labels too few", "data_batch_4", "6 integers"),
    ("missing file", "data_batch_3", "missing batch file"),
    ("not a pickle", "data_batch_5", "not a CIFAR"),
    ("code in the pickle", "data_batch_1", "refuses to load posix.system"),
]


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "tar.gz"])
@pytest.mark.parametrize("case,file,match", BAD, ids=[b[0] for b in BAD])
def test_bad_files_are_one_line_naming_the_file(tmp_path, case, file, match, tar):
    folder, _ = _make(tmp_path, "cifar10", np.random.default_rng(3), tar=False)
    _damage(tmp_path / "cifar-10-batches-py", case)
    path = folder
    if tar:
        path = str(tmp_path / "cifar-10-python.tar.gz")
        with tarfile.open(path, "w:gz") as t:
            t.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match=match) as info:
        data.get_dataset(_config("cifar10", path))
    message = _one_line(info)
    assert file in message and path in message


def test_truncated_archive(tmp_path):
    path, _ = _make(tmp_path, "cifar10", np.random.default_rng(4), tar=True)
    with open(path, "rb") as f:
        head = f.read()
    with open(path, "wb") as f:
        f.write(head[: len(head) // 2])
    with pytest.raises(DataError, match="truncated") as info:
        data.get_dataset(_config("cifar10", path))
    assert path in _one_line(info)


def test_wrong_dataset_and_missing_archive(tmp_path):
    folder, _ = _make(tmp_path, "cifar10", np.random.default_rng(5), tar=False)
    with pytest.raises(DataError, match="cifar-10-batches-py.*config.dataset.name='cifar100'"):
        data.get_dataset(_config("cifar100", tmp_path))
    with pytest.raises(DataError, match="cifar-10-batches-py.*config.dataset.name='cifar100'"):
        data.get_dataset(_config("cifar100", folder))
    with pytest.raises(DataError, match="no such archive"):
        data.get_dataset(_config("cifar10", tmp_path / "cifar-10-python.tar.gz"))


def test_cli_trains_cifar10_basic_from_an_archive_without_tensorflow(tmp_path):
    """`python -m score_jax.main --config configs/cifar10_basic.py` on a tiny archive, with neither
    TensorFlow nor tensorflow_datasets (nor torch) imported."""
    archive, _ = _make(tmp_path, "cifar10", np.random.default_rng(6), tar=True)
    workdir = tmp_path / "run"
    modules_file = tmp_path / "modules.json"
    small_cnn_only = ("--config.model.width", "--config.model.hidden")
    overrides = [o for o in OVERRIDES if not o.startswith(small_cnn_only)]
    argv = [
        "score_jax.main",
        "--config",
        "configs/cifar10_basic.py",
        "--workdir",
        str(workdir),
        f"--config.dataset.data_dir={archive}",
        "--config.dataset.num_validation=8",
        "--config.model.name=small-cnn",
        *overrides,
        "--verbosity=0",  # INFO: the "Training ..." line
    ]
    code = (
        "import json, runpy, sys\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        "    runpy.run_module('score_jax.main', run_name='__main__')\n"
        "finally:\n"
        f"    json.dump(sorted(sys.modules), open({str(modules_file)!r}, 'w'))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # train_cifar.py's epoch, ceil(50000 / batch) steps, whatever the archive holds (30 images).
    assert "for 3 steps (3125 per epoch)" in out.stderr  # batch 16 (OVERRIDES)
    modules = set(json.load(open(modules_file)))
    assert "score_jax.data.cifar_archive" in modules
    assert "tensorflow" not in modules and "tensorflow_datasets" not in modules
    assert "torch" not in modules  # TensorBoard's tensorboardX is imported without it
    results = json.load(open(workdir / "results.json"))
    assert results["step"] == 3
    config = json.load(open(workdir / "config.json"))
    assert config["dataset"]["data_dir"] == archive
