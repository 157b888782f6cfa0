"""score_jax.workdir_io and orbax checkpoints on gs:// (a local GCS emulator) and on local paths.

What a remote write produced is read back with google-cloud-storage, a client independent of
the gcsfs one under test; a local one with plain `open`.
"""

import fcntl
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest

from score_jax import workdir_io
from score_jax.errors import CheckpointError, ScoreError, WorkdirError


@pytest.fixture(params=["local", "gcs"])
def base(request, tmp_path):
    """A fresh directory: under tmp_path, or a fresh prefix of the emulator's bucket."""
    if request.param == "local":
        return str(tmp_path / "run")
    bucket = request.getfixturevalue("gcs_bucket")
    return f"{bucket}/{request.node.originalname}-{uuid.uuid4().hex[:8]}"


def raw_bytes(path) -> bytes | None:
    """The bytes stored at `path`, read without gcsfs (None if there is nothing)."""
    path = os.fspath(path)
    if not workdir_io.is_remote(path):
        return open(path, "rb").read() if os.path.isfile(path) else None
    from google.cloud import storage

    bucket, name = path.removeprefix("gs://").split("/", 1)
    blob = storage.Client().bucket(bucket).blob(name)
    return blob.download_as_bytes() if blob.exists() else None


def raw_names(path) -> list[str]:
    """Names of everything stored under the directory `path`, recursively, read without gcsfs."""
    path = os.fspath(path).rstrip("/")
    if not workdir_io.is_remote(path):
        return sorted(
            os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
        )
    from google.cloud import storage

    bucket, prefix = path.removeprefix("gs://").split("/", 1)
    blobs = storage.Client().list_blobs(bucket, prefix=prefix + "/")
    return sorted(b.name.removeprefix(prefix + "/") for b in blobs)


def test_paths():
    assert workdir_io.is_remote("gs://b/run") and workdir_io.is_remote("s3://b/run")
    assert not workdir_io.is_remote("runs/a") and not workdir_io.is_remote("/tmp/gs:/x")
    assert os.fspath(workdir_io.as_path("runs/a")) == os.path.abspath("runs/a")
    assert os.fspath(workdir_io.join("gs://b/run", "export", "model.pt")) == (
        "gs://b/run/export/model.pt"
    )


def test_write_read_list_remove(base):
    assert not workdir_io.exists(base) and workdir_io.listdir(base) == []
    workdir_io.makedirs(workdir_io.join(base, "export"))
    value = {"b": [1, 2.5, None], "a": {"nested": "é"}}
    workdir_io.write_json_atomic(workdir_io.join(base, "results.json"), value)
    assert json.loads(raw_bytes(f"{base}/results.json")) == value
    assert workdir_io.read_json(f"{base}/results.json") == value
    workdir_io.write_text_atomic(f"{base}/export/config.json", "first")
    workdir_io.write_text_atomic(f"{base}/export/config.json", "second")
    assert raw_bytes(f"{base}/export/config.json") == b"second"
    # Nothing but the targets: no temporary file is left behind.
    assert raw_names(base) == ["export/config.json", "results.json"]
    assert workdir_io.listdir(base) == ["export", "results.json"]
    assert workdir_io.is_dir(base) and workdir_io.is_dir(f"{base}/export")
    assert not workdir_io.is_dir(f"{base}/results.json")
    workdir_io.remove(f"{base}/results.json")
    workdir_io.remove(f"{base}/results.json")  # already gone: nothing to do
    assert not workdir_io.exists(f"{base}/results.json")
    assert raw_names(base) == ["export/config.json"]


def test_read_json_errors(base):
    missing = f"{base}/results.json"
    with pytest.raises(ScoreError, match="results.json does not exist") as e:
        workdir_io.read_json(missing)
    assert missing.removeprefix("gs://") in str(e.value) and "\n" not in str(e.value)
    workdir_io.write_text_atomic(missing, '{"step": 3,')
    with pytest.raises(CheckpointError, match="results.json is not valid JSON") as e:
        workdir_io.read_json(missing, CheckpointError)
    assert "\n" not in str(e.value)


