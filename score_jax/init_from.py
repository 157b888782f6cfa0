"""config.init_from: a new run that starts from a released PyTorch checkpoint's weights.

The bridge (score_jax.torch_bridge.released) is imported only when config.init_from is set, so
PyTorch stays optional; it builds on score_jax.setup, and this module on both.
"""

import jax

from score_jax import parallel, train
from score_jax.setup import Setup


def start_state(setup: Setup) -> train.TrainState:
    """The state a new run starts from: `setup.initial_state()`, with config.init_from's weights
    (torch_bridge.released) as params, EMA and BatchNorm statistics when it is set."""
    state = setup.initial_state()
    config = setup.config
    if not config.init_from:
        return state
    from score_jax import torch_bridge

    torch_bridge.require_torch()
    from score_jax.torch_bridge import released

    template = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    variables = released.load_variables(
        config.init_from, config.model.name, template, setup.model.mean, setup.model.std
    )
    state = state.replace(
        params=variables["params"],
        ema_params=variables["params"],
        batch_stats=variables["batch_stats"],
    )
    return parallel.replicate(state, setup.mesh)
