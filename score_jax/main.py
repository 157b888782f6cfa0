"""Entry point: `python -m score_jax.main --config configs/<name>.py --workdir <dir> [--mode ...]`.

Flags and dispatch only; everything else lives in the library.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from score_jax import trainer

FLAGS = flags.FLAGS
MODES = ("train", "eval")

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum("mode", "train", MODES, "train (resumes from workdir) or eval (test split).")
config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    logging.warning(
        "JAX devices: %s (process %d of %d)",
        jax.devices(),
        jax.process_index(),
        jax.process_count(),
    )
    run = trainer.train_and_evaluate if FLAGS.mode == "train" else trainer.evaluate_workdir
    try:
        run(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback
        sys.exit(f"score_jax: error: {e}")


if __name__ == "__main__":
    app.run(main)
