"""Released PyTorch checkpoints (not trained here) as Flax variables: evaluation, fine-tuning.

Accepts the files the field publishes: a bare state dict (RobustBench's `DMWideResNet`, Kuang Liu's
ResNet names), or one wrapped in a dict under `state_dict` (the reference's basic setting,
`without_DDPM/train_cifar.py`), `model_state_dict` (its DDPM setting, `core/utils/train.py`),
`model` or `net`; keys prefixed `module.` (`nn.DataParallel`) or `_orig_mod.` (`torch.compile`);
and `mean` / `std` entries (RobustBench versions that keep them as buffers: checked against the
model's normalisation, not imported). Everything else must match the architecture exactly.
"""

import os
from typing import Any

import numpy as np
import torch

from score_jax.errors import CheckpointError, one_line
from score_jax.torch_bridge.convert import import_state_dict

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
PREFIXES = ("module.", "_orig_mod.")
NORMALISATION_KEYS = ("mean", "std")


def unwrap_state_dict(obj: Any, where: str) -> dict[str, np.ndarray]:
    """The plain {key: array} state dict inside a loaded checkpoint object (see module doc)."""
    for _ in range(2):  # e.g. {"model_state_dict": {...}}; never deeper in released files
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            found = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)]
            if not found:
                keys = sorted(map(str, obj))[:8]
                raise CheckpointError(
                    f"{where}: no tensors and none of the keys {WRAPPER_KEYS} (has {keys})"
                )
            obj = obj[found[0]]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. accuracies saved next to the weights
        name = str(key)
        for prefix in PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        if name in state:
            raise CheckpointError(f"{where}: key {name!r} appears twice after removing prefixes")
        state[name] = value.detach().cpu().float().numpy()
    if not state:
        raise CheckpointError(f"{where}: the state dict holds no tensors")
    return state


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The state dict of a released `.pt` / `.pth` file (`torch.load(weights_only=True)`)."""
    where = f"PyTorch checkpoint {path!r}"
    if not os.path.isfile(path):
        raise CheckpointError(f"{where}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{where}: cannot be loaded ({one_line(e)})") from None
    return unwrap_state_dict(obj, where)


def check_values(state: dict[str, np.ndarray], where: str) -> None:
    """CheckpointError naming the first tensor (in key order) that holds a NaN or an infinity, or
    the first BatchNorm `running_var` with a negative entry (a variance is >= 0): such weights
    evaluate to made-up accuracies and cannot be trained from."""
    for key in sorted(state):
        value = state[key]
        bad = ~np.isfinite(value)
        if bad.any():
            kinds = sorted({"NaN" if np.isnan(v) else f"{v}" for v in value[bad][:1000].tolist()})
            raise CheckpointError(
                f"{where}: tensor {key!r} holds {int(bad.sum())} non-finite value(s) "
                f"({', '.join(kinds)}) of {value.size}; the file is corrupt or the model diverged"
            )
        if key.endswith("running_var") and (value < 0).any():
            raise CheckpointError(
                f"{where}: tensor {key!r} (a BatchNorm running variance) holds "
                f"{int((value < 0).sum())} negative value(s) (min {float(value.min()):.4g}); a "
                "variance is >= 0, so the file is corrupt"
            )


def load_variables(
    path: str,
    model_name: str,
    template: dict,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> dict:
    """Flax {"params", "batch_stats"} shaped like `template` from the released file at `path`.

    `mean` / `std`: the Flax model's normalisation, compared with the file's `mean` / `std`
    entries when it has them. Every tensor must be finite and every BatchNorm running variance
    >= 0 (`check_values`). Errors name the file and the offending key in one line.
    """
    where = f"PyTorch checkpoint {path!r}"
    state = read_state_dict(path)
    for key, expected in (("mean", mean), ("std", std)):
        value = state.pop(key, None)
        if value is not None and expected is not None:
            got = value.reshape(-1)
            if got.shape != (len(expected),) or not np.allclose(got, expected, atol=1e-4):
                raise CheckpointError(
                    f"{where}: its {key!r} {np.round(got, 4).tolist()} differs from the model's "
                    f"{list(expected)} (config.dataset / config.model.{key})"
                )
    check_values(state, where)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    try:
        return import_state_dict(model_name, tensors, template)
    except ValueError as e:
        raise CheckpointError(f"{where} does not fit {model_name}: {one_line(e)}") from None
