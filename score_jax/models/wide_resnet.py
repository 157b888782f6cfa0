"""DeepMind-style WideResNet, one-to-one with RobustBench's `DMWideResNet`.

Param tree (PyTorch state-dict name in brackets):
  init_conv/kernel                                   [init_conv.weight]
  layer_{g}/block_{i}/batchnorm_0/{scale,bias}       [layer.{g}.block.{i}.batchnorm_0.{weight,bias}]
  layer_{g}/block_{i}/conv_0/kernel                  [layer.{g}.block.{i}.conv_0.weight]
  layer_{g}/block_{i}/batchnorm_1/{scale,bias}       [layer.{g}.block.{i}.batchnorm_1.{weight,bias}]
  layer_{g}/block_{i}/conv_1/kernel                  [layer.{g}.block.{i}.conv_1.weight]
  layer_{g}/block_{i}/shortcut/kernel                [layer.{g}.block.{i}.shortcut.weight]
      (only where the block changes the channel count)
  batchnorm/{scale,bias}                             [batchnorm.{weight,bias}]
  logits/{kernel,bias}                               [logits.{weight,bias}]
batch_stats hold {mean,var} for every batchnorm* module [running_mean, running_var].
"""

import functools
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_jax.errors import ConfigError
from score_jax.models.layers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    PAD_1,
    PAD_NONE,
    ModelBase,
    global_avg_pool,
    normalize,
)


class _WRNBase(ModelBase):
    activation: str = "silu"
    bn_momentum: ClassVar[float] = 0.99  # PyTorch momentum 0.01.


class WRNBlock(_WRNBase):
    """Pre-activation block: BN-act-conv(3x3, stride, TF-SAME)-BN-act-conv(3x3) + shortcut."""

    out_planes: int = 16
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        has_shortcut = x.shape[-1] != self.out_planes
        if has_shortcut:
            x = self.act(self.batch_norm("batchnorm_0", train)(x))
            v = x
        else:
            v = self.act(self.batch_norm("batchnorm_0", train)(x))
        if self.stride == 1:
            pad = PAD_1
        elif self.stride == 2:
            pad = ((0, 1), (0, 1))  # TF-SAME for stride 2 on even sizes.
        else:
            raise ValueError(f"Unsupported stride {self.stride}.")
        out = self.conv(self.out_planes, 3, self.stride, pad, "conv_0")(v)
        out = self.act(self.batch_norm("batchnorm_1", train)(out))
        out = self.conv(self.out_planes, 3, 1, PAD_1, "conv_1")(out)
        if has_shortcut:
            x = self.conv(self.out_planes, 1, self.stride, PAD_NONE, "shortcut")(x)
        return x + out


class WRNBlockGroup(_WRNBase):
    """`num_blocks` blocks; only the first has the stride and the width change."""

    num_blocks: int = 1
    out_planes: int = 16
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_blocks):
            stride = self.stride if i == 0 else 1
            block = WRNBlock(
                out_planes=self.out_planes, stride=stride, name=f"block_{i}", **self.shared()
            )
            x = block(x, train)
        return x


class WideResNet(_WRNBase):
    """DeepMind-style WideResNet-`depth`-`width`; returns float32 logits (B, num_classes)."""

    num_classes: int = 10
    depth: int = 28
    width: int = 10
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ConfigError(
                f"config.model.depth: WRN depth must be 6n+4 with n >= 1, got {self.depth}."
            )
        num_blocks = (self.depth - 4) // 6
        widths = (16 * self.width, 32 * self.width, 64 * self.width)
        out = normalize(x, self.mean, self.std, self.dtype)
        out = self.conv(16, 3, 1, PAD_1, "init_conv")(out)
        for g, (planes, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
            group = WRNBlockGroup(
                num_blocks=num_blocks,
                out_planes=planes,
                stride=stride,
                name=f"layer_{g}",
                **self.shared(),
            )
            out = group(out, train)
        out = self.act(self.batch_norm("batchnorm", train)(out))
        out = self.dense(self.num_classes, "logits")(global_avg_pool(out))
        return out.astype(jnp.float32)


WRN28_10 = functools.partial(WideResNet, depth=28, width=10)
WRN70_16 = functools.partial(WideResNet, depth=70, width=16)
WRN34_10 = functools.partial(WideResNet, depth=34, width=10)
WRN16_4 = functools.partial(WideResNet, depth=16, width=4)
WRN16_2 = functools.partial(WideResNet, depth=16, width=2)
