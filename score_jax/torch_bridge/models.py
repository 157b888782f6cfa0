"""PyTorch twins of the Flax model zoo, for exported weights (AutoAttack, RobustBench), and
`build_torch_model`, which builds the twin a `score_jax.models.Architecture` record names.

Every model takes images in [0, 1], NCHW, normalises them with per-channel `mean`/`std`
(non-persistent buffers: moved by `.to()`, absent from the state dict, as in RobustBench's
`DMWideResNet`) and returns float32 logits. Convolutions are bias-free, BatchNorm eps is 1e-5
with PyTorch momentum = 1 - Flax momentum, pooling is a global spatial mean (any input size).

State-dict names:
  DMWideResNet (wrn-*): exactly RobustBench's `DMWideResNet` (init_conv, layer.{g}.block.{i}.
    {batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}, batchnorm, logits).
  PreActResNet / ResNet (preact-resnet-18 / resnet-18): Kuang Liu's pytorch-cifar names
    (conv1, layer{s}.{i}.{bn1, conv1, bn2, conv2, shortcut.0[, shortcut.1]}, bn / bn1, linear).
  SmallCNN (small-cnn): conv_{k}, batchnorm_{k} (k = 0, 1, 2), dense, logits.
"""

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from score_jax import models
from score_jax.errors import ConfigError
from score_jax.models.layers import CIFAR10_MEAN, CIFAR10_STD

ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU}


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"Unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def _batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=momentum)


class _Normalized(nn.Module):
    """Holds `mean`/`std` as non-persistent (1, C, 1, 1) buffers; `normalize` = (x - mean) / std."""

    mean: torch.Tensor
    std: torch.Tensor

    def _register_normalization(self, mean: Sequence[float], std: Sequence[float]) -> int:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}.")
        shape = (1, len(mean), 1, 1)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False
        )
        return len(mean)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# --- DeepMind WideResNet (RobustBench DMWideResNet names) -----------------------------------


