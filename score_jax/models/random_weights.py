"""Random variables for a model's shapes, for parity tests and benchmarks at real shapes.

Unlike a fresh `model.init`, BatchNorm gets non-trivial statistics and affine parameters, so a
comparison exercises every term.
"""

import jax
import numpy as np


def random_variables(shapes, seed: int, gain: float = 2.0):
    """Numpy leaves shaped like `shapes` ({"params", "batch_stats"}, e.g. from jax.eval_shape):
    kernels N(0, gain / fan_in), BN scale U(0.5, 1.5), biases N(0, 0.1^2), running means
    N(0, 0.2^2), running variances U(0.5, 2)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "mean":
            return rng.normal(0.0, 0.2, s.shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if name == "bias":
            return rng.normal(0.0, 0.1, s.shape).astype(np.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        return rng.normal(0.0, np.sqrt(gain / fan_in), s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)
