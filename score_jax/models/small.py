"""A small CNN for quick runs and tests (8x8x1 digits, 32x32x3 images).

Param tree: conv_0/kernel, batchnorm_0/{scale,bias}, conv_1/kernel (stride 2),
batchnorm_1/{scale,bias}, conv_2/kernel, batchnorm_2/{scale,bias}, dense/{kernel,bias},
logits/{kernel,bias}.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_jax.models.layers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    PAD_1,
    ModelBase,
    global_avg_pool,
    normalize,
)


class SmallCNN(ModelBase):
    """3 x (conv 3x3 -> BN -> act) at widths w, 2w (stride 2), 2w -> avg pool -> dense -> logits."""

    num_classes: int = 10
    width: int = 32
    hidden: int = 128
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = normalize(x, self.mean, self.std, self.dtype)
        for i, (features, stride) in enumerate(
            ((self.width, 1), (2 * self.width, 2), (2 * self.width, 1))
        ):
            out = self.conv(features, 3, stride, PAD_1, f"conv_{i}")(out)
            out = self.act(self.batch_norm(f"batchnorm_{i}", train)(out))
        out = self.act(self.dense(self.hidden, "dense")(global_avg_pool(out)))
        out = self.dense(self.num_classes, "logits")(out)
        return out.astype(jnp.float32)
