"""Flax variables <-> PyTorch state dicts, and `--mode export` (<workdir>/export/model.{pt,json}).

Conv kernels HWIO <-> OIHW, Dense (in, out) <-> Linear (out, in); BatchNorm scale/bias <->
weight/bias, batch_stats mean/var <-> running_mean/running_var (+ num_batches_tracked = 0).
"""

import json
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import torch
from flax import traverse_util
from torch import nn

from score_jax import checkpoint, trainer, workdir_io
from score_jax.errors import CheckpointError, ConfigError
from score_jax.torch_bridge.models import ARCH_FIELDS, build_torch_model, family

EXPORT_DIR = "export"
MODEL_FILE = "model.pt"
META_FILE = "model.json"
PARAM_CHOICES = ("auto", "ema", "raw")  # auto: config.best_by, the parameters selection used


def resolve_params(config: ml_collections.ConfigDict, params: str) -> str:
    """ "ema" or "raw": `params`, or config.best_by for "auto"; ValueError naming the flag."""
    if params not in PARAM_CHOICES:
        raise ConfigError(f"--export_params={params!r}; valid: {', '.join(PARAM_CHOICES)}")
    return config.best_by if params == "auto" else params


# Flax module-name renames per family, applied to each path component.
_RENAMES: dict[str, list[tuple[str, str]]] = {
    "wrn": [(r"^layer_(\d+)$", r"layer.\1"), (r"^block_(\d+)$", r"block.\1")],
    "preact-resnet-18": [(r"^layer(\d+)_(\d+)$", r"layer\1.\2"), (r"^shortcut$", "shortcut.0")],
    "resnet-18": [
        (r"^layer(\d+)_(\d+)$", r"layer\1.\2"),
        (r"^shortcut_conv$", "shortcut.0"),
        (r"^bn_shortcut$", "shortcut.1"),
    ],
    "small-cnn": [],
}
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _is_batchnorm(module: str) -> bool:
    return module.startswith(("batchnorm", "bn"))


def _torch_key(fam: str, collection: str, path: tuple[str, ...]) -> str:
    """The state-dict key of the Flax leaf `collection`/`path`."""
    *modules, leaf = path
    renamed = []
    for m in modules:
        for pattern, repl in _RENAMES[fam]:
            m = re.sub(pattern, repl, m)
        renamed.append(m)
    if (collection, leaf) not in _LEAF_NAMES:
        raise ValueError(f"unexpected Flax leaf {collection}/{'/'.join(path)}")
    return ".".join([*renamed, _LEAF_NAMES[(collection, leaf)]])


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:  # (in, out) -> (out, in)
        return value.T
    return value


def _to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


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
    fam = family(model_name)
    state: dict[str, torch.Tensor] = {}
    bn_modules: list[str] = []
    for (collection, *path), value in _flat(variables).items():
        key = _torch_key(fam, collection, tuple(path))
        if isinstance(value, jax.ShapeDtypeStruct):
            shape = _to_torch_layout(path[-1], np.empty(value.shape, np.bool_)).shape
            state[key] = torch.empty(shape, dtype=torch.float32, device="meta")
        else:
            array = np.asarray(jax.device_get(value), dtype=np.float32)
            array = np.ascontiguousarray(_to_torch_layout(path[-1], array))
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
    fam = family(model_name)
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    used = set()
    for (collection, *path), ref in _flat(template).items():
        key = _torch_key(fam, collection, tuple(path))
        if key not in state:
            raise CheckpointError(f"state dict lacks {key!r}")
        value = _to_flax_layout(path[-1], state[key].detach().cpu().numpy())
        if value.shape != tuple(ref.shape):
            raise CheckpointError(f"{key}: shape {value.shape}, expected {tuple(ref.shape)}")
        out[collection][tuple(path)] = np.asarray(value, dtype=ref.dtype)
        used.add(key)
    extra = [k for k in state if k not in used and not k.endswith("num_batches_tracked")]
    if extra:
        raise CheckpointError(f"state dict has unexpected keys {extra[:5]}")
    return {c: traverse_util.unflatten_dict(t) for c, t in out.items()}


# --- Export of a workdir ---------------------------------------------------------------------


def export_dir(workdir: str) -> str:
    """<workdir>/export (local or gs://)."""
    return os.fspath(workdir_io.join(workdir, EXPORT_DIR))


def model_kwargs(model_name: str, flax_model: Any) -> dict[str, Any]:
    """mean, std, activation and the architecture fields of a built Flax model (JSON-able)."""
    kw: dict[str, Any] = {
        "mean": [float(v) for v in flax_model.mean],
        "std": [float(v) for v in flax_model.std],
        "activation": flax_model.activation,
    }
    for field in ARCH_FIELDS[family(model_name)]:
        value = getattr(flax_model, field)
        kw[field] = list(value) if isinstance(value, tuple | list) else value
    return kw