def test_local_file_for_copy_and_sha256(base, tmp_path):
    # 6 MiB: above gcsfs's 5 MiB one-request limit, so the upload is a resumable one.
    data = np.random.default_rng(0).bytes(6 << 20)
    dest = f"{base}/export/model.pt"
    workdir_io.makedirs(f"{base}/export")
    with workdir_io.local_file_for(dest) as local:
        assert not workdir_io.is_remote(local)
        with open(local, "wb") as f:
            f.write(data)
        assert raw_bytes(dest) is None  # not there before the block ends
    assert raw_bytes(dest) == data
    assert workdir_io.sha256(dest) == hashlib.sha256(data).hexdigest()
    with pytest.raises(RuntimeError, match="torch.save failed"):
        with workdir_io.local_file_for(dest) as local:
            with open(local, "wb") as f:
                f.write(b"half")
            raise RuntimeError("torch.save failed")
    assert raw_bytes(dest) == data  # untouched
    assert not os.path.exists(local)
    src = tmp_path / "small.bin"
    src.write_bytes(b"abc")
    workdir_io.copy_local_file_to(src, f"{base}/export/small.bin")
    assert raw_bytes(f"{base}/export/small.bin") == b"abc"
    assert raw_names(f"{base}/export") == ["model.pt", "small.bin"]


def test_metrics_log_resume(base):
    path = f"{base}/metrics.jsonl"
    log = workdir_io.MetricsLog(path)
    log.truncate_after(0)  # a fresh run: nothing there, nothing written
    assert raw_bytes(path) is None
    for step in (10, 20, 30):
        log.append({"step": step, "train/loss": step / 7})
    log.close()
    lines = raw_bytes(path).decode().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": s, "train/loss": s / 7} for s in (10, 20, 30)
    ]
    # A resume from the checkpoint of step 20: step 30 is dropped and logged again.
    log = workdir_io.MetricsLog(path)
    log.truncate_after(20)
    log.append({"step": 30, "val/acc": 0.5})
    log.append({"step": 40, "val/acc": 0.75})
    log.close()
    expected = [{"step": 10, "train/loss": 10 / 7}, {"step": 20, "train/loss": 20 / 7}]
    expected += [{"step": 30, "val/acc": 0.5}, {"step": 40, "val/acc": 0.75}]
    assert [json.loads(line) for line in raw_bytes(path).decode().splitlines()] == expected
    assert workdir_io.MetricsLog(path).read() == expected


def test_metrics_log_retain_through_the_appending_instance(base):
    """A run's writer appends, drops the lines of an earlier test evaluation, appends again:
    what it dropped stays dropped (remote: its in-memory lines are what it rewrites)."""
    path = f"{base}/metrics.jsonl"
    workdir_io.write_text_atomic(path, '{"step": 5, "test/acc": 0.1}\n')
    log = workdir_io.MetricsLog(path)
    log.append({"step": 6, "train/loss": 1.0})
    log.retain(lambda r: not any(k.startswith("test/") for k in r))
    log.append({"step": 6, "test/acc": 0.2})
    log.close()
    assert raw_bytes(path) == b'{"step": 6, "train/loss": 1.0}\n{"step": 6, "test/acc": 0.2}\n'


