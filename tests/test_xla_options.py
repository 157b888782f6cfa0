"""xla_options: the steps compile on CPU with YNNPACK's matrix products and reductions, and XLA's
own convolutions."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import xla_options


@pytest.fixture
def fresh_options():
    xla_options.compiler_options.cache_clear()
    yield
    xla_options.compiler_options.cache_clear()


def _ynn_ops(compiled) -> set[str]:
    """The jax op names (metadata) of the compiled program's YNNPACK fusions."""
    lines = [
        line for line in compiled.as_text().splitlines() if "ynn" in line and "fusion(" in line
    ]
    return {
        m.group(1).split("/")[-1] for line in lines if (m := re.search(r'op_name="([^"]+)"', line))
    }


def _program(x, w, a):
    conv = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return conv, a @ a, jnp.sum(x * x, axis=(1, 2))


_RNG = np.random.default_rng(0)
ARGS = tuple(
    jnp.asarray(_RNG.normal(size=shape), jnp.float32)
    for shape in ((4, 16, 16, 32), (3, 3, 32, 32), (64, 64))
)


def test_cpu_steps_keep_ynnpack_dots_and_reductions_not_convolutions(fresh_options):
    assert jax.default_backend() == "cpu"
    assert xla_options.compiler_options() == {
        xla_options.YNN_FUSION_OPTION: xla_options.CPU_YNN_FUSIONS
    }
    default = _ynn_ops(jax.jit(_program).lower(*ARGS).compile())
    # jaxlib's default sends all three to YNNPACK; if that changes, revisit the option.
    assert {"conv_general_dilated", "dot_general", "reduce_sum"} <= default
    ours = _ynn_ops(xla_options.jit(_program).lower(*ARGS).compile())
    assert "conv_general_dilated" not in ours
    assert {"dot_general", "reduce_sum"} <= ours
    for a, b in zip(jax.jit(_program)(*ARGS), xla_options.jit(_program)(*ARGS), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_explicit_xla_flags_win(fresh_options, monkeypatch):
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot --other_flag"
    )
    assert xla_options.compiler_options() is None


def test_an_option_jaxlib_rejects_warns_and_keeps_the_defaults(fresh_options, monkeypatch, caplog):
    monkeypatch.setattr(xla_options, "CPU_YNN_FUSIONS", "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE")
    with caplog.at_level(logging.WARNING):
        assert xla_options.compiler_options() is None
    assert any(
        r.levelno == logging.WARNING and xla_options.YNN_FUSION_OPTION in r.getMessage()
        for r in caplog.records
    )
    assert xla_options.jit(lambda x: x + 1)(1.0) == 2.0
