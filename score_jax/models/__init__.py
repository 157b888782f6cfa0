"""Model zoo: `get_model(name, num_classes, **kw)` returns a Flax module.

Every model is called as `model.apply(variables, x, train)` with x in [0, 1], NHWC; it normalises
(x - mean) / std itself and returns float32 logits (B, num_classes). Variables are
{"params", "batch_stats"}; every BatchNorm module's name starts with "batchnorm" or "bn".
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn

from score_jax.errors import ConfigError
from score_jax.models.layers import (
    ACTIVATIONS,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CONV_IMPLS,
    INIT_SCHEMES,
    Conv,
    check_init_scheme,
    get_activation,
    resolve_conv_impl,
)
from score_jax.models.resnet import PreActResNet, PreActResNet18, ResNet, ResNet18
from score_jax.models.small import SmallCNN
from score_jax.models.wide_resnet import (
    WRN16_2,
    WRN16_4,
    WRN28_10,
    WRN34_10,
    WRN70_16,
    WideResNet,
)

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "wrn-28-10": WRN28_10,
    "wrn-70-16": WRN70_16,
    "wrn-34-10": WRN34_10,
    "wrn-16-4": WRN16_4,
    "wrn-16-2": WRN16_2,
    "preact-resnet-18": PreActResNet18,
    "resnet-18": ResNet18,
    "small-cnn": SmallCNN,
}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)
_SHARED = ("activation", "conv_impl", "dtype")  # set from config.model's own fields


def model_fields(name: str) -> tuple[str, ...]:
    """The architecture fields of model `name` that a config may set (model.width, ...)."""
    make = _MODELS[name]
    cls = getattr(make, "func", make)
    shared = ("parent", "name", "num_classes", "mean", "std", "bn_axis_name", *_SHARED)
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in shared)


def get_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Builds the model `name` with `num_classes` outputs; `kw` are the model's fields.

    Common fields: mean, std, activation ("silu" | "relu"), bn_axis_name, conv_impl
    ("xla" | "im2col" | "auto"), dtype, init_scheme ("default" | "torch": PyTorch's default
    initialisation of convolutions and linear layers).
    """
    if name not in _MODELS:
        raise ConfigError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}.")
    if "activation" in kw:
        get_activation(kw["activation"])
    if "conv_impl" in kw:
        resolve_conv_impl(kw["conv_impl"])
    if "init_scheme" in kw:
        check_init_scheme(kw["init_scheme"])
    return _MODELS[name](num_classes=num_classes, **kw)


__all__ = [
    "ACTIVATIONS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CONV_IMPLS",
    "INIT_SCHEMES",
    "MODEL_NAMES",
    "Conv",
    "PreActResNet",
    "PreActResNet18",
    "ResNet",
    "ResNet18",
    "SmallCNN",
    "WRN16_2",
    "WRN16_4",
    "WRN28_10",
    "WRN34_10",
    "WRN70_16",
    "WideResNet",
    "get_model",
    "model_fields",
]
