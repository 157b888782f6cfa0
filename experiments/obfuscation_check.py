"""Gradient-obfuscation sanity check (the paper's Appendix D.3, Figure 7).

PGD-40 with 5 random restarts (cross-entropy objective, the config's norm) at perturbation sizes
from 0 up to the whole image box (Linf eps = 1, i.e. 255/255; L2 eps = sqrt(H W C)), on the best
checkpoint (else the last) of a trained workdir, EMA parameters, test split. If the gradients are
informative, accuracy falls to 0 at the largest eps; a plateau above 0 signals obfuscated gradients.

    python experiments/obfuscation_check.py --workdir /tmp/qs_robust --out /tmp/obfuscation
    python experiments/obfuscation_check.py --workdir W --out DIR --quick   # 5 eps, PGD-10 x 2
    python experiments/obfuscation_check.py --workdir W --out DIR --eps_255 0,64,255

Writes DIR/results.json {"eps", "accuracy", "reaches_zero", ...} and DIR/obfuscation.png.
Step size: 2.5 eps / num_steps (Madry et al.'s rule), uniform random starts; eps = 0 is the
clean accuracy. The attack is the library's (the "pgd" evaluator, `evaluators.pgd` ->
`attacks.pgd`).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence

import ml_collections
import numpy as np

from score_jax import data, evaluate

try:
    from experiments import common
except ImportError:  # run as a script: python experiments/obfuscation_check.py
    import common

# Perturbation sizes in 255ths of the largest one (Linf: of the [0, 1] box, as in Figure 7).
EPS_255 = (0, 1, 2, 4, 8, 16, 32, 64, 128, 192, 255)
QUICK_EPS_255 = (0, 16, 64, 128, 255)
STEP_FACTOR = 2.5  # step size = STEP_FACTOR * eps / num_steps


def eps_grid(
    config: ml_collections.ConfigDict,
    image_shape: Sequence[int],
    quick: bool,
    eps_255: Sequence[float] | None = None,
) -> list[float]:
    """`eps_255` (default EPS_255, quick QUICK_EPS_255) in 255ths of the box diameter in the
    config's norm (Linf 1, L2 sqrt(H W C)), plus the config's training eps, sorted."""
    scale = 1.0 if config.attack.norm == "linf" else math.sqrt(math.prod(image_shape))
    eps_255 = eps_255 or (QUICK_EPS_255 if quick else EPS_255)
    grid = {round(scale * e / 255, 8) for e in eps_255}
    grid.add(round(float(config.attack.eps), 8))
    return sorted(grid)


def attack_config(
    eps: float, norm: str, num_steps: int, restarts: int
) -> ml_collections.ConfigDict:
    """The evaluation attack at `eps` (a "pgd" evaluator spec); eps = 0: no attack."""
    steps = num_steps if eps > 0 else 0
    return ml_collections.ConfigDict(
        dict(
            kind="pgd",
            objective="ce",
            eps=float(eps),
            norm=norm,
            num_steps=steps,
            step_size=STEP_FACTOR * eps / num_steps if steps else 1.0,
            restarts=restarts,
            init="uniform",
        )
    )


def accuracy_curve(
    restored: common.Restored,
    eps_list: Sequence[float],
    split: data.Split,
    *,
    num_steps: int,
    restarts: int,
) -> list[float]:
    """PGD accuracy of the restored model on `split` at each eps (one compilation per eps)."""
    setup, v = restored.setup, restored.variables
    evaluation = evaluate.Evaluation(setup.config, setup.model, setup.mesh)
    out = []
    for eps in eps_list:
        attack = attack_config(eps, setup.config.attack.norm, num_steps, restarts)
        out.append(evaluation.run({"pgd": attack}, v, split)["pgd_accuracy"])
    return out


def plot(path: str, eps: Sequence[float], accuracy: Sequence[float], info: dict) -> None:
    """Accuracy (%) against eps, with the training eps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    linf = info["norm"] == "linf"
    xs = [255 * e for e in eps] if linf else list(eps)
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    ax.plot(xs, [100 * a for a in accuracy], "o-", color="tab:blue")
    train_eps = 255 * info["train_eps"] if linf else info["train_eps"]
    ax.axvline(
        train_eps, color="grey", ls=":", lw=1, label=f"training eps = {info['train_eps']:.3g}"
    )
    if linf:  # log-like above 1/255, linear down to 0
        ax.set_xscale("symlog", linthresh=1, linscale=0.5)
        ticks = [t for t in (0, 1, 2, 4, 8, 16, 32, 64, 128, 255) if t <= max(xs)]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlim(-0.1, 1.15 * max(xs))
    ax.set_xlabel("eps (x 1/255)" if linf else "eps (L2)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(
        f"PGD-{info['num_steps']} x {info['restarts']} restarts ({info['norm']}), "
        f"{info['num_examples']} test images",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    workdir: str,
    out: str,
    *,
    quick: bool = False,
    num_steps: int | None = None,
    restarts: int | None = None,
    num_examples: int | None = None,
    eps_255: Sequence[float] | None = None,
) -> dict:
    """The check on `workdir`; writes out/results.json and out/obfuscation.png, returns the JSON."""
    start = time.perf_counter()
    num_steps = num_steps or (10 if quick else 40)
    restarts = restarts or (2 if quick else 5)
    restored = common.load_workdir(workdir, params="ema")
    setup = restored.setup
    test = setup.dataset.test
    n = len(test) if not num_examples or num_examples < 0 else min(num_examples, len(test))
    split = data.Split(np.asarray(test.images[:n]), np.asarray(test.labels[:n]))
    eps = eps_grid(setup.config, setup.dataset.image_shape, quick, eps_255)
    acc = accuracy_curve(restored, eps, split, num_steps=num_steps, restarts=restarts)
    results = {
        "eps": eps,
        "accuracy": acc,
        "reaches_zero": bool(acc[-1] == 0.0),
        "monotone": bool(all(b <= a for a, b in zip(acc, acc[1:], strict=False))),
        "norm": setup.config.attack.norm,
        "train_eps": float(setup.config.attack.eps),
        "num_steps": num_steps,
        "restarts": restarts,
        "step_size": f"{STEP_FACTOR} * eps / num_steps",
        "objective": "ce",
        "init": "uniform",
        "num_examples": n,
        "workdir": os.path.abspath(workdir),
        "checkpoint": restored.checkpoint,
        "step": restored.step,
        "params": "ema",
        "seconds": round(time.perf_counter() - start, 1),
    }
    os.makedirs(out, exist_ok=True)
    plot(os.path.join(out, "obfuscation.png"), eps, acc, results)
    common.write_json(os.path.join(out, "results.json"), results)
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a trained workdir (config.json + checkpoints)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="5 eps, PGD-10 x 2 restarts")
    p.add_argument("--num_steps", type=int, default=None, help="PGD steps (default 40; quick 10)")
    p.add_argument("--restarts", type=int, default=None, help="restarts (default 5; quick 2)")
    p.add_argument("--num_examples", type=int, default=None, help="first N test examples")
    p.add_argument(
        "--eps_255",
        default="",
        help="comma-separated eps in 255ths of the box (default 0,1,2,4,...,255; the training "
        "eps is always added)",
    )
    args = p.parse_args(argv)
    r = run(
        args.workdir,
        args.out,
        quick=args.quick,
        num_steps=args.num_steps,
        restarts=args.restarts,
        num_examples=args.num_examples,
        eps_255=[float(e) for e in args.eps_255.split(",") if e.strip()] or None,
    )
    for e, a in zip(r["eps"], r["accuracy"], strict=True):
        print(f"eps {e:.4f} ({255 * e:6.1f}/255): accuracy {100 * a:6.2f}%")
    print(f"reaches zero: {r['reaches_zero']}; {r['seconds']} s; written to {args.out}")
    return r


if __name__ == "__main__":
    main()
