"""Test set-up: 4 fake CPU devices and the suite's XLA:CPU code generation, set before jax is
imported anywhere."""

import os

# Compilation is most of the suite's time, so the suite compiles for behaviour, not speed:
# XLA:CPU's classic (non-MLIR) fusion emitters and LLVM at -O1 instead of -O2. Neither enables
# fast math: results are IEEE float32 as with the defaults, differing by rounding only. The suite
# took 4 min 50 s with them, 6 min 58 s without (README). The CLI subprocesses keep them
# (cli_helpers.xla_flags). A flag already in XLA_FLAGS wins; the defaults:
# XLA_FLAGS="--xla_cpu_use_fusion_emitters=true --xla_backend_optimization_level=2".
SUITE_CODEGEN = {"xla_cpu_use_fusion_emitters": "false", "xla_backend_optimization_level": "1"}
_flags = os.environ.get("XLA_FLAGS", "").split()
for _name, _value in SUITE_CODEGEN.items():
    if not any(f.startswith(f"--{_name}=") for f in _flags):
        _flags.append(f"--{_name}={_value}")
os.environ["XLA_FLAGS"] = " ".join([*_flags, "--xla_force_host_platform_device_count=4"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One intra-op thread for torch (and BLAS) per test process: `-n 2` runs two workers on two
# cores, and pyautoattack's many tiny forward passes slowed several-fold when each worker's torch
# spread over both cores (the subprocesses the tests start inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# One persistent compilation cache per test session, shared with the CLI subprocesses the tests
# start (they inherit the environment): identical tiny train steps compile once, not per test.
# The session that made it (the xdist controller) removes it at the end.
_CACHE_MADE_HERE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _CACHE_MADE_HERE = tempfile.mkdtemp(prefix="score_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_MADE_HERE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import functools  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def mock_tfds():
    """`tfds.testing.mock_data(num_examples=...)` whose data sources also support batched reads."""
    import tensorflow_datasets as tfds

    class BatchReadableMock(tfds.testing.PickableDataSourceMock):
        # mock_data assigns a plain partial to `__getitems__`, which MagicMock does not bind
        # (not a magic it knows); bind it to the mock like `__getitem__`.
        def __setattr__(self, name, value):
            if name == "__getitems__" and isinstance(value, functools.partial):
                value = functools.partial(value, self)
            super().__setattr__(name, value)

    def make(num_examples: int):
        return tfds.testing.mock_data(
            num_examples=num_examples,
            policy=tfds.testing.MockPolicy.USE_CODE,
            mock_array_record_data_source=BatchReadableMock(),
        )

    return make


@pytest.fixture(scope="session")
def gcs_bucket():
    """`gs://bucket` on a local GCS emulator (tests/gcs_emulator.py), started once per session;
    the environment (this process and its subprocesses) points gcsfs, orbax and tensorboardX at
    it. Tests share the bucket: each writes under its own prefix."""
    from gcs_emulator import GcsEmulator

    with GcsEmulator() as emulator:
        yield f"gs://{emulator.bucket}"


def pytest_sessionfinish(session):
    if _CACHE_MADE_HERE is not None:
        shutil.rmtree(_CACHE_MADE_HERE, ignore_errors=True)
