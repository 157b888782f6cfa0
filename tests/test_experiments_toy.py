"""The toy experiments (experiments/toy_1d.py, experiments/bounds_check.py) in their --quick form.

The asserted claims are properties of correct code (Theorem 1 and the paper's toy figures), not
tuned numbers: the quick forms use a coarser grid and fewer steps, and the claims still hold.
"""

import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))

import bounds_check  # noqa: E402
import toy_1d  # noqa: E402
import toy_problem as tp  # noqa: E402


def test_oracle_has_zero_score_and_madry_equal_to_c():
    """p_t = p_d: R_SCORE = 0 and R_Madry = C_D exactly (the tight case of Theorem 1)."""
    problem = tp.make_problem(1000, seed=1, grid=tp.make_grid(step=0.1))
    _, pd, window, weights = problem.arrays()
    for kind in ("kl", "l2", "js_dist"):
        r = tp.risks(pd, pd, window, weights, kind)
        assert float(r["score"]) == 0.0 and float(r["standard"]) == 0.0
        assert float(r["madry"]) == float(r["C"]) > 0.0
    assert np.isclose(float(jnp.sum(weights)), 1.0)
    # Windows: every x' within the radius, clipped to the support, offset 0 included.
    g = problem.grid
    assert np.all(np.abs(g.x[g.window] - g.x[:, None]) <= tp.RADIUS + 1e-9)
    assert np.all(g.window[:, g.window.shape[1] // 2] == np.arange(g.size))


@pytest.mark.slow
def test_toy_1d_quick(tmp_path):
    toy_1d.main(["--out", str(tmp_path), "--quick", "--no_plots"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "fig1", "fig2", "fig3", "fig6"} <= set(res)
    for fig in ("fig1", "fig2"):
        assert set(res[fig]) == {"standard", "madry", "score"}
        assert all(np.isfinite(v["gap"]) for v in res[fig].values())
    # Fig. 1: SCORE's optimum is p_d, Madry's is over-smoothed.
    assert res["fig1"]["score"]["gap"] < res["fig1"]["madry"]["gap"]
    # Fig. 3: R^l2_Madry drops below C_l2, and R^l2_SCORE then rises from its minimum.
    f3 = res["fig3"]
    assert {"C", "madry_final", "step_madry_below_C", "step_score_min"} <= set(f3)
    assert f3["step_madry_below_C"] is not None
    assert f3["score_final"] > f3["score_min"]
    f6 = res["fig6"]
    assert {"C_kl", "C_l1", "madry_final", "score_l1_final", "alignment_final"} <= set(f6)
    assert f6["C_kl"] >= f6["C_l1"] ** 2 / 2  # Pinsker


@pytest.mark.slow
def test_bounds_check_quick(tmp_path):
    bounds_check.main(["--out", str(tmp_path), "--quick"])
    res = json.loads((tmp_path / "results.json").read_text())
    bad = [c for c in res["checks"] if not c["holds"]]
    assert res["all_hold"] is True, bad[:5]
    pairs = {(c["theorem"], c["D"]) for c in res["checks"]}
    expected = {("theorem1", d) for d in bounds_check.DISTANCES}
    expected |= {("theorem3", d) for d in bounds_check.DISTANCES}
    expected |= {("theorem2", d) for d, _ in bounds_check.PHI_PAIRS} | {("corollary1", "l1")}
    assert expected <= pairs
    for c in res["checks"]:
        assert {"theorem", "D", "model", "lhs", "rhs", "slack", "holds"} <= set(c)