class _Block(nn.Module):
    """BN-act-pad-conv_0(3x3, stride)-BN-act-conv_1(3x3) + shortcut (1x1 on the activated input)."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, activation_fn: type[nn.Module]
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"Unsupported stride {stride}.")
        self.batchnorm_0 = _batch_norm(in_planes, 0.01)
        self.relu_0 = activation_fn()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = _batch_norm(out_planes, 0.01)
        self.relu_1 = activation_fn()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
            if self.has_shortcut
            else None
        )
        self._stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_shortcut:
            x = self.relu_0(self.batchnorm_0(x))
            v = x
        else:
            v = self.relu_0(self.batchnorm_0(x))
        # TF-SAME: (0, 1) at stride 2 (even sizes), (1, 1) at stride 1.
        v = F.pad(v, (1, 1, 1, 1) if self._stride == 1 else (0, 1, 0, 1))
        out = self.conv_0(v)
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (self.shortcut(x) if self.has_shortcut else x) + out


class _BlockGroup(nn.Module):
    """`num_blocks` blocks; the first changes width and stride."""

    def __init__(
        self,
        num_blocks: int,
        in_planes: int,
        out_planes: int,
        stride: int,
        activation_fn: type[nn.Module],
    ):
        super().__init__()
        self.block = nn.Sequential(
            *(
                _Block(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    activation_fn,
                )
                for i in range(num_blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(_Normalized):
    """DeepMind-style WRN-`depth`-`width`; state dict identical to RobustBench's DMWideResNet."""

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 28,
        width: int = 10,
        activation: str = "silu",
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError(f"WRN depth must be 6n+4 with n >= 1, got {depth}.")
        act = _activation(activation)
        in_channels = self._register_normalization(mean, std)
        num_channels = [16, 16 * width, 32 * width, 64 * width]
        num_blocks = (depth - 4) // 6
        self.init_conv = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            *(
                _BlockGroup(num_blocks, num_channels[g], num_channels[g + 1], stride, act)
                for g, stride in enumerate((1, 2, 2))
            )
        )
        self.batchnorm = _batch_norm(num_channels[3], 0.01)
        self.relu = act()
        self.logits = nn.Linear(num_channels[3], num_classes)
        self.num_channels = num_channels[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.init_conv(self.normalize(x))
        out = self.relu(self.batchnorm(self.layer(out)))
        return self.logits(out.mean(dim=(2, 3)))


# --- CIFAR ResNets (Kuang Liu's pytorch-cifar names) ----------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """act(bn1(x)) -> conv1 (stride) -> bn2 -> act -> conv2, plus shortcut(act(bn1(x))) or x."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation_fn: type[nn.Module]):
        super().__init__()
        self.bn1 = _batch_norm(in_planes, 0.1)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = _batch_norm(planes, 0.1)
        self.conv2 = _conv3x3(planes, planes, 1)
        self.act = activation_fn()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(self.act(self.bn2(out)))
        return out + shortcut


class BasicBlock(nn.Module):
    """act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x)); shortcut = bn(conv 1x1) or identity."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation_fn: type[nn.Module]):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = _batch_norm(planes, 0.1)
        self.conv2 = _conv3x3(planes, planes, 1)
        self.bn2 = _batch_norm(planes, 0.1)
        self.act = activation_fn()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), _batch_norm(planes, 0.1)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class _CifarResNet(_Normalized):
    """conv1, four stages (widths base_width * 1, 2, 4, 8; strides 1, 2, 2, 2), linear head."""

    block_cls: type[nn.Module] = BasicBlock

    def __init__(
        self,
        num_classes: int = 10,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        base_width: int = 64,
        activation: str = "relu",
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ):
        super().__init__()
        self.act = _activation(activation)()
        in_channels = self._register_normalization(mean, std)
        self.conv1 = _conv3x3(in_channels, base_width, 1)
        in_planes = base_width
        for s, n in enumerate(num_blocks):
            planes = base_width * 2**s
            blocks = []
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                blocks.append(self.block_cls(in_planes, planes, stride, type(self.act)))
                in_planes = planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.num_stages = len(num_blocks)
        self.linear = nn.Linear(in_planes, num_classes)

    def stages(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(self.num_stages):
            x = getattr(self, f"layer{s + 1}")(x)
        return x


class PreActResNet(_CifarResNet):
    """Pre-activation ResNet (PreAct-ResNet-18 by default); float32 logits (B, num_classes)."""

    block_cls = PreActBlock

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.bn = _batch_norm(self.linear.in_features, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.conv1(self.normalize(x)))
        out = self.act(self.bn(out))
        return self.linear(out.mean(dim=(2, 3)))


class ResNet(_CifarResNet):
    """Post-activation ResNet (ResNet-18 by default); float32 logits (B, num_classes)."""

    block_cls = BasicBlock

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.bn1 = _batch_norm(self.conv1.out_channels, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(self.normalize(x))))
        out = self.stages(out)
        return self.linear(out.mean(dim=(2, 3)))


# --- Small CNN ---------------------------------------------------------------------------


class SmallCNN(_Normalized):
    """3 x (conv 3x3 -> BN -> act), widths w, 2w (stride 2), 2w -> mean pool -> dense -> logits."""

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 32,
        hidden: int = 128,
        activation: str = "relu",
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ):
        super().__init__()
        self.act = _activation(activation)()
        in_planes = self._register_normalization(mean, std)
        for i, (planes, stride) in enumerate(((width, 1), (2 * width, 2), (2 * width, 1))):
            setattr(self, f"conv_{i}", _conv3x3(in_planes, planes, stride))
            setattr(self, f"batchnorm_{i}", _batch_norm(planes, 0.1))
            in_planes = planes
        self.dense = nn.Linear(in_planes, hidden)
        self.logits = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        for i in range(3):
            out = self.act(getattr(self, f"batchnorm_{i}")(getattr(self, f"conv_{i}")(out)))
        out = self.act(self.dense(out.mean(dim=(2, 3))))
        return self.logits(out)


# --- Factory -------------------------------------------------------------------------------


def build_torch_model(model_name: str, num_classes: int, **kw: Any) -> nn.Module:
    """The PyTorch twin of `model_name` (a score_jax.models name) with `num_classes` outputs:
    the class its `models.Architecture` record names, with the fields the record's Flax
    constructor fixes (wrn-16-4: depth 16, width 4).

    kw: mean, std, activation ("" or None = the model's default) and the architecture fields
    (`models.architecture(model_name).fields`: wrn: depth, width; resnets: num_blocks,
    base_width; small-cnn: width, hidden). The Flax-only fields conv_impl, dtype, bn_axis_name
    and init_scheme are accepted and ignored.
    """
    arch = models.architecture(model_name)
    kw = {k: v for k, v in kw.items() if k not in models.JAX_ONLY_FIELDS}
    if not kw.get("activation"):
        kw.pop("activation", None)
    unknown = set(kw) - {"mean", "std", "activation", *arch.fields}
    if unknown:
        raise ConfigError(f"{model_name}: unknown model fields {sorted(unknown)}")
    for k in ("mean", "std"):
        if k in kw:
            kw[k] = tuple(float(v) for v in kw[k])
    module, _, cls = arch.torch.rpartition(".")
    return getattr(importlib.import_module(module), cls)(num_classes, **{**arch.defaults, **kw})
