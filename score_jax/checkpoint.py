"""Orbax checkpoints: the last few for resume, the best by validation PGD accuracy apart.

`<workdir>/checkpoints/<step>` holds the full TrainState (params, BatchNorm statistics, optimizer
state, EMA, step; the data position and every random key are functions of (seed, step)) and a JSON
`meta` item (the config fingerprint, validation metrics). `<workdir>/best/<step>` holds the best.
Orbax writes into a temporary directory and renames it when complete, so a checkpoint that was
being written when the process died is never restored.
"""

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from score_jax import workdir_io

# Config fields that define a run's trajectory: a checkpoint written under other values of these
# is not resumed (unless config.resume_ignore_mismatch).
FINGERPRINT_FIELDS = (
    "seed",
    "batch_size",
    "dataset",
    "model",
    "loss",
    "attack",
    "augment",
    "optim",
    "ema",
    "sync_batch_stats",
)


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The trajectory-defining part of the config as plain JSON data."""
    return {k: _jsonable(config.get(k)) for k in FINGERPRINT_FIELDS if k in config}


def _jsonable(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of the fields whose values differ."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else k))
        return out

    a, b = flat(saved), flat(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def exists(workdir: str) -> bool:
    """Whether workdir (local or gs://) holds a checkpoint directory (checked without creating
    anything)."""
    return any(workdir_io.is_dir(workdir_io.join(workdir, sub)) for sub in ("checkpoints", "best"))


class Checkpointer:
    """Two orbax CheckpointManagers: `checkpoints/` (last `keep`) and `best/` (one)."""

    def __init__(self, workdir: str, keep: int = 3):
        def manager(sub: str, max_to_keep: int) -> ocp.CheckpointManager:
            return ocp.CheckpointManager(
                workdir_io.join(workdir, sub),
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
                item_names=("state", "meta"),
            )

        self.last = manager("checkpoints", keep)
        self.best = manager("best", 1)

    def all_steps(self) -> list[int]:
        return sorted(self.last.all_steps())

    def step_dir(self, step: int, best: bool = False) -> str:
        return os.path.join(str((self.best if best else self.last).directory), str(step))

    def delete(self, step: int) -> None:
        self.last.delete(step)

    def latest_step(self, best: bool = False) -> int | None:
        return (self.best if best else self.last).latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], best: bool = False) -> None:
        """Saves (asynchronously) the state and meta at `step`."""
        manager = self.best if best else self.last
        if step in manager.all_steps():
            return
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def restore_meta(self, step: int | None = None, best: bool = False) -> dict[str, Any]:
        manager = self.best if best else self.last
        step = manager.latest_step() if step is None else step
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(
        self, template: Any, step: int | None = None, best: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """(state, meta) at `step` (default: the latest), shaped and placed like `template`."""
        manager = self.best if best else self.last
        step = manager.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def restore_final(
        self, template: Any, prefer_best: bool = True
    ) -> tuple[Any, dict[str, Any], bool]:
        """(state, meta, from_best) of the best checkpoint if there is one and `prefer_best`,
        else of the newest; ValueError if there is neither. What evaluation and export use."""
        use_best = prefer_best and self.latest_step(best=True) is not None
        if not use_best and self.latest_step() is None:
            raise ValueError(f"{os.path.dirname(str(self.last.directory))!r} holds no checkpoint")
        state, meta = self.restore(template, best=use_best)
        return state, meta, use_best

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()
