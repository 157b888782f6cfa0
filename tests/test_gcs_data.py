"""`config.dataset.data_dir` (CIFAR python archives) and `config.dataset.ddpm_path` (.npz) on
gs:// (the local GCS emulator): the arrays that arrive are the ones the test wrote, each object
is downloaded once per cache, and a missing, corrupt or badly transferred object is one line
naming its gs:// path.

Objects are uploaded with google-cloud-storage, not the gcsfs client under test.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
from test_cifar_archive import BATCH, _concat, _config, _make

from score_jax import data
from score_jax.data import cifar_archive, ddpm, remote
from score_jax.errors import DataError


@pytest.fixture
def prefix(gcs_bucket, request, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    return f"{gcs_bucket}/{request.node.originalname}-{uuid.uuid4().hex[:8]}"


def _upload_file(path: str, url: str) -> None:
    from google.cloud import storage

    bucket, name = url.removeprefix("gs://").split("/", 1)
    storage.Client().bucket(bucket).blob(name).upload_from_filename(path)


def _upload_tree(local: str, url: str) -> None:
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            _upload_file(path, f"{url}/{os.path.relpath(path, local)}")


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """The URLs `remote` downloads, in order."""
    calls: list[str] = []
    download = remote._download

    def counted(url, *args):
        calls.append(url)
        return download(url, *args)

    monkeypatch.setattr(remote, "_download", counted)
    return calls


@pytest.mark.parametrize("form", ["tar.gz", "folder", "parent of tar.gz", "parent of folder"])
def test_cifar_from_gcs_arrives_exactly_and_downloads_once(tmp_path, prefix, downloads, form):
    src = tmp_path / "src"
    src.mkdir()
    path, truth = _make(src, "cifar10", np.random.default_rng(2), tar="tar" in form)
    layout = cifar_archive.LAYOUTS["cifar10"]
    if "tar" in form:
        _upload_file(path, f"{prefix}/{layout.archive}")
    else:
        _upload_tree(path, f"{prefix}/{layout.folder}")
    url = prefix if form.startswith("parent") else f"{prefix}/{os.path.basename(path)}"
    nv = BATCH + 2
    ds = data.get_dataset(_config("cifar10", url, num_validation=nv))
    train_x, train_y = _concat(truth, layout.train)
    test_x, test_y = _concat(truth, layout.test)
    np.testing.assert_array_equal(ds.validation.images, train_x[:nv])
    np.testing.assert_array_equal(ds.train.images, train_x[nv:])
    np.testing.assert_array_equal(ds.train.labels, train_y[nv:])
    np.testing.assert_array_equal(ds.test.images, test_x)
    np.testing.assert_array_equal(ds.test.labels, test_y)
    expected = 1 if "tar" in form else len(layout.train) + len(layout.test)
    assert len(downloads) == expected
    data.get_dataset(_config("cifar10", url, num_validation=nv))  # the cached copies
    assert len(downloads) == expected


def test_ddpm_from_gcs_is_memory_mapped_and_downloaded_once_per_version(
    tmp_path, prefix, downloads
):
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(40) % 10
    np.savez(tmp_path / "gen.npz", image=images, label=labels)
    url = f"{prefix}/ddpm/gen.npz"
    _upload_file(str(tmp_path / "gen.npz"), url)
    split = ddpm.load_generated(url, 10, (8, 8, 1))
    assert isinstance(split.images, np.memmap)
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)
    ddpm.load_generated(url, 10, (8, 8, 1))
    assert downloads == [url]
    # A new version of the object (another generation, other bytes) is downloaded again.
    np.savez(tmp_path / "gen.npz", image=images[::-1].copy(), label=labels[::-1].copy())
    _upload_file(str(tmp_path / "gen.npz"), url)
    split = ddpm.load_generated(url, 10, (8, 8, 1))
    np.testing.assert_array_equal(split.images, images[::-1])
    assert downloads == [url, url]
    # A local copy changed behind the cache's back (size or mtime) is replaced.
    with open(remote.local_path(url), "ab") as f:
        f.write(b"junk")
    split = ddpm.load_generated(url, 10, (8, 8, 1))
    np.testing.assert_array_equal(split.images, images[::-1])
    assert downloads == [url, url, url]


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_objects_are_one_line(tmp_path, prefix):
    with pytest.raises(DataError) as info:
        ddpm.load_generated(f"{prefix}/none.npz", 10, (8, 8, 1))
    assert _one_line(info) == (
        f"{prefix}/none.npz (DDPM data, config.dataset.ddpm_path): no such object"
    )
    with pytest.raises(DataError) as info:
        data.get_dataset(_config("cifar10", f"{prefix}/cifar-10-python.tar.gz"))
    assert _one_line(info) == (
        f"config.dataset.data_dir='{prefix}/cifar-10-python.tar.gz': no such archive"
    )
    # An extracted folder that lacks a batch file.
    path, _ = _make(tmp_path, "cifar10", np.random.default_rng(3), tar=False)
    os.remove(os.path.join(path, "test_batch"))
    _upload_tree(path, f"{prefix}/cifar-10-batches-py")
    with pytest.raises(DataError) as info:
        data.get_dataset(_config("cifar10", prefix))
    assert _one_line(info) == (
        f"{prefix}/cifar-10-batches-py/test_batch (config.dataset.data_dir): no such object"
    )
    assert not os.path.exists(tmp_path / "cache" / "gs" / "none.npz")


def test_corrupt_objects_are_one_line_naming_the_object(tmp_path, prefix):
    images = np.zeros((300, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "gen.npz", image=images, label=np.arange(300) % 10)
    raw = bytearray((tmp_path / "gen.npz").read_bytes())
    raw[2000:2004] = b"\xff\xfe\xfd\xfc"  # inside image.npy's pixels: its CRC-32 fails
    (tmp_path / "gen.npz").write_bytes(bytes(raw))
    _upload_file(str(tmp_path / "gen.npz"), f"{prefix}/gen.npz")
    with pytest.raises(DataError) as info:
        ddpm.load_generated(f"{prefix}/gen.npz", 10, (8, 8, 1))
    assert _one_line(info).startswith(f"DDPM data '{prefix}/gen.npz' (config.dataset.ddpm_path)")
    assert "field 'image' fails its zip CRC-32 check" in str(info.value)

    archive, _ = _make(tmp_path / "a", "cifar10", np.random.default_rng(4), tar=True)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(open(archive, "rb").read()[:3000])
    url = f"{prefix}/cifar-10-python.tar.gz"
    _upload_file(str(cut), url)
    with pytest.raises(DataError) as info:
        data.get_dataset(_config("cifar10", url))
    assert _one_line(info).startswith(f"{url}: truncated or not a tar archive")
    assert str(tmp_path / "cache") not in str(info.value)


def test_a_download_that_does_not_match_the_objects_md5_is_not_kept(tmp_path, prefix, monkeypatch):
    """What a transfer that corrupts bytes looks like: the checksum GCS reports is another's."""
    np.savez(tmp_path / "gen.npz", image=np.zeros((4, 8, 8, 1), np.uint8), label=np.arange(4))
    url = f"{prefix}/gen.npz"
    _upload_file(str(tmp_path / "gen.npz"), url)
    info = remote._info(url, "test")
    wrong = {**info, "md5Hash": "AAAAAAAAAAAAAAAAAAAAAA=="}  # 16 zero bytes
    with monkeypatch.context() as m:
        m.setattr(remote, "_info", lambda u, what: wrong)
        with pytest.raises(DataError) as error:
            ddpm.load_generated(url, 10, (8, 8, 1))
    message = _one_line(error)
    assert message.startswith(f"{url} (DDPM data, config.dataset.ddpm_path): the download does")
    assert message.endswith(f"instead of {'0' * 32}); try again")
    folder = os.path.dirname(remote.local_path(url))
    assert sorted(os.listdir(folder)) == ["gen.npz.lock"]  # no copy, no temporary file
    # The next start, with the true checksum, downloads and reads it.
    assert len(ddpm.load_generated(url, 10, (8, 8, 1)).labels) == 4
