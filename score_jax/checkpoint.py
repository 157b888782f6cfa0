"""Orbax checkpoints: the last few for resume, the best by validation PGD accuracy apart.

`<workdir>/checkpoints/<step>` holds the full TrainState (params, BatchNorm statistics, optimizer
state, EMA, step; the data position and every random key are functions of (seed, step)) and a JSON
`meta` item (the config fingerprint, validation metrics). `<workdir>/best/<step>` holds the best.
Orbax writes into a temporary directory and renames it when complete, so a checkpoint that was
being written when the process died is never restored.

Integrity: `meta["checksums"]` holds the CRC-32 of each state leaf's bytes, computed on the host
from the arrays being saved (every process computes them from its replica of the replicated
state; process 0's meta is the one written). `restore` recomputes them from the restored arrays
and raises CheckpointError on a mismatch (bit rot, a replaced or damaged data file), so a corrupt
checkpoint is never restored silently. The cost is one host copy and one CRC pass over the
state per save and per restore (CRC-32 runs at several GB/s).
"""

import os
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from score_jax import workdir_io
from score_jax.errors import CheckpointError

# Config fields that define a run's trajectory: a checkpoint written under other values of these
# is not resumed (unless config.resume_ignore_mismatch).
FINGERPRINT_FIELDS = (
    "seed",
    "init_from",
    "batch_size",
    "dataset",
    "model",
    "loss",
    "attack",
    "augment",
    "optim",
    "ema",
    "sync_batch_stats",
    "bn_first_batch_stats",
)
# Fields added after checkpoints were first written -> the value every run had before, so that a
# checkpoint without them resumes only where the field still has that value.
ADDED_FIELDS = {
    "bn_first_batch_stats": False,
    "dataset.real_sampling": "stream",
    "loss.trades_pass_order": "clean_first",
}


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The trajectory-defining part of the config as plain JSON data."""
    return {k: _jsonable(config.get(k)) for k in FINGERPRINT_FIELDS if k in config}


def _jsonable(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def corrupt_error(path: str, error: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint at `path` that failed to restore with `error`."""
    if isinstance(error, CheckpointError):
        reason = str(error)
    else:
        text = " ".join(str(error).split())[:160]
        reason = f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {text})"
    return CheckpointError(reason + FALLBACK_HINT)


FALLBACK_HINT = "; set --config.resume_fallback=True to use the previous checkpoint"


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of the fields whose values differ (`saved`'s renamed fields by their new
    names, config_checks.RENAMED, so a checkpoint written before a rename still resumes; a
    field of ADDED_FIELDS missing from `saved` has its value from before it existed)."""
    from score_jax.config_checks import RENAMED

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else k))
        return out

    a, b = {RENAMED.get(k, k): v for k, v in flat(saved).items()}, flat(current)
    a = {**{k: v for k, v in ADDED_FIELDS.items() if k in b}, **a}
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _host_array(leaf: Any) -> np.ndarray:
    """This process's full copy of a (replicated) leaf, without a cross-process gather."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(jax.device_get(leaf))


