"""Shared helpers of the experiment scripts: load a trained workdir, write results."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from score_jax import checkpoint, trainer

CONFIG_FILE = "config.json"


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved as <workdir>/config.json (written by `train_and_evaluate`)."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the config of workdir {workdir!r}: {e}") from None


@dataclasses.dataclass
class Restored:
    """A trained model: its Setup, host-side variables {"params", "batch_stats"} and provenance."""

    setup: trainer.Setup
    variables: dict[str, Any]
    checkpoint: str  # "best" | "last"
    step: int

    def logits_fn(self, x: jax.Array) -> jax.Array:
        """f(x): the model's logits in eval mode (running BatchNorm statistics)."""
        return self.setup.model.apply(self.variables, x, train=False)


def load_workdir(
    workdir: str,
    params: str = "ema",
    which: str = "auto",
    config: ml_collections.ConfigDict | None = None,
) -> Restored:
    """A checkpoint of `workdir` with the EMA (or "raw") parameters and the live BatchNorm
    statistics. which="auto": the best checkpoint, else the last (as `trainer.evaluate_workdir`);
    "last": the newest one (for runs whose best-by-PGD selection is meaningless: undefended)."""
    if params not in ("ema", "raw"):
        raise ValueError(f"params={params!r}; valid: ema, raw")
    if which not in ("auto", "last"):
        raise ValueError(f"which={which!r}; valid: auto, last")
    config = load_config(workdir) if config is None else config
    setup = trainer.Setup(config, workdir)
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    try:
        state, _, use_best = ckpt.restore_final(setup.state_template(), prefer_best=which == "auto")
    finally:
        ckpt.close()
    chosen = state.ema_params if params == "ema" else state.params
    variables = jax.device_get({"params": chosen, "batch_stats": state.batch_stats})
    return Restored(setup, variables, "best" if use_best else "last", int(state.step))


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Writes `payload` as indented JSON, creating the directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
