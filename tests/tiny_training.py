"""The tests' tiny training loop: Adam on random minibatches of a split, one jitted step."""

from collections.abc import Callable

import jax
import numpy as np
import optax

# loss_fn(params, batch_stats, x, y, key) -> (loss, new batch_stats)
LossFn = Callable


def train_adam(
    variables: dict, x: np.ndarray, y: np.ndarray, loss_fn: LossFn, steps: int, lr: float = 3e-3
) -> dict:
    """`variables` after `steps` Adam(lr) steps on minibatches of 64 drawn by default_rng(0), step
    i with key(i); returns {"params", "batch_stats"}."""
    opt = optax.adam(lr)

    @jax.jit
    def step(params, stats, opt_state, xb, yb, key):
        (_, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, xb, yb, key)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = opt.init(params)
    rng = np.random.default_rng(0)
    for i in range(steps):
        idx = rng.integers(0, len(y), 64)
        params, stats, opt_state = step(params, stats, opt_state, x[idx], y[idx], jax.random.key(i))
    return {"params": params, "batch_stats": stats}
