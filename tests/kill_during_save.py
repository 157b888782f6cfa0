"""`python tests/kill_during_save.py STEP <score_jax.main flags>`: trains like `score_jax.main`,
but SIGKILLs itself as soon as the checkpoint of STEP has been handed to orbax (whose writes
are asynchronous), so the process dies while that checkpoint is being written."""

import os
import signal
import sys

from absl import app

from score_jax import checkpoint, main

KILL_STEP = int(sys.argv.pop(1))
_save = checkpoint.Checkpointer.save


def _save_then_die(self, step, state, meta, best=False):
    _save(self, step, state, meta, best=best)
    if step == KILL_STEP and not best:
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint.Checkpointer.save = _save_then_die
app.run(main.main, flags_parser=main.parse_flags)
