"""Theorems 1-3 of Pang et al. (ICML 2022) checked numerically on the 1-D toy problem.

    python experiments/bounds_check.py --out /tmp/bounds           # 8 models + the oracle
    python experiments/bounds_check.py --out /tmp/bounds --quick   # 4 models + the oracle

For every model p_t (random MLPs, partly trained MLPs, and the oracle p_t = p_d), in float64:
  Theorem 1 (D a distance: l1, l2, linf, js_dist):
      |R^D_Madry - C_D| <= R^D_SCORE <= R^D_Madry + C_D
  Theorem 2 (phi = square, increasing and convex; phi o D: se = l2^2, js = js_dist^2, l1_sq = l1^2):
      |R^D_SCORE - C_D| <= phi^-1(R^{phi o D}_Madry) = sqrt(R^{phi o D}_Madry)
  Corollary 1 (Theorem 2 with D = l1 and Pinsker, l1^2 <= 2 KL):
      |R^l1_SCORE - C_l1| <= sqrt(2 R^KL_Madry)
  Theorem 3 (D a distance, beta in {1, 3, 6}):
      R^D_Madry <= R^D_TRADES(beta) <= (1 + 2 beta) R^D_Madry,
      R^D_TRADES(beta) = E_x [D(p_d(.|x) || p_t(.|x)) + beta max_{x'} D(p_t(.|x) || p_t(.|x'))].
The proofs are pointwise (triangle inequality at the maximiser, max of a sum <= sum of maxes, x in
B(x)), so they hold exactly for maxima over any finite set of x' per sample that contains x, as
long as every risk uses the SAME set: here the 101 (quick: 41) grid points of each window of
`toy_problem`. A violation beyond 1e-6 is a bug. Writes results.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:
    from experiments import toy_problem as tp
except ImportError:  # run as a script: experiments/ is sys.path[0]
    import toy_problem as tp

TOL = 1e-6
DISTANCES = ("l1", "l2", "linf", "js_dist")
PHI_PAIRS = (("l2", "se"), ("js_dist", "js"), ("l1", "l1_sq"))  # (D, phi o D), phi = square
BETAS = (1.0, 3.0, 6.0)


def random_params(seed: int, scale: float) -> dict:
    """A random MLP: Flax-init kernels times `scale`, biases scale * N(0, 0.5^2)."""
    params = tp.init_params(seed)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1000 + seed), len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    new = [
        scale * 0.5 * jax.random.normal(k, leaf.shape) if "bias" in path else scale * leaf
        for leaf, k, path in zip(leaves, keys, paths, strict=True)
    ]
    return jax.tree.unflatten(treedef, new)


def make_models(problem: tp.Problem, quick: bool) -> dict[str, dict]:
    """Random MLPs (several weight scales) and partly trained ones (float32 training)."""
    if quick:
        scales, trained, steps = (1.0, 4.0), (("madry", "kl", 5), ("score", "kl", 6)), 40
    else:
        scales = (1.0, 2.0, 4.0, 8.0)
        trained = (
            ("standard", "kl", 4),
            ("madry", "kl", 5),
            ("score", "kl", 6),
            ("madry", "l2", 7),
        )
        steps = 100
    models = {f"random_s{s:g}_seed{i}": random_params(i, s) for i, s in enumerate(scales)}
    for name, kind, seed in trained:
        params, _ = tp.train(problem, name, kind, steps=steps, seed=seed)
        models[f"trained_{name}_{kind}_{steps}steps_seed{seed}"] = params
    return models


def _check(theorem: str, d: str, model: str, lhs: float, rhs: float, **extra) -> dict:
    slack = float(rhs - lhs)
    return {"theorem": theorem, "D": d, "model": model, **extra, "lhs": float(lhs),
            "rhs": float(rhs), "slack": slack, "holds": bool(slack >= -TOL)}  # fmt: skip


def check_model(name: str, q: jax.Array, problem: tp.Problem) -> list[dict]:
    """All inequalities for one model's p_t(y=1|.) on the grid (float64)."""
    _, pd, window, weights = problem.arrays(jnp.float64)
    kinds = set(DISTANCES) | {k for pair in PHI_PAIRS for k in pair} | {"kl"}
    r = {k: {n: float(v) for n, v in tp.risks(q, pd, window, weights, k).items()} for k in kinds}
    checks = []
    for d in DISTANCES:
        m, s, c = r[d]["madry"], r[d]["score"], r[d]["C"]
        checks.append(_check("theorem1", d, name, abs(m - c), s, bound="lower"))
        checks.append(_check("theorem1", d, name, s, m + c, bound="upper"))
        for beta in BETAS:
            t = float(tp.trades_risk(q, pd, window, weights, d, beta))
            checks.append(_check("theorem3", d, name, m, t, bound="lower", beta=beta))
            checks.append(
                _check("theorem3", d, name, t, (1 + 2 * beta) * m, bound="upper", beta=beta)
            )
    for d, phi_d in PHI_PAIRS:
        lhs = abs(r[d]["score"] - r[d]["C"])
        checks.append(_check("theorem2", d, name, lhs, np.sqrt(r[phi_d]["madry"]), phi_D=phi_d))
    lhs = abs(r["l1"]["score"] - r["l1"]["C"])
    checks.append(_check("corollary1", "l1", name, lhs, np.sqrt(2.0 * r["kl"]["madry"])))
    return checks


