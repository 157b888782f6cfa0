"""`--mode export`: a workdir's checkpoint as <workdir>/export/model.pt (a PyTorch state dict,
via `convert`) and model.json (architecture, kwargs, normalisation, sha256), and `load_exported`,
which reads them back as the PyTorch twin. The conversion itself is `convert`.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import torch
from torch import nn

from score_jax import checkpoint, models, workdir_io
from score_jax.errors import CheckpointError, ConfigError, one_line
from score_jax.torch_bridge.convert import export_state_dict
from score_jax.torch_bridge.models import build_torch_model

EXPORT_DIR = "export"
MODEL_FILE = "model.pt"
META_FILE = "model.json"
PARAM_CHOICES = ("auto", "ema", "raw")  # auto: config.best_by, the parameters selection used


def resolve_params(config: ml_collections.ConfigDict, params: str) -> str:
    """ "ema" or "raw": `params`, or config.best_by for "auto"; ValueError naming the flag."""
    if params not in PARAM_CHOICES:
        raise ConfigError(f"--export_params={params!r}; valid: {', '.join(PARAM_CHOICES)}")
    return config.best_by if params == "auto" else params


def export_dir(workdir: str) -> str:
    """<workdir>/export (local or gs://)."""
    return os.fspath(workdir_io.join(workdir, EXPORT_DIR))


def _final_state(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, bool, Any]:
    """(state, from_best, dataset info) of the workdir's final checkpoint (`restore_final`).

    The restore target is the training setup's `state_template()` (the initial state's tree,
    optimizer state included, as shapes: nothing is initialised); the setup is built from the
    dataset's info alone (no data is read): the bridge's one use of the training code, imported
    here only.
    """
    from score_jax import data
    from score_jax.setup import Setup

    setup = Setup(config, workdir, dataset=data.dataset_info(config.dataset))
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    try:
        state, _, use_best = ckpt.restore_final(
            setup.state_template(), fallback=config.resume_fallback
        )
    finally:
        ckpt.close()
    return state, use_best, setup.info


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
    state, use_best, dataset = _final_state(config, workdir)
    chosen = state.ema_params if params == "ema" else state.params
    variables = jax.device_get({"params": chosen, "batch_stats": state.batch_stats})
    name = config.model.name
    state_dict = export_state_dict(name, variables)
    model = models.from_config(config.model, dataset.num_classes, dataset.mean, dataset.std)
    kwargs = models.architecture_kwargs(name, model)
    # Fails here, not at load time, if the PyTorch twin does not take these weights.
    build_torch_model(name, dataset.num_classes, **kwargs).load_state_dict(state_dict, strict=True)
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
        "num_classes": dataset.num_classes,
        "mean": kwargs["mean"],
        "std": kwargs["std"],
        "dataset": config.dataset.name,
        "image_shape": list(dataset.image_shape),
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
        raise CheckpointError(f"cannot read export metadata {path}: {one_line(e)}") from None
    return meta


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
        raise CheckpointError(f"cannot load exported model {path}: {one_line(e)}") from None
    try:
        model = build_torch_model(meta["architecture"], int(meta["num_classes"]), **meta["kwargs"])
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"exported model {path} does not match {os.path.join(directory, META_FILE)}: "
            f"{one_line(e)}"
        ) from None
    return model.eval()