def checksums(state: Any) -> dict[str, str]:
    """{leaf path: "crc32:<hex>"} of every array leaf of `state` (dtype and shape included)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = _host_array(leaf)
        crc = zlib.crc32(f"{array.dtype.str}{array.shape}".encode())
        crc = zlib.crc32(array.reshape(-1).view(np.uint8), crc)  # bytes of any dtype (bfloat16)
        out[jax.tree_util.keystr(path)] = f"crc32:{crc:08x}"
    return out


def verify_checksums(state: Any, saved: dict[str, str], where: str) -> None:
    """Raises CheckpointError naming `where` and the first leaf whose checksum differs."""
    current = checksums(state)
    bad = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if bad:
        raise CheckpointError(
            f"checkpoint {where} is corrupt: the checksum of {len(bad)} array(s) differs from the "
            f"one recorded when it was written (first: {bad[0]})"
        )


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
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep,
                    create=True,
                    # Multi-process: synchronous saves. Orbax's background commit across
                    # processes (gloo, CPU) hung or lost a process's array metadata on the
                    # loaded 2-core test machine now and then.
                    enable_async_checkpointing=jax.process_count() == 1,
                ),
                item_names=("state", "meta"),
            )

        self.workdir = workdir
        with self._io("opening the checkpoints in"):
            self.last = manager("checkpoints", keep)
            self.best = manager("best", 1)

    def _io(self, what: str, step: int | None = None, best: bool = False):
        """A workdir_io.storage_call (bounded by the storage watchdog of a remote workdir)."""
        where = self.workdir if step is None else self.step_dir(step, best)
        return workdir_io.storage_call(f"{what} {where}", self.workdir)

    def all_steps(self) -> list[int]:
        with self._io("listing the checkpoints in"):
            return sorted(self.last.all_steps())

    def step_dir(self, step: int, best: bool = False) -> str:
        return os.path.join(str((self.best if best else self.last).directory), str(step))

    def delete(self, step: int) -> None:
        with self._io("deleting checkpoint", step):
            self.last.delete(step)

    def latest_step(self, best: bool = False) -> int | None:
        with self._io("listing the checkpoints in"):
            return (self.best if best else self.last).latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], best: bool = False) -> None:
        """Saves (asynchronously) the state and meta (with the state's checksums) at `step`."""
        manager = self.best if best else self.last
        if step in manager.all_steps():
            return
        meta = {**meta, "checksums": checksums(state)}
        # Waits for the previous save to be written, then starts this one (in the background).
        with self._io("saving checkpoint", step, best):
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )

    def restore_meta(self, step: int | None = None, best: bool = False) -> dict[str, Any]:
        manager = self.best if best else self.last
        with self._io("reading checkpoint", step, best):
            step = manager.latest_step() if step is None else step
            return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]

    def restore(
        self, template: Any, step: int | None = None, best: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """(state, meta) at `step` (default: the latest), shaped and placed like `template`
        (arrays, or jax.ShapeDtypeStructs with shardings: `Setup.state_template()`).

        CheckpointError if the restored arrays do not match the checksums recorded at save time
        (checkpoints written before checksums were recorded are restored unverified).
        """
        manager = self.best if best else self.last
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        with self._io("restoring checkpoint", step, best):
            step = manager.latest_step() if step is None else step
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        state, meta = restored["state"], restored["meta"]
        if "checksums" in meta:
            verify_checksums(state, meta["checksums"], self.step_dir(step, best))
        return state, meta

    def restore_final(
        self, template: Any, prefer_best: bool = True, fallback: bool = False
    ) -> tuple[Any, dict[str, Any], bool]:
        """(state, meta, from_best) of the best checkpoint if there is one and `prefer_best`,
        else of the newest; what evaluation and export use.

        A corrupt or truncated checkpoint is a CheckpointError naming it; with `fallback`
        (config.resume_fallback) the next candidate is tried (best, then the last ones, newest
        first) and nothing is deleted. CheckpointError if there is no checkpoint.
        """
        candidates = [(s, False) for s in reversed(self.all_steps())]
        if prefer_best and self.latest_step(best=True) is not None:
            candidates.insert(0, (self.latest_step(best=True), True))
        if not candidates:
            raise CheckpointError(
                f"{os.path.dirname(str(self.last.directory))!r} holds no checkpoint"
            )
        for step, best in candidates:
            try:
                state, meta = self.restore(template, step, best=best)
            except Exception as e:  # orbax / tensorstore errors of a damaged checkpoint
                error = corrupt_error(self.step_dir(step, best), e)
                if not fallback:
                    raise error from None
                logging.warning("Skipping a corrupt checkpoint: %s", error)
                continue
            return state, meta, best
        raise CheckpointError(
            f"no checkpoint in {os.path.dirname(str(self.last.directory))!r} could be restored"
        )

    def wait(self) -> None:
        with self._io("writing the pending checkpoints in"):
            self.last.wait_until_finished()
            self.best.wait_until_finished()

    def close(self) -> None:
        with self._io("closing the checkpoints in"):
            self.last.close()
            self.best.close()