def test_metrics_log_torn_and_corrupt_lines(base):
    path = f"{base}/metrics.jsonl"
    # A write cut short by a crash leaves a torn last line: dropped, the rest kept.
    workdir_io.write_text_atomic(path, '{"step": 1}\n{"step": 2}\n{"ste')
    workdir_io.MetricsLog(path).truncate_after(5)
    assert raw_bytes(path) == b'{"step": 1}\n{"step": 2}\n'
    workdir_io.write_text_atomic(path, '{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(WorkdirError, match=r"metrics.jsonl line 2 is not a JSON object"):
        workdir_io.MetricsLog(path).truncate_after(5)


def test_metrics_log_remote_sync_interval(gcs_bucket):
    path = f"{gcs_bucket}/sync-{uuid.uuid4().hex[:8]}/metrics.jsonl"
    log = workdir_io.MetricsLog(path, sync_every_s=3600.0)
    log.append({"step": 1})  # the first append writes: no write yet in this interval
    log.append({"step": 2})
    assert raw_bytes(path) == b'{"step": 1}\n'
    assert log.read() == [{"step": 1}, {"step": 2}]
    log.flush()
    assert raw_bytes(path) == b'{"step": 1}\n{"step": 2}\n'


def _scalars(event_file: bytes) -> list[tuple[int, str, float]]:
    """(step, tag, value) of an event file, parsed from its TFRecord framing."""
    from tensorboardX.proto.event_pb2 import Event

    out, f = [], io.BytesIO(event_file)
    while header := f.read(12):
        (n,) = struct.unpack("<Q", header[:8])
        event = Event.FromString(f.read(n))
        f.read(4)
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return out


def test_summary_writer(base):
    # In a subprocess, as in a run: tensorboardX's GCS writer uploads its file once more at
    # interpreter exit (atexit, __del__), which must happen while the emulator is up.
    code = (
        "import sys; from score_jax import workdir_io as w\n"
        "writer = w.summary_writer(w.join(sys.argv[1], 'tensorboard'))\n"
        "for step in (1, 2, 3):\n"
        "    writer.add_scalar('train/loss', step / 4, step)\n"
        "    writer.flush()\n"
        "writer.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, base], check=True, timeout=120)
    (name,) = raw_names(f"{base}/tensorboard")
    assert name.startswith("events.out.tfevents.")
    scalars = _scalars(raw_bytes(f"{base}/tensorboard/{name}"))
    assert scalars == [(s, "train/loss", s / 4) for s in (1, 2, 3)]
    with pytest.raises(WorkdirError, match="TensorBoard cannot write to az://"):
        workdir_io.summary_writer("az://container/run/tensorboard")


def test_no_fcntl_on_gcs(gcs_bucket):
    """What the workdir lock cannot use on gs://: an epath file there has no file descriptor."""
    path = workdir_io.join(gcs_bucket, f"fcntl-{uuid.uuid4().hex[:8]}", ".lock")
    with path.open("wb") as f:
        with pytest.raises((io.UnsupportedOperation, AttributeError, TypeError)):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_object_lock(gcs_bucket):
    workdir = f"{gcs_bucket}/lock-{uuid.uuid4().hex[:8]}"
    path = f"{workdir}/.lock"
    with workdir_io.ObjectLock(path) as lock:
        holder = json.loads(raw_bytes(path))
        assert holder == lock.owner and holder["pid"] == os.getpid()
        with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {os.getpid()} on"):
            workdir_io.ObjectLock(path).acquire()
    assert raw_bytes(path) is None  # released
    # The lock object of a run that died: the next run is refused until it is deleted.
    workdir_io.write_text_atomic(path, json.dumps({"host": "h", "pid": 1, "time": 0}))
    other = workdir_io.ObjectLock(path)
    with pytest.raises(WorkdirError, match="pid 1 on h since 1970-01-01 .*gcloud storage rm"):
        other.acquire()
    other.release()  # not its lock: left alone
    assert json.loads(raw_bytes(path))["pid"] == 1
    workdir_io.remove(path)
    with workdir_io.ObjectLock(path):
        assert json.loads(raw_bytes(path))["pid"] == os.getpid()
    with pytest.raises(ValueError, match="is local"):
        workdir_io.ObjectLock("/tmp/run/.lock")


def test_object_lock_race(gcs_bucket, monkeypatch):
    """Two runs both see no lock object; the create-only write lets exactly one of them on."""
    path = f"{gcs_bucket}/race-{uuid.uuid4().hex[:8]}/.lock"
    first, second = workdir_io.ObjectLock(path), workdir_io.ObjectLock(path)
    seen = {}
    monkeypatch.setattr(second, "holder", lambda: seen.setdefault("checked", None))
    first.acquire()  # after `second` checked, before it writes
    with pytest.raises(WorkdirError, match=f"in use by another run .*{path}"):
        second.acquire()
    assert json.loads(raw_bytes(path)) == first.owner  # not overwritten
    first.release()


def test_subprocess_writes_are_seen(gcs_bucket):
    """A subprocess reaches the emulator through the inherited environment, and what it writes
    is seen here although this process listed the directory before (gcsfs's listing cache)."""
    workdir = f"{gcs_bucket}/subprocess-{uuid.uuid4().hex[:8]}"
    workdir_io.write_text_atomic(f"{workdir}/config.json", "{}")
    assert workdir_io.listdir(workdir) == ["config.json"]
    code = "import sys; from score_jax import workdir_io as w; w.write_json_atomic(sys.argv[1], 7)"
    subprocess.run([sys.executable, "-c", code, f"{workdir}/results.json"], check=True)
    assert workdir_io.exists(f"{workdir}/results.json")
    assert workdir_io.listdir(workdir) == ["config.json", "results.json"]
    assert workdir_io.read_json(f"{workdir}/results.json") == 7


def _train_state_like():
    """Params, BatchNorm statistics, an optax momentum state, EMA params and a step."""
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(1)
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(8, 10)), jnp.bfloat16)},
    }
    opt_state = optax.sgd(0.1, momentum=0.9).init(params)
    opt_state = jax.tree.map(lambda x: x + 0.25, opt_state)
    return {
        "step": jnp.int32(7),
        "params": params,
        "ema_params": jax.tree.map(lambda x: x * 0.5, params),
        "batch_stats": {"bn": {"mean": jnp.arange(8.0), "var": jnp.full((8,), 2.0)}},
        "opt_state": opt_state,
    }


