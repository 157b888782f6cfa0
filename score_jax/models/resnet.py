"""CIFAR ResNets: PreAct-ResNet-18 and ResNet-18 (Kuang Liu's pytorch-cifar).

3x3 convolutions pad (1,1) on every side whatever the stride (PyTorch padding=1); no conv biases.
Blocks are flat children of the model, named `layer{s}_{i}` (stage s = 1..4, block i = 0, 1, ...),
i.e. PyTorch `layer{s}.{i}.X` <-> Flax `layer{s}_{i}/X`.

PreActResNet param tree:
  conv1/kernel
  layer{s}_{i}/{bn1/{scale,bias}, conv1/kernel, bn2/{scale,bias}, conv2/kernel}
  layer{s}_{i}/shortcut/kernel          (1x1 conv, no BN; where stride != 1 or width changes)
  bn/{scale,bias}, linear/{kernel,bias}
ResNet param tree:
  conv1/kernel, bn1/{scale,bias}
  layer{s}_{i}/{conv1/kernel, bn1/{scale,bias}, conv2/kernel, bn2/{scale,bias}}
  layer{s}_{i}/{shortcut_conv/kernel, bn_shortcut/{scale,bias}}   [shortcut.0, shortcut.1]
  linear/{kernel,bias}
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from score_jax.models.layers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    PAD_1,
    PAD_NONE,
    ModelBase,
    global_avg_pool,
    normalize,
)


class PreActBlock(ModelBase):
    """act(bn1(x)) -> conv1 (stride) -> bn2 -> act -> conv2, plus (conv 1x1 of act(bn1(x))) or x."""

    planes: int = 64
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = self.act(self.batch_norm("bn1", train)(x))
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = self.conv(self.planes, 1, self.stride, PAD_NONE, "shortcut")(out)
        else:
            shortcut = x
        out = self.conv(self.planes, 3, self.stride, PAD_1, "conv1")(out)
        out = self.act(self.batch_norm("bn2", train)(out))
        out = self.conv(self.planes, 3, 1, PAD_1, "conv2")(out)
        return out + shortcut


class BasicBlock(ModelBase):
    """act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x)); shortcut = bn(conv 1x1) or identity."""

    planes: int = 64
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = self.act(self.batch_norm("bn1", train)(self.conv_3x3("conv1", self.stride)(x)))
        out = self.batch_norm("bn2", train)(self.conv_3x3("conv2", 1)(out))
        if self.stride != 1 or x.shape[-1] != self.planes:
            x = self.conv(self.planes, 1, self.stride, PAD_NONE, "shortcut_conv")(x)
            x = self.batch_norm("bn_shortcut", train)(x)
        return self.act(out + x)

    def conv_3x3(self, name: str, stride: int) -> nn.Module:
        return self.conv(self.planes, 3, stride, PAD_1, name)


class _CifarResNet(ModelBase):
    """Stem, four stages of blocks (widths base_width * 1, 2, 4, 8; strides 1, 2, 2, 2), head."""

    num_classes: int = 10
    num_blocks: Sequence[int] = (2, 2, 2, 2)
    base_width: int = 64
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD

    def stages(self, x: jax.Array, block_cls: type[ModelBase], train: bool) -> jax.Array:
        for s, n in enumerate(self.num_blocks):
            planes = self.base_width * 2**s
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                block = block_cls(
                    planes=planes, stride=stride, name=f"layer{s + 1}_{i}", **self.shared()
                )
                x = block(x, train)
        return x

    def head(self, x: jax.Array) -> jax.Array:
        out = self.dense(self.num_classes, "linear")(global_avg_pool(x))
        return out.astype(jnp.float32)


class PreActResNet(_CifarResNet):
    """Pre-activation ResNet for 32x32 inputs; returns float32 logits (B, num_classes)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = normalize(x, self.mean, self.std, self.dtype)
        out = self.conv(self.base_width, 3, 1, PAD_1, "conv1")(out)
        out = self.stages(out, PreActBlock, train)
        out = self.act(self.batch_norm("bn", train)(out))
        return self.head(out)


class ResNet(_CifarResNet):
    """Post-activation ResNet for 32x32 inputs; returns float32 logits (B, num_classes)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = normalize(x, self.mean, self.std, self.dtype)
        out = self.conv(self.base_width, 3, 1, PAD_1, "conv1")(out)
        out = self.act(self.batch_norm("bn1", train)(out))
        out = self.stages(out, BasicBlock, train)
        return self.head(out)


PreActResNet18 = functools.partial(PreActResNet, num_blocks=(2, 2, 2, 2))
ResNet18 = functools.partial(ResNet, num_blocks=(2, 2, 2, 2))
