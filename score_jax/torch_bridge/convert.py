"""Flax variables <-> PyTorch state dicts, pure: arrays in, arrays out (no files, no trainer).

Conv kernels HWIO <-> OIHW, Dense (in, out) <-> Linear (out, in); BatchNorm scale/bias <->
weight/bias, batch_stats mean/var <-> running_mean/running_var (+ num_batches_tracked = 0).
Module names follow the architecture's `renames` in its `score_jax.models.Architecture` record.
"""

import re
from typing import Any

import jax
import numpy as np
import torch
from flax import traverse_util

from score_jax import models
from score_jax.errors import CheckpointError

_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _is_batchnorm(module: str) -> bool:
    return module.startswith(("batchnorm", "bn"))


def torch_key(renames: tuple[tuple[str, str], ...], collection: str, path: tuple[str, ...]) -> str:
    """The state-dict key of the Flax leaf `collection`/`path`, module names re.sub'd by
    `renames` (an `Architecture.renames`)."""
    *modules, leaf = path
    renamed = []
    for m in modules:
        for pattern, repl in renames:
            m = re.sub(pattern, repl, m)
        renamed.append(m)
    if (collection, leaf) not in _LEAF_NAMES:
        raise ValueError(f"unexpected Flax leaf {collection}/{'/'.join(path)}")
    return ".".join([*renamed, _LEAF_NAMES[(collection, leaf)]])


# Kernel axis permutations by rank: conv HWIO <-> OIHW, dense (in, out) <-> (out, in).
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}


def _permute(leaf: str, value: np.ndarray, axes: dict[int, tuple[int, ...]]) -> np.ndarray:
    if leaf != "kernel" or value.ndim not in axes:
        return value
    return value.transpose(axes[value.ndim])


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """A Flax leaf named `leaf` in PyTorch's layout: HWIO -> OIHW, (in, out) -> (out, in)."""
    return _permute(leaf, value, _TO_TORCH)


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Inverse of `to_torch_layout`: OIHW -> HWIO, (out, in) -> (in, out)."""
    return _permute(leaf, value, _TO_FLAX)


def _flat(variables: dict) -> dict[tuple[str, ...], Any]:
    """{(collection, *path): leaf} over params and batch_stats."""
    out = {}
    for collection in ("params", "batch_stats"):
        tree = variables.get(collection, {})
        for path, value in traverse_util.flatten_dict(dict(tree)).items():
            out[(collection, *path)] = value
    return out


def export_state_dict(model_name: str, variables: dict) -> dict[str, torch.Tensor]:
    """The PyTorch state dict (float32, torch layouts) of Flax `variables` of model `model_name`.

    Loads with `load_state_dict(strict=True)` into `build_torch_model(model_name, ...)` (and, for
    the WRNs, into RobustBench's DMWideResNet). Leaves may be arrays or ShapeDtypeStructs; the
    latter give empty tensors of the right shape (for key/shape checks without memory).
    """
    renames = models.architecture(model_name).renames
    state: dict[str, torch.Tensor] = {}
    bn_modules: list[str] = []
    for (collection, *path), value in _flat(variables).items():
        key = torch_key(renames, collection, tuple(path))
        if isinstance(value, jax.ShapeDtypeStruct):
            shape = to_torch_layout(path[-1], np.empty(value.shape, np.bool_)).shape
            state[key] = torch.empty(shape, dtype=torch.float32, device="meta")
        else:
            array = np.asarray(jax.device_get(value), dtype=np.float32)
            array = np.ascontiguousarray(to_torch_layout(path[-1], array))
            state[key] = torch.from_numpy(array.copy())
        if collection == "batch_stats" and path[-1] == "mean":
            bn_modules.append(key.rsplit(".", 1)[0])
        elif collection == "params" and path[-1] == "scale" and not _is_batchnorm(path[-2]):
            raise ValueError(f"unexpected scale outside a BatchNorm: {'/'.join(path)}")
    for module in bn_modules:
        state[f"{module}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return dict(sorted(state.items()))


def import_state_dict(model_name: str, state: dict[str, torch.Tensor], template: dict) -> dict:
    """Inverse of `export_state_dict`: Flax {"params", "batch_stats"} shaped like `template`."""
    renames = models.architecture(model_name).renames
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    used = set()
    for (collection, *path), ref in _flat(template).items():
        key = torch_key(renames, collection, tuple(path))
        if key not in state:
            raise CheckpointError(f"state dict lacks {key!r}")
        value = to_flax_layout(path[-1], state[key].detach().cpu().numpy())
        if value.shape != tuple(ref.shape):
            raise CheckpointError(f"{key}: shape {value.shape}, expected {tuple(ref.shape)}")
        out[collection][tuple(path)] = np.asarray(value, dtype=ref.dtype)
        used.add(key)
    extra = [k for k in state if k not in used and not k.endswith("num_batches_tracked")]
    if extra:
        raise CheckpointError(f"state dict has unexpected keys {extra[:5]}")
    return {c: traverse_util.unflatten_dict(t) for c, t in out.items()}