def _assert_bit_identical(restored, reference) -> None:
    flat_r, tree_r = jax.tree.flatten(restored)
    flat_e, tree_e = jax.tree.flatten(reference)
    assert tree_r == tree_e
    for r, e in zip(flat_r, flat_e, strict=True):
        r, e = np.asarray(r), np.asarray(e)
        assert r.dtype == e.dtype and r.shape == e.shape and r.tobytes() == e.tobytes()


def test_orbax_on_gcs(gcs_bucket):
    """orbax (tensorstore) saves and restores the state under gs://, where workdir_io lists it."""
    import orbax.checkpoint as ocp

    workdir = f"{gcs_bucket}/orbax-{uuid.uuid4().hex[:8]}"
    state = _train_state_like()
    manager = ocp.CheckpointManager(
        workdir_io.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
    )
    for step in (1, 2, 3):
        manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    restored = manager.restore(3, args=ocp.args.StandardRestore(state))
    manager.close()
    _assert_bit_identical(restored, state)
    assert workdir_io.listdir(f"{workdir}/checkpoints") == ["2", "3"]
    assert any(n.startswith("3/") for n in raw_names(f"{workdir}/checkpoints"))


def test_checkpointer_on_gcs(gcs_bucket, tmp_path, monkeypatch):
    from score_jax import checkpoint

    monkeypatch.chdir(tmp_path)  # where a path mistaken for a local one would land
    workdir = f"{gcs_bucket}/checkpointer-{uuid.uuid4().hex[:8]}"
    state = _train_state_like()
    ckpt = checkpoint.Checkpointer(workdir, keep=2)
    try:
        for step in (1, 2, 3):
            ckpt.save(step, state, {"fingerprint": {"seed": 0}, "step": step})
        ckpt.save(2, state, {"step": 2}, best=True)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step(best=True) == 2
        restored, meta = ckpt.restore(state)
        assert {k: v for k, v in meta.items() if k != "checksums"} == {
            "fingerprint": {"seed": 0},
            "step": 3,
        }  # checksums: verified by restore itself (tests/test_bad_inputs.py)
        _assert_bit_identical(restored, state)
    finally:
        ckpt.close()
    assert os.listdir(tmp_path) == []
    assert checkpoint.exists(workdir) and not checkpoint.exists(f"{gcs_bucket}/nothing-here")
    assert {n.split("/")[0] for n in raw_names(workdir)} == {"checkpoints", "best"}
    assert ckpt.step_dir(3) == f"{workdir}/checkpoints/3"


def test_a_missing_bucket_is_named(gcs_bucket):
    """A workdir in a bucket that does not exist: one line saying so (not an upload URL), and no
    bucket is created by the attempt."""
    from score_jax import trainer

    missing = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(WorkdirError, match=rf"the bucket {missing} does not exist") as info:
        trainer._check_writable(f"{missing}/run")
    assert "\n" not in str(info.value) and "upload" not in str(info.value)
    assert not workdir_io.bucket_exists(f"{missing}/run")


def test_storage_failure_line_names_the_failure_and_leaves_bugs_alone():
    """A full disk (local or remote) and a remote store that fails are one line each, naming
    the workdir; anything else (a bug, or a connection error of a local workdir) is None."""
    import errno

    full = OSError(errno.ENOSPC, "No space left on device", "/tmp/run/checkpoints/3/x")
    line = workdir_io.storage_failure_line("/tmp/run", full)
    assert line.startswith("no space left on the device of workdir /tmp/run")
    assert "/tmp/run/checkpoints/3/x" in line and "resumes from it" in line
    down = ConnectionRefusedError("Connect call failed ('127.0.0.1', 1)")
    line = workdir_io.storage_failure_line("gs://b/run", down)
    assert line.startswith("storage of workdir gs://b/run failed (ConnectionRefusedError: ")
    assert workdir_io.storage_failure_line("/tmp/run", down) is None
    assert workdir_io.storage_failure_line("gs://b/run", ValueError("a bug")) is None
