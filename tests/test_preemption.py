"""Preemption: SIGTERM saves and exits 0; SIGKILL at any moment, also while a checkpoint is being
written; resuming is bit-identical to an uninterrupted run (4 devices and 1 device)."""

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import chex
import jax
import pytest
from cli_helpers import OVERRIDES, REPO, digits_tiny_config, xla_flags

from score_jax import checkpoint, trainer

STEPS = 24
RUN = [f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=3"]


def _env(devices: int = 4) -> dict[str, str]:
    # The repository on the path: tests/kill_during_save.py runs as a script, not with -m.
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), PYTHONPATH=path)


def _command(workdir, program: tuple[str, ...] = ("-m", "score_jax.main")) -> list[str]:
    cmd = [sys.executable, *program, "--config", "configs/digits.py"]
    return cmd + ["--workdir", str(workdir), *OVERRIDES, *RUN, "--config.log_every_steps=1"]


@pytest.fixture
def background():
    """start(command, devices=4) -> Popen of the command, its output (stdout and stderr) going to
    a file, `_output(proc)`; any still running when the test ends (a failed assertion) is killed.
    A file, not a pipe: the test does not read while it waits for steps, and a child that filled
    an unread pipe's 64 KiB would stop at its next write."""
    procs: list[subprocess.Popen] = []

    def start(command: list[str], devices: int = 4) -> subprocess.Popen:
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            command, cwd=REPO, env=_env(devices), stdout=log, stderr=subprocess.STDOUT
        )
        proc.log = log
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.log.close()


def _output(proc: subprocess.Popen, timeout: float | None = None) -> str:
    """What `proc` (started by `background`) wrote, once it exits (within `timeout` s)."""
    proc.wait(timeout=timeout)
    proc.log.seek(0)
    return proc.log.read()


def _wait_for_steps(workdir, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    """Waits until metrics.jsonl has a record of `step` or later (training is under way); its
    line count is no clock, since a logged step may write several lines."""
    path = os.path.join(workdir, trainer.METRICS_FILE)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended early:\n{_output(proc)[-2000:]}")
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line).get("step", 0) for line in f if line.endswith("\n")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("training did not start in time")


def _final(workdir):
    config = digits_tiny_config()
    config.num_train_steps = STEPS
    setup = trainer.Setup(config, str(workdir))
    ckpt = checkpoint.Checkpointer(str(workdir))
    step = ckpt.latest_step()
    state, _ = ckpt.restore(setup.state_template())
    ckpt.close()
    state = jax.device_get(state)
    arrays = (state.step, state.params, state.ema_params, state.batch_stats, state.opt_state)
    return step, arrays


def _train_lines(workdir):
    with open(os.path.join(workdir, trainer.METRICS_FILE)) as f:
        return [line for line in f if '"train/' in line]


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_is_bit_identical(tmp_path, background):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    # The uninterrupted run first: the runs below then load its compiled programs from the
    # session's persistent compilation cache (conftest.py) instead of compiling them again.
    reference = background(_command(straight))
    out = _output(reference, timeout=300)
    assert reference.returncode == 0, out[-2000:]
    assert f"step {STEPS}/{STEPS}: adv_accuracy " in out and " images/s" in out  # progress lines

    proc = background(_command(interrupted))
    _wait_for_steps(interrupted, proc, 4)
    proc.send_signal(signal.SIGTERM)
    out = _output(proc, timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "Preempted (SIGTERM) at step" in out and "same command" in out
    ckpt = checkpoint.Checkpointer(str(interrupted))
    term_step = ckpt.latest_step()
    ckpt.close()
    assert term_step is not None and 4 <= term_step < STEPS

    proc = background(_command(interrupted))  # resumes, then dies without warning
    _wait_for_steps(interrupted, proc, term_step + 3)
    proc.kill()
    proc.wait()

    # resumes from the newest complete checkpoint and finishes
    proc = background(_command(interrupted))
    out = _output(proc, timeout=300)
    assert proc.returncode == 0, out[-2000:]

    (step_a, a), (step_b, b) = _final(interrupted), _final(straight)
    assert step_a == step_b == STEPS
    chex.assert_trees_all_equal(a, b)  # params, EMA, BatchNorm statistics, optimizer state
    assert _train_lines(interrupted) == _train_lines(straight)


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_then_resume_is_bit_identical_on_one_device(tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    killer = ("tests/kill_during_save.py", "9")  # SIGKILL once step 9's save is under way
    run = functools.partial(subprocess.run, cwd=REPO, env=_env(1), capture_output=True, text=True)
    reference = run(_command(straight), timeout=300)  # first: the runs below reuse its compiles
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = run(_command(interrupted, killer), timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = checkpoint.Checkpointer(str(interrupted))
    assert ckpt.latest_step() == 6  # the half-written step 9 is not a checkpoint
    ckpt.close()
    partial = [n for n in os.listdir(interrupted / "checkpoints") if n.startswith("9.")]
    assert partial and "tmp" in partial[0]  # it died mid-write: orbax's temporary directory

    resumed = run(_command(interrupted), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout and "(step 6)" in resumed.stdout
    (step_a, a), (step_b, b) = _final(interrupted), _final(straight)
    assert step_a == step_b == STEPS
    chex.assert_trees_all_equal(a, b)
    assert _train_lines(interrupted) == _train_lines(straight)
