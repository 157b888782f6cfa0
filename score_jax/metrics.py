"""The training loop's metrics: the window of step metrics between two log lines, and the writer.

`TrainMetrics.push(step, metrics)` queues a step's device metrics and reads the previous step's
(one step late, so the loop never waits for the device); reading checks them finite
(`DivergedError` otherwise) and, at the log cadence, writes the window's means and images/s.
`MetricWriter` writes <workdir>/metrics.jsonl and TensorBoard scalars (process 0 only).
"""

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from score_jax import workdir_io
from score_jax.errors import DivergedError

METRICS_FILE = "metrics.jsonl"


def itstime(step: int, every_n_steps: int, total_steps: int, last: bool = True) -> bool:
    """Whether something done every `every_n_steps` (0: never) is due after `step` steps; with
    `last`, also after the run's last step (big_vision's `itstime`)."""
    return (last and step == total_steps) or (every_n_steps > 0 and step % every_n_steps == 0)


class MetricWriter:
    """metrics.jsonl + TensorBoard scalars, written by process 0 only (local or gs:// workdirs:
    workdir_io.MetricsLog rewrites a remote metrics.jsonl, which cannot be appended to)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.log = self.tb = None
        self.tb_dir = workdir_io.join(workdir, "tensorboard")
        if self.enabled:
            self.log = workdir_io.MetricsLog(workdir_io.join(workdir, METRICS_FILE))
            self.tb = workdir_io.summary_writer(workdir_io.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.log.append({"step": step, **scalars})
        with workdir_io.storage_call(f"writing {self.tb_dir}", self.tb_dir):
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after `step` (written before a crash, to be written again)."""
        if self.enabled:
            self.log.truncate_after(step)

    def drop_test_lines(self) -> None:
        """Drops earlier test-only lines (a new test evaluation replaces them)."""
        if self.enabled:
            self.log.retain(lambda r: not all(k == "step" or k.startswith("test/") for k in r))

    def close(self) -> None:
        if self.enabled:
            self.log.close()
            with workdir_io.storage_call(f"writing {self.tb_dir}", self.tb_dir):
                self.tb.close()


class TrainMetrics:
    """The pending step's device metrics and the window of read ones since the last log line.

    Every `log_every_steps` steps (and after the last) it writes train/<metric> (the window's
    mean) and train/epoch, then perf/images_per_s on a line of its own (a speed, not part of the
    bit-reproducible training record), and shows them on the progress bar or prints them.
    `latest_checkpoint()` (called when a step diverged) names the newest saved step, or None.
    """

    def __init__(
        self,
        writer: MetricWriter,
        *,
        batch_size: int,
        steps_per_epoch: int,
        total_steps: int,
        log_every_steps: int,
        latest_checkpoint: Callable[[], int | None],
        progress: Any = None,
    ):
        self.writer, self.progress = writer, progress
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.total_steps, self.log_every_steps = total_steps, log_every_steps
        self.latest_checkpoint = latest_checkpoint
        self.show = jax.process_index() == 0
        self.window: list[dict[str, float]] = []
        self.pending: tuple[int, Any] | None = None  # (step, device metrics), read one step late
        self.window_start = time.perf_counter()

    def push(self, step: int, metrics: Any) -> None:
        """Queues step `step`'s metrics after reading the previous step's."""
        self.flush()
        self.pending = (step, metrics)
        if self.progress is not None:
            self.progress.update(1)

    def flush(self) -> None:
        """Reads the pending step's metrics (waiting for the device), if any."""
        if self.pending is not None:
            step, metrics = self.pending
            self.pending = None
            self._read(step, metrics)

    def _read(self, step: int, device_metrics: Any) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        flags = {k: metrics.pop(k) for k in list(metrics) if k.startswith("finite")}
        if not flags["finite"]:
            self._diverged(step, metrics, flags)
        self.window.append(metrics)
        if itstime(step + 1, self.log_every_steps, self.total_steps):
            self._log(step + 1)

    def _diverged(self, step: int, metrics: dict[str, float], flags: dict[str, float]) -> None:
        bad = [k.removeprefix("finite_") for k, v in sorted(flags.items()) if not v]
        bad = [k for k in bad if k != "finite"] or ["loss"]
        last = self.latest_checkpoint()
        newest = (
            "no checkpoint was written" if last is None else f"the newest checkpoint is step {last}"
        )
        values = (
            f"(loss {metrics['loss']:.4g}, grad_norm {metrics['grad_norm']:.4g}, learning_rate "
            f"{metrics['learning_rate']:.4g})"
        )
        if step == 0 and not (flags.get("finite_loss", 1) and flags.get("finite_grad_norm", 1)):
            # The loss and gradient are those of the initial weights: no learning rate acted yet.
            raise DivergedError(
                f"training diverged at step 1: non-finite {', '.join(bad)} {values} at the "
                "initial weights, before any update (so not the learning rate); check "
                "config.init_from's weights, the data and config.model.dtype"
            )
        raise DivergedError(
            f"training diverged at step {step + 1}: non-finite {', '.join(bad)} {values}; the "
            f"step was discarded; {newest}; lower config.optim.learning_rate or set "
            "config.optim.grad_clip_norm"
        )

    def _log(self, done: int) -> None:
        elapsed = time.perf_counter() - self.window_start
        window = self.window
        scalars = {f"train/{k}": float(np.mean([m[k] for m in window])) for k in window[0]}
        scalars["train/epoch"] = done / self.steps_per_epoch
        self.writer.write(done, scalars)
        images_per_s = len(window) * self.batch_size / elapsed
        self.writer.write(done, {"perf/images_per_s": images_per_s})
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{scalars['train/loss']:.4f}", img_s=f"{images_per_s:.0f}"
            )
        elif self.show:
            shown = ", ".join(
                f"{k.removeprefix('train/')} {v:.4g}" for k, v in sorted(scalars.items())
            )
            print(
                f"step {done}/{self.total_steps}: {shown}, {images_per_s:.1f} images/s", flush=True
            )
        self.window = []
        self.window_start = time.perf_counter()

    def close(self) -> None:
        """Reads the pending step and closes the progress bar."""
        self.flush()
        if self.progress is not None:
            self.progress.close()
