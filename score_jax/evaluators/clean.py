"""The clean accuracy, computed for every parameter set (no spec): 1[argmax f(x) = y]."""

import jax

from score_jax import attacks, losses

NAME = "clean"


def correct(logits_fn: attacks.LogitsFn, x: jax.Array, labels: jax.Array, keys) -> jax.Array:
    """1[argmax f(x) = y]; `keys` unused."""
    del keys
    return losses.accuracy(logits_fn(x), labels)
