"""AutoAttack (Croce & Hein, ICML 2020) in JAX: pure jitted attacks, checked against pyautoattack.

Parts (each a pure function of arrays; a model enters only as `logits_fn(x) -> logits`, x NHWC
in [0, 1]; every attack returns (x_adv, robust) with per-example flags):

  apgd    APGD on the cross-entropy (`apgd_ce`) and targeted APGD on the DLR loss
          (`apgd_targeted`, top-9 targets); `dlr_loss`, `dlr_loss_targeted`, `checkpoint_schedule`
  fab     targeted FAB (`fab_targeted`, 9 targets, 100 iterations) and its projections
          `projection_linf` / `projection_l2`
  square  the Square attack (`square_attack`, 5000 queries, p_init 0.8) and its `window_fraction`
  suite   the "standard" version in sequence, each stage on the still-robust examples, over a
          1-D device mesh ("batch"), every break re-checked on the returned point: `evaluate`,
          `make_stage_fns`, `run_attack`, `verify_breaks`, `reported_version` ("standard" only
          at STANDARD_COUNTS, else "reduced")

Defaults are pyautoattack's AutoAttack(version="standard") settings, Linf and L2. Each module's
docstring states the algorithm and where static shapes force a difference from the reference.
"""

from score_jax.autoattack.apgd import (
    apgd_ce,
    apgd_run,
    apgd_targeted,
    checkpoint_schedule,
    dlr_loss,
    dlr_loss_targeted,
)
from score_jax.autoattack.fab import fab_targeted, projection_l2, projection_linf
from score_jax.autoattack.square import square_attack, window_fraction, window_size
from score_jax.autoattack.suite import (
    ATTACKS,
    STANDARD_COUNTS,
    evaluate,
    make_stage_fns,
    reported_version,
    resolve_attacks,
    run_attack,
    verify_breaks,
)

__all__ = [
    "ATTACKS",
    "STANDARD_COUNTS",
    "apgd_ce",
    "apgd_run",
    "apgd_targeted",
    "checkpoint_schedule",
    "dlr_loss",
    "dlr_loss_targeted",
    "evaluate",
    "fab_targeted",
    "make_stage_fns",
    "projection_l2",
    "projection_linf",
    "reported_version",
    "resolve_attacks",
    "run_attack",
    "square_attack",
    "verify_breaks",
    "window_fraction",
    "window_size",
]
