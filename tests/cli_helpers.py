"""Shared helpers for the tests that run `python -m score_jax.main` as a user would."""

import ast
import os
import subprocess
import sys

from score_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/digits.py's JAX AutoAttack at test size: APGD-CE, 2 iterations, 60 examples.
AUTOATTACK_QUICK = {
    "test.autoattack.version": "custom",
    "test.autoattack.attacks": ("apgd-ce",),
    "test.autoattack.apgd_iters": 2,
    "test.autoattack.num_examples": 60,
}
OVERRIDES = [
    "--config.num_train_steps=3",
    "--config.model.width=4",
    "--config.model.hidden=8",
    "--config.model.conv_impl=xla",
    "--config.batch_size=16",
    "--config.eval_batch_size=60",
    "--config.attack.num_steps=2",
    "--config.eval.pgd.num_steps=1",
    "--config.test.pgd.num_steps=1",
    *(f"--config.{k}={v}" for k, v in AUTOATTACK_QUICK.items()),
    "--config.eval_every_epochs=0",
    "--config.progress_bar=False",
]


def digits_tiny_config():
    """configs/digits.py with OVERRIDES applied as the command line does."""
    config = config_lib.load_config_file(os.path.join(REPO, "configs/digits.py"))
    overrides = {}
    for item in OVERRIDES:
        key, value = item.removeprefix("--config.").split("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except ValueError:
            overrides[key] = value
    config.update_from_flattened_dict(overrides)
    return config


def xla_flags(devices: int) -> str:
    """The session's XLA_FLAGS (conftest.py's code generation) with `devices` fake CPU devices."""
    kept = os.environ.get("XLA_FLAGS", "").split()
    kept = [f for f in kept if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def run_main(
    *args: str, cwd: str = REPO, env_extra: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m score_jax.main *args` on the CPU, this checkout importable, output captured."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "score_jax.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
