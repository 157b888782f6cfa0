"""XLA compile options of the project's jitted steps: on CPU, convolutions outside YNNPACK.

jaxlib 0.10's XLA:CPU hands matrix products, reductions and convolutions to YNNPACK. Its
convolutions are slower than XLA's own kernels here (one 3x3 convolution, 64 channels, 32x32,
batch 64, forward: 42 against 24-26 ms on the Intel Xeon VM; the WRN-16-4 train step 1.15x
faster without them; benchmarks/README.md), so the train, evaluation and AutoAttack steps
compile with YNNPACK's matrix products and reductions only. An explicit
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=...` wins (the options are then left out), as
does a jaxlib that does not know the option (a warning; the defaults stay).

    step = xla_options.jit(fn, donate_argnums=0)
"""

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# jaxlib 0.10.2's default list without LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
CPU_YNN_FUSIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


@functools.cache
def compiler_options() -> dict[str, str] | None:
    """{YNN_FUSION_OPTION: CPU_YNN_FUSIONS} on a CPU backend that accepts it, else None."""
    if jax.default_backend() != "cpu" or YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    options = {YNN_FUSION_OPTION: CPU_YNN_FUSIONS}
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options=options)
    except (jax.errors.JaxRuntimeError, TypeError, ValueError) as e:
        logging.warning("XLA:CPU compile option %s not applied: %s", YNN_FUSION_OPTION, e)
        return None
    return options


def jit(fun: Callable, **kwargs: Any):
    """`jax.jit(fun, **kwargs)` with `compiler_options()`."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
