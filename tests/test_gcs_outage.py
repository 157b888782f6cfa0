"""A gs:// run whose storage endpoint dies (the emulator SIGKILLed mid-run) ends within
--storage_timeout_s with one line naming the path, also when SIGTERM arrives during the outage,
and a later run resumes from the last complete checkpoint.

Its own emulator (not the session's `gcs_bucket`: this one is killed), with a filesystem root so
that the objects outlive the process, started again on the same port.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from cli_helpers import OVERRIDES, REPO
from gcs_emulator import GcsEmulator, client_env

TIMEOUT_S = 5  # --storage_timeout_s of these runs (the default is 300)
# The bound: the watchdog fires TIMEOUT_S after the hung call started (polling every 0.2 s);
# 5 s for the loaded 2-core machine (the clients alone retry for minutes).
BOUND_S = TIMEOUT_S + 5
WORKDIR = "gs://bucket/run"


def _objects(emulator: GcsEmulator, prefix: str) -> list[str]:
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/bucket/o?{query}", timeout=5) as r:
        return [item["name"] for item in json.load(r).get("items", [])]


def _committed(emulator: GcsEmulator) -> list[int]:
    """The checkpoint steps orbax finished writing (it marks each with commit_success.txt)."""
    try:
        names = _objects(emulator, "run/checkpoints/")
    except OSError:
        return []
    parts = [n.split("/") for n in names]  # run/checkpoints/<step>/commit_success.txt
    return sorted(int(p[2]) for p in parts if len(p) == 4 and p[3] == "commit_success.txt")


def _start(emulator: GcsEmulator, log: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "score_jax.main", "--config", "configs/digits.py"]
    cmd += ["--workdir", WORKDIR, *OVERRIDES, f"--storage_timeout_s={TIMEOUT_S}"]
    cmd += ["--config.num_train_steps=100000", "--config.checkpoint_every_steps=3"]
    cmd += ["--config.log_every_steps=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **client_env(emulator.url))
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, log: str, done, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        text = open(log).read()
        assert proc.poll() is None, text[-3000:]
        assert time.monotonic() < deadline, f"{what}: not in time; {text[:2000]} ... {text[-1000:]}"
        time.sleep(0.1)


def _ends_within_the_bound(proc: subprocess.Popen, log: str) -> str:
    """Waits (at most BOUND_S) for the run to end; its one error line."""
    start = time.monotonic()
    try:
        proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {BOUND_S} s into the outage") from None
    assert time.monotonic() - start < BOUND_S
    text = open(log).read()
    assert proc.returncode == 1, text[-3000:]
    assert not re.search(r'File ".*score_jax/', text), text[-3000:]  # no score_jax traceback
    lines = re.findall(r"score_jax: error: [^\n]*", text)
    assert len(lines) == 1, text[-3000:]
    return lines[0]


@pytest.mark.slow
def test_storage_outage_ends_the_run_and_a_later_run_resumes(tmp_path):
    emulator = GcsEmulator(root=str(tmp_path / "objects")).start(set_env=False)
    procs = []
    try:
        log_a = str(tmp_path / "a.log")
        procs.append(run := _start(emulator, log_a))
        _wait_for(run, log_a, lambda: _committed(emulator), "a first checkpoint")
        emulator.kill()  # the outage: every request is refused from now on
        line = _ends_within_the_bound(run, log_a)
        assert f"storage of workdir {WORKDIR} did not answer within {TIMEOUT_S} s" in line
        assert re.search(rf"while [a-z ]+ {WORKDIR}\b", line), line  # the call's path
        assert "last complete checkpoint is kept" in line

        emulator.start(set_env=False)  # the storage is back, with what it held
        complete = _committed(emulator)
        assert complete
        # The killed run could not delete its lock object (ObjectLock: delete it, as its error
        # says, before resuming).
        assert "run/run.lock" in _objects(emulator, "run/")
        request = urllib.request.Request(
            f"{emulator.url}/storage/v1/b/bucket/o/run%2Frun.lock", method="DELETE"
        )
        urllib.request.urlopen(request, timeout=5).close()

        log_b = str(tmp_path / "b.log")
        procs.append(run := _start(emulator, log_b))
        resumed = f"Resuming from {WORKDIR}/checkpoints/{complete[-1]} (step {complete[-1]})"
        _wait_for(run, log_b, lambda: resumed in open(log_b).read(), "the resume")
        _wait_for(run, log_b, lambda: _committed(emulator)[-1] > complete[-1], "a new checkpoint")
        # An outage, then the preemption notice: SIGTERM still ends the run within the bound.
        emulator.kill()
        run.send_signal(signal.SIGTERM)
        line = _ends_within_the_bound(run, log_b)
        assert f"storage of workdir {WORKDIR}" in line or f"workdir {WORKDIR}, " in line, line
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        emulator.stop()
