"""The evaluation precision (config.eval_precision): the model and the program the evaluators
(clean, PGD, AutoAttack) run, whatever `model.dtype` training used."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_jax.errors import ConfigError

# config.eval_precision: "float32" (default) evaluates a float32 copy of the model, float32
# parameters, matrix products and convolutions at the highest precision (no bf16 passes on TPU,
# no TF32 on GPU); "model": the model as trained (its dtype, the backend's default precision).
EVAL_PRECISIONS = ("float32", "model")


def check_precision(precision: str) -> None:
    """ConfigError unless `precision` is one of EVAL_PRECISIONS."""
    if precision not in EVAL_PRECISIONS:
        raise ConfigError(f"eval_precision={precision!r}; valid: {', '.join(EVAL_PRECISIONS)}")


def eval_model(model: nn.Module, precision: str = "float32") -> nn.Module:
    """The model the evaluators run: its float32 copy (`dtype=float32`) under "float32", else
    `model` itself. Modules without a `dtype` field compute in their parameters' dtype."""
    check_precision(precision)
    if precision == "float32" and getattr(model, "dtype", jnp.float32) != jnp.float32:
        return model.clone(dtype=jnp.float32)
    return model


def with_precision(fn: Callable, precision: str = "float32") -> Callable:
    """`fn` traced with float32 floating inputs (its variables and batch) and
    `jax.default_matmul_precision("highest")` under "float32"; `fn` itself under "model"."""
    check_precision(precision)
    if precision == "model":
        return fn

    def to_float32(a):
        a = jnp.asarray(a)
        return a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a

    @functools.wraps(fn)
    def wrapped(variables, *args):
        with jax.default_matmul_precision("highest"):
            return fn(jax.tree.map(to_float32, variables), *args)

    return wrapped
