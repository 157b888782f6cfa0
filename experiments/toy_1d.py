"""Figures 1, 2, 3 and 6 of Pang et al. (ICML 2022) on the 1-D toy problem of `toy_problem.py`.

    python experiments/toy_1d.py --out /tmp/toy_1d            # full (60,000 samples, 500 steps)
    python experiments/toy_1d.py --out /tmp/toy_1d --quick    # the test's form

Fig. 1: train p_t on 60,000 samples with R_Standard, R_Madry (eq. 3) and R_SCORE (eq. 4), all KL;
        gap = mean over the grid of |p_t(y=1|x) - p_d(y=1|x)|.
Fig. 2: the same with 6 training inputs (6 draws of p_d(x), seed 0).
Fig. 3: minimise R^l2_Madry; track R^l2_Madry, R^l2_SCORE against C_l2 (Theorem 1's lower bound
        |R_Madry - C| <= R_SCORE makes SCORE rise once R_Madry < C).
Fig. 6: (a) the KL R_Madry run of Fig. 1 with R^l1_SCORE, C_KL and C_l1; (b) the gradient-alignment
        term R^l1_SCORE - R^l1_Standard (Theorem 4) over the steps.
Writes results.json and toy_fig{1,2,3,6}.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import numpy as np

try:
    from experiments import toy_problem as tp
except ImportError:  # run as a script: experiments/ is sys.path[0]
    import toy_problem as tp

FIG2_POINTS = 6
KL_TRACK = ("kl", "l1")  # tracked in every KL run (Fig. 6 needs both); one compilation for all


def _gap(params: dict, grid: tp.Grid) -> float:
    """mean_k |p_t(y=1|G_k) - p_d(y=1|G_k)| over the uniform grid on the support."""
    q = np.asarray(tp.predict(params, grid.x.astype(np.float32)), np.float64)
    return float(np.mean(np.abs(q - grid.pd)))


def _first_below(values: np.ndarray, level: float) -> int | None:
    """First step t with values[t] < level, or None."""
    idx = np.flatnonzero(values < level)
    return int(idx[0]) if idx.size else None


def fit_three(problem: tp.Problem, steps: int, seed: int) -> tuple[dict, dict, dict]:
    """Train with R_Standard, R_Madry, R_SCORE (KL). Returns (results, curves, histories)."""
    results, curves, hists = {}, {}, {}
    for name in tp.OBJECTIVES:
        params, hist = tp.train(problem, name, "kl", KL_TRACK, steps=steps, seed=seed)
        results[name] = {"gap": _gap(params, problem.grid), "final_loss": float(hist["loss"][-1])}
        curves[name] = np.asarray(tp.predict(params, problem.grid.x.astype(np.float32)))
        hists[name] = hist
    return results, curves, hists


def fig3(problem: tp.Problem, steps: int, seed: int) -> tuple[dict, dict]:
    """Minimise R^l2_Madry; SCORE's minimum sits where R^l2_Madry crosses C_l2."""
    _, hist = tp.train(problem, "madry", "l2", ("l2",), steps=steps, seed=seed)
    c = tp.constants(problem, ("l2",))["C_l2"]
    madry, score = hist["madry_l2"], hist["score_l2"]
    res = {
        "C": c,
        "madry_initial": float(madry[0]),
        "madry_final": float(madry[-1]),
        "score_initial": float(score[0]),
        "score_min": float(score.min()),
        "score_final": float(score[-1]),
        "step_madry_below_C": _first_below(madry, c),
        "step_score_min": int(score.argmin()),
    }
    return res, hist


def fig6(problem: tp.Problem, hist: dict[str, np.ndarray]) -> dict:
    """KL R_Madry run: R^l1_SCORE against C_KL / C_l1, and R^l1_SCORE - R^l1_Standard."""
    consts = tp.constants(problem, ("kl", "l1"))
    madry, score = hist["madry_kl"], hist["score_l1"]
    align = score - hist["standard_l1"]
    return {
        "C_kl": consts["C_kl"],
        "C_l1": consts["C_l1"],
        "pinsker_level": consts["C_l1"] ** 2 / 2.0,  # eq. 8: stop R_Madry before (C_l1)^2 / 2
        "madry_final": float(madry[-1]),
        "score_l1_min": float(score.min()),
        "score_l1_final": float(score[-1]),
        "step_madry_below_C_kl": _first_below(madry, consts["C_kl"]),
        "step_score_l1_min": int(score.argmin()),
        "step_score_l1_below_C_l1": _first_below(score, consts["C_l1"]),
        "alignment_initial": float(align[0]),
        "alignment_min": float(align.min()),
        "step_alignment_min": int(align.argmin()),
        "alignment_final": float(align[-1]),
    }