def export_workdir(
    config: ml_collections.ConfigDict, workdir: str, params: str = "auto"
) -> dict[str, Any]:
    """Writes <workdir>/export/model.pt (state dict) and model.json (metadata); returns the latter.

    Parameters of the best checkpoint if present, else the last: `params="auto"` those that
    selected it (config.best_by: raw in the basic setting, EMA where an EMA is trained), or
    "ema" / "raw"; BatchNorm statistics are always the live model's. In a multi-process run
    every process restores and only process 0 writes (the others return without the metadata).
    """
    params = resolve_params(config, params)
    if not checkpoint.exists(workdir):
        raise CheckpointError(f"workdir {workdir!r} holds no checkpoint to export")
    setup = trainer.Setup(config, workdir)
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    try:
        state, _, use_best = ckpt.restore_final(
            setup.initial_state(), fallback=config.resume_fallback
        )
    finally:
        ckpt.close()
    chosen = state.ema_params if params == "ema" else state.params
    variables = jax.device_get({"params": chosen, "batch_stats": state.batch_stats})
    name = config.model.name
    state_dict = export_state_dict(name, variables)
    kwargs = model_kwargs(name, setup.model)
    # Fails here, not at load time, if the PyTorch twin does not take these weights.
    build_torch_model(name, setup.dataset.num_classes, **kwargs).load_state_dict(
        state_dict, strict=True
    )
    out_dir = export_dir(workdir)
    if jax.process_index() != 0:  # every process restored (a collective); process 0 writes
        return {"architecture": name, "written_by_process": 0}
    workdir_io.makedirs(out_dir)
    model_path = os.fspath(workdir_io.join(out_dir, MODEL_FILE))
    with workdir_io.local_file_for(model_path) as local:  # torch.save needs a local file
        torch.save(state_dict, local)
    meta = {
        "architecture": name,
        "kwargs": kwargs,
        "num_classes": setup.dataset.num_classes,
        "mean": kwargs["mean"],
        "std": kwargs["std"],
        "dataset": config.dataset.name,
        "image_shape": list(setup.dataset.image_shape),
        "input": "NCHW float32 in [0, 1]; the model normalises itself",
        "epsilon": float(config.attack.eps),
        "norm": config.attack.norm,
        "params": params,
        "checkpoint": "best" if use_best else "last",
        "step": int(jax.device_get(state.step)),
        "num_parameters": int(sum(np.size(v) for v in jax.tree.leaves(variables["params"]))),
        "sha256": workdir_io.sha256(model_path),
    }
    workdir_io.write_json_atomic(workdir_io.join(out_dir, META_FILE), meta)
    print(
        f"Exported {name} ({params} params, {meta['checkpoint']} checkpoint, step "
        f"{meta['step']}) to {model_path}"
    )
    return meta


def read_meta(directory: str) -> dict[str, Any]:
    """The model.json of an export directory; CheckpointError (one line) if missing or corrupt."""
    path = os.fspath(workdir_io.join(directory, META_FILE))
    try:
        with workdir_io.open_read(path, "r") as f:
            meta = json.load(f)
        missing = [k for k in ("architecture", "kwargs", "num_classes") if k not in meta]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read export metadata {path}: {_one_line(e)}") from None
    return meta


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def load_exported(directory: str) -> nn.Module:
    """The exported PyTorch model of `directory` (<workdir>/export) in eval mode.

    Reads model.json and model.pt with `torch.load(..., weights_only=True)` after checking
    model.pt against model.json's sha256; any missing, corrupt or mismatching file raises
    CheckpointError with one line naming it.
    """
    meta = read_meta(directory)
    path = os.fspath(workdir_io.join(directory, MODEL_FILE))
    if "sha256" not in meta:
        raise CheckpointError(
            f"export metadata {os.path.join(directory, META_FILE)} records no sha256 of "
            f"{MODEL_FILE}; run --mode export again"
        )
    try:
        digest = workdir_io.sha256(path)
    except OSError as e:
        raise CheckpointError(f"cannot read exported model {path}: {e.strerror}") from None
    if digest != meta["sha256"]:
        raise CheckpointError(
            f"exported model {path} does not match the sha256 in {META_FILE} (replaced or "
            "corrupt); delete the export directory and run --mode export again"
        )
    try:
        with workdir_io.open_read(path) as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"cannot load exported model {path}: {_one_line(e)}") from None
    try:
        model = build_torch_model(meta["architecture"], int(meta["num_classes"]), **meta["kwargs"])
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"exported model {path} does not match {os.path.join(directory, META_FILE)}: "
            f"{_one_line(e)}"
        ) from None
    return model.eval()
