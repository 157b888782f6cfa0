"""Model zoo and registry: one `Architecture` record per model name (`ARCHITECTURES`) holds its
Flax constructor, its PyTorch twin (score_jax.torch_bridge) and the Flax -> PyTorch parameter
renames; `get_model(name, num_classes, **kw)` / `from_config(config.model, ...)` build the Flax
module. Adding an architecture is adding one record (and the two model classes).

Every model is called as `model.apply(variables, x, train)` with x in [0, 1], NHWC; it normalises
(x - mean) / std itself and returns float32 logits (B, num_classes). Variables are
{"params", "batch_stats"}; every BatchNorm module's name starts with "batchnorm" or "bn".
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

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

JAX_ONLY_FIELDS = ("conv_impl", "dtype", "bn_axis_name", "init_scheme")  # no effect in torch
_SHARED = ("activation", "conv_impl", "dtype")  # set from config.model's own fields
_NOT_ARCH = (
    "parent",
    "name",
    "num_classes",
    "mean",
    "std",
    "bn_axis_name",
    "bn_momentum_override",
    *_SHARED,
)

# Flax module-name -> PyTorch state-dict name, re.sub'd on each component of a parameter's path.
_WRN_RENAMES = ((r"^layer_(\d+)$", r"layer.\1"), (r"^block_(\d+)$", r"block.\1"))
_RESNET_RENAMES = ((r"^layer(\d+)_(\d+)$", r"layer\1.\2"),)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Everything about one architecture, in one place: the Flax constructor, the PyTorch twin
    and how Flax parameter paths become its state-dict names.

    flax:    the Flax module class, or a functools.partial fixing some of its fields.
    torch:   the dotted path of the PyTorch twin's class (imported by score_jax.torch_bridge
             only, so that this package never imports torch); it takes num_classes, mean, std,
             activation and `fields`.
    renames: (pattern, replacement) pairs re.sub'd on each module name of a Flax parameter path.
    """

    flax: Callable[..., nn.Module]
    torch: str
    renames: tuple[tuple[str, str], ...] = ()

    @property
    def flax_class(self) -> type[nn.Module]:
        return getattr(self.flax, "func", self.flax)

    @property
    def config_fields(self) -> tuple[str, ...]:
        """The fields a config may set (config.model.width, ...): `fields` and init_scheme."""
        return tuple(f.name for f in dataclasses.fields(self.flax_class) if f.name not in _NOT_ARCH)

    @property
    def fields(self) -> tuple[str, ...]:
        """The architecture fields, taken by both the Flax model and its PyTorch twin."""
        return tuple(f for f in self.config_fields if f not in JAX_ONLY_FIELDS)

    @property
    def defaults(self) -> dict[str, Any]:
        """The fields the constructor fixes (wrn-16-4: depth=16, width=4)."""
        return dict(getattr(self.flax, "keywords", {}))


_TORCH = "score_jax.torch_bridge.models"
ARCHITECTURES: dict[str, Architecture] = {
    "wrn-28-10": Architecture(WRN28_10, f"{_TORCH}.DMWideResNet", _WRN_RENAMES),
    "wrn-70-16": Architecture(WRN70_16, f"{_TORCH}.DMWideResNet", _WRN_RENAMES),
    "wrn-34-10": Architecture(WRN34_10, f"{_TORCH}.DMWideResNet", _WRN_RENAMES),
    "wrn-16-4": Architecture(WRN16_4, f"{_TORCH}.DMWideResNet", _WRN_RENAMES),
    "wrn-16-2": Architecture(WRN16_2, f"{_TORCH}.DMWideResNet", _WRN_RENAMES),
    "preact-resnet-18": Architecture(
        PreActResNet18,
        f"{_TORCH}.PreActResNet",
        (*_RESNET_RENAMES, (r"^shortcut$", "shortcut.0")),
    ),
    "resnet-18": Architecture(
        ResNet18,
        f"{_TORCH}.ResNet",
        (*_RESNET_RENAMES, (r"^shortcut_conv$", "shortcut.0"), (r"^bn_shortcut$", "shortcut.1")),
    ),
    "small-cnn": Architecture(SmallCNN, f"{_TORCH}.SmallCNN"),
}
MODEL_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)


def architecture(name: str) -> Architecture:
    """The record of model `name`; ConfigError (one line, the valid names) if unknown."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"Unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}.")
    return ARCHITECTURES[name]


def model_fields(name: str) -> tuple[str, ...]:
    """The architecture fields of model `name` that a config may set (model.width, ...)."""
    return architecture(name).config_fields


def get_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Builds the model `name` with `num_classes` outputs; `kw` are the model's fields.

    Common fields: mean, std, activation ("silu" | "relu"), bn_axis_name, conv_impl
    ("xla" | "im2col" | "hybrid" | "auto"), dtype, init_scheme (layers.INIT_SCHEMES: "default",
    "torch": PyTorch's default initialisation of convolutions and linear layers, "dm": the
    reference WRN's).
    """
    make = architecture(name).flax
    if "activation" in kw:
        get_activation(kw["activation"])
    if "conv_impl" in kw:
        resolve_conv_impl(kw["conv_impl"])
    if "init_scheme" in kw:
        check_init_scheme(kw["init_scheme"])
    return make(num_classes=num_classes, **kw)


def from_config(
    model_config: ml_collections.ConfigDict,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    """The model of `config.model` (name, activation, conv_impl, dtype and the architecture's
    own fields) with `num_classes` outputs, normalising by the dataset's `mean` / `std`."""
    kw: dict[str, Any] = dict(
        mean=mean,
        std=std,
        conv_impl=model_config.conv_impl,
        dtype=jnp.bfloat16 if model_config.dtype == "bfloat16" else jnp.float32,
    )
    if model_config.activation:
        kw["activation"] = model_config.activation
    for k, v in model_config.items():
        if k not in ("name", *_SHARED):
            kw[k] = v
    return get_model(model_config.name, num_classes, **kw)


def architecture_kwargs(name: str, model: nn.Module) -> dict[str, Any]:
    """The JSON-able keyword arguments that rebuild the built model `model` of architecture
    `name`, in Flax or as its PyTorch twin: mean, std, activation and the architecture fields."""
    kw: dict[str, Any] = {
        "mean": [float(v) for v in model.mean],
        "std": [float(v) for v in model.std],
        "activation": model.activation,
    }
    for field in architecture(name).fields:
        value = getattr(model, field)
        kw[field] = list(value) if isinstance(value, tuple | list) else value
    return kw


__all__ = [
    "ACTIVATIONS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CONV_IMPLS",
    "INIT_SCHEMES",
    "ARCHITECTURES",
    "MODEL_NAMES",
    "JAX_ONLY_FIELDS",
    "Architecture",
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
    "architecture",
    "architecture_kwargs",
    "from_config",
    "get_model",
    "model_fields",
]