def non_distance_slacks(name: str, q: jax.Array, problem: tp.Problem) -> dict[str, float]:
    """Theorem 1's slacks with KL and SE, which are not distances (information only).

    Returns min(R_SCORE - |R_Madry - C|, R_Madry + C - R_SCORE) per kind: negative = Theorem 1's
    form fails, which shows the triangle inequality is what the theorem needs.
    """
    _, pd, window, weights = problem.arrays(jnp.float64)
    out = {}
    for kind in ("kl", "se"):
        r = {n: float(v) for n, v in tp.risks(q, pd, window, weights, kind).items()}
        lower = r["score"] - abs(r["madry"] - r["C"])
        out[kind] = min(lower, r["madry"] + r["C"] - r["score"])
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="4 models, 6,000 samples, grid 0.05")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Check every inequality for every model; write results.json into --out; return it."""
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    num_samples, grid_step = (6_000, 0.05) if args.quick else (60_000, tp.GRID_STEP)
    problem = tp.make_problem(num_samples, seed=0, grid=tp.make_grid(step=grid_step))
    models = make_models(problem, args.quick)
    checks, non_distance = [], {}
    with jax.enable_x64(True):  # float64 for the checks only, not for the rest of the process
        x = jnp.asarray(problem.grid.x, jnp.float64)
        for name, params in models.items():
            params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
            q = tp.MLP().apply(params64, x)
            checks += check_model(name, q, problem)
            non_distance[name] = non_distance_slacks(name, q, problem)
        checks += check_model("oracle_p_d", jnp.asarray(problem.grid.pd), problem)
    min_slack: dict[str, float] = {}
    min_slack_models: dict[str, float] = {}
    for c in checks:
        key = f"{c['theorem']}/{c.get('bound', '')}/{c['D']}".replace("//", "/")
        min_slack[key] = min(min_slack.get(key, np.inf), c["slack"])
        if c["model"] != "oracle_p_d":
            min_slack_models[key] = min(min_slack_models.get(key, np.inf), c["slack"])
    results = {
        "config": {
            "num_samples": num_samples,
            "grid_step": grid_step,
            "offsets_per_window": int(problem.grid.window.shape[1]),
            "tolerance": TOL,
            "dtype": "float64",
            "models": list(models) + ["oracle_p_d"],
            "quick": args.quick,
        },
        "all_hold": all(c["holds"] for c in checks),
        "num_checks": len(checks),
        "num_violations": sum(not c["holds"] for c in checks),
        "min_slack": min_slack,
        "min_slack_without_oracle": min_slack_models,
        "theorem1_with_non_distances": non_distance,
        "checks": checks,
        "runtime_s": time.time() - start,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    res = main()
    print(json.dumps({k: res[k] for k in ("all_hold", "num_checks", "num_violations")}))
    print(json.dumps(res["min_slack"], indent=1))
    print(f"runtime {res['runtime_s']:.1f} s")
