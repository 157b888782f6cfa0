"""A run whose workdir is gs://bucket/... (a local GCS emulator): train, SIGKILL, resume
bit-identically to an uninterrupted local run, evaluate, export; everything lands in the bucket."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import chex
import jax
import pytest
from cli_helpers import OVERRIDES, REPO, digits_tiny_config, xla_flags

from score_jax import checkpoint, trainer, workdir_io

STEPS = 12
RUN = [f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=3"]


def _command(workdir: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "score_jax.main", "--config", "configs/digits.py"]
    return cmd + ["--workdir", workdir, *OVERRIDES, *RUN, "--config.log_every_steps=1", *extra]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4), PYTHONPATH=path)


def _run(workdir: str, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        _command(workdir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _final(workdir: str):
    setup = trainer.Setup(digits_tiny_config(), workdir)
    ckpt = checkpoint.Checkpointer(workdir)
    state, _ = ckpt.restore(setup.state_template())
    ckpt.close()
    state = jax.device_get(state)
    return state.step, state.params, state.ema_params, state.batch_stats, state.opt_state


def _committed_steps(workdir: str) -> list[int]:
    """The steps orbax finished writing (on GCS it marks each with commit_success.txt)."""
    steps = [n for n in workdir_io.listdir(f"{workdir}/checkpoints") if n.isdigit()]
    return [
        int(n) for n in steps if workdir_io.exists(f"{workdir}/checkpoints/{n}/commit_success.txt")
    ]


def _train_lines(workdir: str) -> list[str]:
    text = workdir_io.read_text(workdir_io.join(workdir, trainer.METRICS_FILE))
    return [line for line in text.splitlines() if '"train/' in line]


@pytest.mark.slow
def test_train_kill_resume_evaluate_export_on_gcs(gcs_bucket, tmp_path):
    remote = f"{gcs_bucket}/run-{uuid.uuid4().hex[:8]}"
    straight = str(tmp_path / "straight")
    # The uninterrupted local run first: the runs below then load its compiled programs from the
    # session's persistent compilation cache (conftest.py) instead of compiling them again.
    _run(straight)
    log = tmp_path / "killed.log"  # a file, not an unread pipe, whose 64 KiB would stall the run
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _command(remote), cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 300
        while not _committed_steps(remote):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # most likely in the middle of the next save
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # SIGKILL left the lock object behind (no fcntl on GCS): the rerun is refused in one line
    # saying how to delete it; deleted, the run resumes.
    refused = subprocess.run(_command(remote), cwd=REPO, env=_env(), capture_output=True, text=True)
    assert refused.returncode != 0 and "is in use by another run" in refused.stderr
    assert f"gcloud storage rm {remote}/run.lock" in refused.stderr
    workdir_io.remove(f"{remote}/run.lock")
    resumed = _run(remote)
    assert "Resuming from gs://" in resumed.stdout
    assert not workdir_io.exists(f"{remote}/run.lock")  # released at the end

    (step_a, *a), (step_b, *b) = _final(remote), _final(straight)
    assert step_a == step_b == STEPS
    chex.assert_trees_all_equal(a, b)
    assert _train_lines(remote) == _train_lines(straight)

    evaluated = _run(remote, "--mode", "eval")
    assert f"best checkpoint (step {STEPS})" in evaluated.stdout
    results = workdir_io.read_json(f"{remote}/{trainer.RESULTS_FILE}")
    assert results["step"] == STEPS and results["test_ema"]["num_examples"] == 360
    config = json.loads(workdir_io.read_text(f"{remote}/config.json"))
    assert config["num_train_steps"] == STEPS
    events = workdir_io.listdir(f"{remote}/tensorboard")
    assert events and all(n.startswith("events.out.tfevents.") for n in events)

    pytest.importorskip("torch")
    from score_jax.torch_bridge import export

    _run(remote, "--mode", "export")
    assert workdir_io.listdir(f"{remote}/export") == ["model.json", "model.pt"]
    meta = export.read_meta(f"{remote}/export")
    assert meta["sha256"] == workdir_io.sha256(f"{remote}/export/model.pt")
    assert meta["architecture"] == digits_tiny_config().model.name and meta["step"] == STEPS
    export.load_exported(f"{remote}/export")  # loads the state dict strictly
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing landed in the cwd