# ----------------------------------------------------------------------------------- plots
def _plot_fit(path: str, problem: tp.Problem, curves: dict, title: str, points=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = problem.grid
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    dens = tp.marginal_density(g.x)
    ax0.plot(g.x, dens * g.pd, label="p_d(x, y=1)")
    ax0.plot(g.x, dens * (1 - g.pd), label="p_d(x, y=0)")
    ax0.plot(g.x, g.pd * dens.max(), "k:", label="p_d(y=1|x) (rescaled)")
    ax0.set(xlabel="x", title="data distribution")
    ax0.legend(fontsize=8)
    ax1.plot(g.x, g.pd, "k", lw=2.5, label="p_d(y=1|x)")
    for name, style in (("standard", "-"), ("madry", "--"), ("score", "-.")):
        ax1.plot(g.x, curves[name], style, label=f"p_t trained with R_{name}")
    if points is not None:
        pts = np.asarray(points)
        ax1.plot(pts, tp.pd_prob(pts), "ko", ms=6, label="training inputs")
        for p in pts:
            ax1.axvspan(p - tp.RADIUS, p + tp.RADIUS, color="grey", alpha=0.08)
    ax1.set(xlabel="x", ylabel="p(y=1|x)", title=title)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_fig3(path: str, res: dict, hist: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(hist["madry_l2"], label="R^l2_Madry (minimised)")
    ax.plot(hist["score_l2"], label="R^l2_SCORE")
    ax.axhline(res["C"], color="k", ls=":", label=f"C_l2 = {res['C']:.4f}")
    if res["step_madry_below_C"] is not None:
        ax.axvline(res["step_madry_below_C"], color="r", ls="--", lw=1, label="R_Madry < C_l2")
    ax.set(xlabel="training step", ylabel="risk", title="Fig. 3: overfitting of R^l2_Madry")
    top = max(res["C"], res["score_final"]) * 1.8
    ax.set_ylim(0, top)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_fig6(path: str, res: dict, hist: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    ax0.plot(hist["madry_kl"], label="R_Madry (KL, minimised)")
    ax0.plot(hist["score_l1"], label="R^l1_SCORE")
    ax0.axhline(res["C_kl"], color="k", ls=":", label=f"C_KL = {res['C_kl']:.4f}")
    ax0.axhline(res["C_l1"], color="grey", ls="-.", label=f"C_l1 = {res['C_l1']:.4f}")
    if res["step_madry_below_C_kl"] is not None:
        ax0.axvline(res["step_madry_below_C_kl"], color="r", ls="--", lw=1, label="R_Madry < C_KL")
    ax0.set_ylim(0, 2.0 * res["C_l1"])
    ax0.set(xlabel="training step", title="(a) overfitting at R_Madry ~ C_KL")
    ax0.legend(fontsize=8)
    ax1.plot(hist["score_l1"] - hist["standard_l1"])
    ax1.set(xlabel="training step", title="(b) R^l1_SCORE - R^l1_Standard (gradient alignment)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="6,000 samples, 300 steps, grid 0.05")
    parser.add_argument("--no_plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="data and init seed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the four toy figures; write results.json (and PNGs) into --out; return the results."""
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    if args.quick:  # coarser grid (41 offsets) and fewer steps: the same claims, 5x cheaper steps
        num_samples, steps, grid_step = 6_000, 300, 0.05
    else:
        num_samples, steps, grid_step = 60_000, tp.STEPS, tp.GRID_STEP
    grid = tp.make_grid(step=grid_step)
    problem = tp.make_problem(num_samples, seed=args.seed, grid=grid)
    draws = tp.sample_x(np.random.default_rng(args.seed), FIG2_POINTS)
    points = grid.x[np.round((draws - grid.x[0]) / grid_step).astype(int)]
    problem2 = tp.problem_from_points(points, grid)

    res1, curves1, hists1 = fit_three(problem, steps, args.seed)
    res2, curves2, _ = fit_three(problem2, steps, args.seed)
    res3, hist3 = fig3(problem, steps, args.seed)
    res6 = fig6(problem, hists1["madry"])
    results = {
        "config": {
            "p_d(x)": "(N(-2.5, 1) + N(2.5, 1)) / 2 truncated to [-5, 5]",
            "p_d(y=1|x)": f"sigmoid({tp.SLOPE} x)",
            "threat_set": f"|x' - x| <= {tp.RADIUS}, clipped to {list(tp.SUPPORT)}",
            "grid_step": grid_step,
            "offsets_per_window": int(grid.window.shape[1]),
            "num_samples": num_samples,
            "fig2_points": [round(float(p), 6) for p in points],
            "steps": steps,
            "learning_rate": tp.LEARNING_RATE,
            "hidden": tp.HIDDEN,
            "seed": args.seed,
            "quick": args.quick,
        },
        "fig1": res1,
        "fig2": res2,
        "fig3": res3,
        "fig6": res6,
    }
    train_s = time.time() - start
    if not args.no_plots:
        out = args.out
        _plot_fit(f"{out}/toy_fig1.png", problem, curves1, f"Fig. 1: {num_samples} samples")
        _plot_fit(f"{out}/toy_fig2.png", problem2, curves2, "Fig. 2: 6 samples", points)
        _plot_fig3(f"{out}/toy_fig3.png", res3, hist3)
        _plot_fig6(f"{out}/toy_fig6.png", res6, hists1["madry"])
    results["runtime_s"] = {"train": train_s, "total": time.time() - start}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    r = main()
    print(json.dumps({k: r[k] for k in ("fig1", "fig2", "fig3", "fig6", "runtime_s")}, indent=2))
