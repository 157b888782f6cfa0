"""Entry point: `python -m score_jax.main --config configs/<name>.py --workdir <dir> [--mode ...]`.

Flags and dispatch only; everything else lives in the library.
"""

import functools
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from score_jax import config_checks, trainer, workdir_io
from score_jax.errors import ScoreError

FLAGS = flags.FLAGS
MODES = ("train", "eval", "export", "autoattack")

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum(
    "mode",
    "train",
    MODES,
    "train (resumes from workdir), eval (test split), export (PyTorch state dict to "
    "<workdir>/export) or autoattack (AutoAttack on the export; needs torch and pyautoattack).",
)
flags.DEFINE_enum(
    "export_params",
    "auto",
    ("auto", "ema", "raw"),
    "Parameters --mode export/autoattack exports; auto: those selection used (config.best_by).",
)
config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
flags.DEFINE_bool(
    "distributed", False, "Multi-process run: call jax.distributed.initialize() (TPU pods, SLURM)."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_float(
    "storage_timeout_s",
    300.0,
    "gs:// workdirs: a storage call (a checkpoint save, a metrics write) that has not returned "
    "after this many seconds ends the run with one line naming the path; after a storage error "
    "or SIGTERM the run has min(30, this) / this many seconds left to exit.",
    lower_bound=1.0,
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    workdir_io.quiet_failed_writes(logging.get_absl_handler())
    if FLAGS.distributed or FLAGS.coordinator_address:
        # Cross-process collectives between CPU devices (accelerators use their own).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    logging.warning(
        "JAX devices: %s (process %d of %d)",
        jax.devices(),
        jax.process_index(),
        jax.process_count(),
    )
    workdir_io.arm_storage_watchdog(FLAGS.workdir, FLAGS.storage_timeout_s)
    try:
        if FLAGS.mode in ("export", "autoattack"):
            from score_jax import torch_bridge

            torch_bridge.require_torch(autoattack=FLAGS.mode == "autoattack")
            from score_jax.torch_bridge import autoattack_eval, export

            run = functools.partial(
                export.export_workdir if FLAGS.mode == "export" else autoattack_eval.run_autoattack,
                params=FLAGS.export_params,
            )
        else:
            run = trainer.train_and_evaluate if FLAGS.mode == "train" else trainer.evaluate_workdir
        run(FLAGS.config, FLAGS.workdir)
    except ScoreError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        _exit_with_error(" ".join(str(e).split()))
    except Exception as e:
        # The storage failing (a full disk, a remote store down) is not a bug: one line, and its
        # clients would keep retrying at exit (the watchdog ends the process after its grace).
        line = workdir_io.storage_failure_line(FLAGS.workdir, e)
        if line is None:
            raise
        _exit_with_error(line)


def _exit_with_error(line: str) -> None:
    """Prints `score_jax: error: <line>` and exits 1 (within the storage watchdog's grace)."""
    workdir_io.shutdown_within_grace("the error")
    workdir_io.mark_reported()
    sys.exit("score_jax: error: " + line)


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with a bad flag or config override reported in one line."""
    spec = config_checks.config_arg(argv)
    path = spec.partition(":")[0] if spec else None
    if path and not os.path.isfile(path):
        sys.exit(
            f"score_jax: error: --config {spec}: no such file {path!r} (relative paths are from "
            f"{os.getcwd()})"
        )
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        reason = config_checks.explain_flag_error(argv, e)
        sys.exit(f"score_jax: error: bad flag or config override: {reason}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
