"""The paper's Tables 1 and 2 in miniature, on the offline digits dataset (configs/digits.py).

Rows (loss method, divergence, clipping; the initial learning rate, clip threshold and attack
start follow the paper's rules, config_lib.paper_loss, as configs/cifar10_basic.py):
  Table 2: PGD-AT and TRADES with KL (lr 0.1) and SE (lr 0.05), SE also with loss clipping
           (c = 0.4 for PGD-AT, 0.3 for TRADES; the paper clips only SE);
  Table 1: PGD-AT with the other divergences l2, l1, linf, js_dist, js, l1_sq (lr 0.05 only; the
           paper also tries 0.1 and 0.01).
Each row is trained for every seed with `trainer.train_and_evaluate` (best checkpoint by the
validation PGD-10 (CE) accuracy of the EMA parameters, as configs/digits.py does; the paper selects
SE models by PGD-10 with the SE objective), then evaluated on the first N test examples with
`torch_bridge.autoattack_eval.run_autoattack` on the exported EMA parameters: clean accuracy,
the project's JAX PGD-20 (CE) and AutoAttack version "custom" with APGD-CE (5 restarts x 100
steps) and APGD-T (9 target classes x 100 steps). The table gives mean +- sample std over seeds (%).

    python experiments/loss_table.py --out /tmp/loss_table              # 12 rows x 3 seeds
    python experiments/loss_table.py --out /tmp/loss_table_quick --quick # 2 rows, 1 seed, tiny

Writes DIR/loss_table.md, DIR/loss_table.png and DIR/results.json; the runs live in
DIR/runs/<row>-s<seed> and a run whose recorded settings match is reused (delete DIR/runs to
start over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from score_jax import config_lib, trainer

try:
    from experiments import common
except ImportError:  # run as a script: python experiments/loss_table.py
    import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(REPO, "configs", "digits.py")
ROW_FILE = "row.json"
METRICS = ("clean", "pgd20", "autoattack")
AA_ATTACKS = ("apgd-ce", "apgd-t")


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: a loss method, a divergence, optional clipping (config_lib.paper_loss)."""

    name: str
    method: str  # "pgd_at" | "trades"
    divergence: str
    clip: bool
    table: int

    def settings(self) -> dict[str, Any]:
        """The row's flattened config fields: loss, initial lr, attack start (the paper's)."""
        return config_lib.paper_loss(self.method, self.divergence, self.clip)

    @property
    def clip_c(self) -> float | None:
        return self.settings()["loss.clip_c"]

    @property
    def learning_rate(self) -> float:
        return self.settings()["optim.learning_rate"]


def _row(method: str, divergence: str, clip: bool = False, table: int = 2) -> Row:
    name = f"{method}-{divergence}" + ("-clip" if clip else "")
    return Row(name, method, divergence, clip, table)


ROWS: dict[str, Row] = {
    r.name: r
    for r in [
        _row("pgd_at", "kl"),
        _row("pgd_at", "se"),
        _row("pgd_at", "se", clip=True),
        _row("trades", "kl"),
        _row("trades", "se"),
        _row("trades", "se", clip=True),
        *(_row("pgd_at", k, table=1) for k in ("l2", "l1", "linf", "js_dist", "js", "l1_sq")),
        # Not in the paper's tables; available by name with --rows.
        _row("pgd_at", "kl", clip=True, table=0),
        _row("trades", "kl", clip=True, table=0),
    ]
}
DEFAULT_ROWS = tuple(name for name, r in ROWS.items() if r.table)
QUICK_ROWS = ("pgd_at-se", "trades-se")


@dataclasses.dataclass(frozen=True)
class Budget:
    """Training length, model size and evaluation sizes of one table."""

    num_epochs: int
    num_train_steps: int  # > 0 overrides num_epochs
    width: int
    hidden: int
    conv_impl: str
    attack_steps: int
    eval_every_epochs: int
    val_steps: int
    test_steps: int
    aa_examples: int


FULL = Budget(
    num_epochs=20,
    num_train_steps=-1,
    width=32,
    hidden=128,
    conv_impl="xla",
    attack_steps=10,
    eval_every_epochs=4,
    val_steps=10,
    test_steps=20,
    aa_examples=360,
)
QUICK = Budget(
    num_epochs=1,
    num_train_steps=40,
    width=4,
    hidden=16,
    conv_impl="xla",
    attack_steps=3,
    eval_every_epochs=0,
    val_steps=0,  # the trainer's own evaluations: clean only (they compile in a fraction)
    test_steps=0,
    aa_examples=50,
)


def digits_config() -> ml_collections.ConfigDict:
    """configs/digits.py's get_config()."""
    return config_lib.load_config_file(DIGITS_CONFIG)


def make_config(row: Row, seed: int, budget: Budget) -> ml_collections.ConfigDict:
    """configs/digits.py with the row's loss, the seed and the budget."""
    c = digits_config()
    c.seed = seed
    c.update_from_flattened_dict(row.settings())
    c.attack.num_steps = budget.attack_steps
    c.num_epochs = budget.num_epochs
    c.num_train_steps = budget.num_train_steps
    c.model.width = budget.width
    c.model.hidden = budget.hidden
    c.model.conv_impl = budget.conv_impl
    c.eval_every_epochs = budget.eval_every_epochs
    c.eval.pgd.num_steps = budget.val_steps
    c.test.pgd.num_steps = budget.test_steps
    c.progress_bar = False
    # The table's AutoAttack column: pyautoattack on the export (--mode autoattack's run, which
    # reads this spec); training runs without it (training_config).
    c.test.autoattack.version = "custom"
    c.test.autoattack.attacks = AA_ATTACKS
    c.test.autoattack.num_examples = budget.aa_examples
    return c


def training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` without the JAX AutoAttack after training (the table runs pyautoattack)."""
    c = config.copy_and_resolve_references()
    del c.test["autoattack"]
    return c


def run_one(
    config: ml_collections.ConfigDict, workdir: str, torch_threads: int | None = None
) -> dict[str, Any]:
    """Trains + evaluates one (row, seed), or reuses a finished run with the same config.

    torch_threads: PyTorch's intra-op threads during AutoAttack (restored afterwards); 1 is ~5x
    faster than 2 for this tiny model on a busy 2-core machine.
    """
    import torch

    from score_jax.torch_bridge import autoattack_eval

    path = os.path.join(workdir, ROW_FILE)
    settings = json.loads(config.to_json_best_effort(sort_keys=True))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("config") == settings:
            return saved
    train_config = training_config(config)
    config_path = os.path.join(workdir, common.CONFIG_FILE)
    if os.path.exists(config_path):  # resume only a run of the same training settings
        with open(config_path) as f:
            saved_config = json.load(f)
        if saved_config != json.loads(train_config.to_json_best_effort(sort_keys=True)):
            raise ValueError(
                f"{workdir} holds a run with other settings (e.g. another budget); "
                "delete it or use another --out"
            )
    start = time.perf_counter()
    trained = trainer.train_and_evaluate(train_config, workdir)
    if "preempted_at_step" in trained:  # SIGTERM: the run is saved; rerunning resumes it
        raise SystemExit(f"stopped (SIGTERM) in {workdir}; run the same command to resume")
    train_s = time.perf_counter() - start
    threads = torch.get_num_threads()
    try:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        aa = autoattack_eval.run_autoattack(config, workdir, params="ema")
    finally:
        torch.set_num_threads(threads)
    record = {
        "config": settings,
        "clean": aa["clean_accuracy"],
        "jax_clean": aa["jax_clean_accuracy"],
        "pgd20": aa["pgd20_accuracy"],
        "autoattack": aa["robust_accuracy"],
        "num_examples": aa["num_examples"],
        "attacks": aa["attacks"],
        "checkpoint": trained["checkpoint"],
        "step": trained["step"],
        "test_all": trained["test_ema"],
        "train_seconds": round(train_s, 1),
        "autoattack_seconds": round(aa["seconds"], 1),
    }
    common.write_json(path, record)
    return record


def summarise(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample std (0 for one value) and the values."""
    v = np.asarray(values, np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "values": [float(x) for x in v]}


def row_label(r: dict[str, Any]) -> str:
    method = "PGD-AT" if r["method"] == "pgd_at" else "TRADES"
    clip = f" c={r['clip_c']}" if r["clip_c"] is not None else ""
    return f"{method}-{r['divergence'].upper()}{clip}"


def plot(path: str, rows: dict[str, dict[str, Any]], title: str) -> None:
    """Grouped bars: clean, PGD-20 and AutoAttack accuracy per row, mean with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    x = np.arange(len(names))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.2))
    labels = ("clean", "PGD-20", "AutoAttack")
    for i, (metric, label) in enumerate(zip(METRICS, labels, strict=True)):
        means = [100 * rows[n][metric]["mean"] for n in names]
        stds = [100 * rows[n][metric]["std"] for n in names]
        ax.bar(x + (i - 1) * width, means, width, yerr=stds, capsize=2, label=label)
    ax.set_xticks(x, [row_label(rows[n]) for n in names], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 112)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    """The table (accuracies in %, mean +- std over seeds) with a line on the settings."""
    lines = [
        f"Digits (8x8), small CNN width {settings['width']}, {settings['training']}; "
        f"Linf eps {settings['eps']}; {settings['num_examples']} test examples; AutoAttack "
        f"'custom' ({', '.join(AA_ATTACKS)}); {settings['seeds']} seeds (Table 1 rows: "
        f"{settings['table1_seeds']}); mean ± std (%).",
        "",
        "| Table | Method | Loss | Clip | lr | seeds | Clean | PGD-20 | AutoAttack |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        cells = [f"{100 * r[m]['mean']:.2f} ± {100 * r[m]['std']:.2f}" for m in METRICS]
        clip = f"c={r['clip_c']}" if r["clip_c"] is not None else "-"
        method = "PGD-AT" if r["method"] == "pgd_at" else "TRADES"
        lines.append(
            f"| {r['table'] or '-'} | {method} | {r['divergence']} | {clip} | "
            f"{r['learning_rate']} | {len(r['clean']['values'])} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def run(
    out: str,
    *,
    quick: bool = False,
    seeds: int | None = None,
    table1_seeds: int | None = None,
    rows: Sequence[str] | None = None,
    aa_examples: int | None = None,
    epochs: int | None = None,
    torch_threads: int | None = 1,
) -> dict[str, Any]:
    """Trains and evaluates every (row, seed); writes out/loss_table.md and out/results.json.

    table1_seeds: seeds of the Table 1 rows (default: `seeds`)."""
    start = time.perf_counter()
    budget = QUICK if quick else FULL
    if aa_examples:
        budget = dataclasses.replace(budget, aa_examples=aa_examples)
    if epochs:
        budget = dataclasses.replace(budget, num_epochs=epochs, num_train_steps=-1)
    seeds = seeds or (1 if quick else 3)
    names = list(rows or (QUICK_ROWS if quick else DEFAULT_ROWS))
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")
    table: dict[str, dict[str, Any]] = {}
    for name in names:
        row = ROWS[name]
        runs = []
        for seed in range((table1_seeds or seeds) if row.table == 1 else seeds):
            config = make_config(row, seed, budget)
            workdir = os.path.join(out, "runs", f"{name}-s{seed}")
            runs.append(run_one(config, workdir, torch_threads))
            print(
                f"{name} seed {seed}: clean {100 * runs[-1]['clean']:.2f}% PGD-20 "
                f"{100 * runs[-1]['pgd20']:.2f}% AutoAttack {100 * runs[-1]['autoattack']:.2f}%",
                flush=True,
            )
        table[name] = {
            "method": row.method,
            "divergence": row.divergence,
            "clip_c": row.clip_c,
            "learning_rate": row.learning_rate,
            "table": row.table,
            **{m: summarise([r[m] for r in runs]) for m in METRICS},
            "num_examples": runs[0]["num_examples"],
            "steps": [r["step"] for r in runs],
            "checkpoints": [r["checkpoint"] for r in runs],
        }
    config = make_config(ROWS[names[0]], 0, budget)
    training = (
        f"{budget.num_train_steps} steps"
        if budget.num_train_steps > 0
        else f"{budget.num_epochs} epochs"
    ) + f", batch {config.batch_size}, PGD-{budget.attack_steps} in training"
    settings = {
        "quick": quick,
        "seeds": seeds,
        "table1_seeds": table1_seeds or seeds,
        "budget": dataclasses.asdict(budget),
        "width": budget.width,
        "training": training,
        "eps": config.attack.eps,
        "num_examples": table[names[0]]["num_examples"],
        "autoattack": {"version": "custom", "attacks": list(AA_ATTACKS)},
        "pgd20": "JAX PGD-20, CE, step 0.025, uniform start, 1 restart (torch_bridge.jax_pgd20)",
        "std": "sample std over seeds (ddof=1)",
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "loss_table.md"), "w") as f:
        f.write(markdown(table, settings))
    title = f"Digits, small CNN, {training}; mean ± std over {seeds} seeds"
    plot(os.path.join(out, "loss_table.png"), table, title)
    results = {"settings": settings, "rows": table, "seconds": round(time.perf_counter() - start)}
    common.write_json(os.path.join(out, "results.json"), results)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="2 rows, 1 seed, 40 steps, tiny CNN")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3; quick 1)")
    p.add_argument("--table1_seeds", type=int, default=None, help="seeds of Table 1 rows")
    p.add_argument("--rows", default="", help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--aa_examples", type=int, default=None, help="test examples evaluated")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 20)")
    p.add_argument("--torch_threads", type=int, default=1, help="PyTorch threads in AutoAttack")
    p.add_argument(
        "--jax_cache",
        default="",
        help="persistent XLA compilation cache directory (default DIR/jax_cache; 'none': off); "
        "the seeds of a row and the evaluations of all rows compile to the same programs",
    )
    args = p.parse_args(argv)
    if args.jax_cache != "none":
        import jax

        jax.config.update(
            "jax_compilation_cache_dir", args.jax_cache or os.path.join(args.out, "jax_cache")
        )
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    rows = [r for r in args.rows.split(",") if r] or None
    r = run(
        args.out,
        quick=args.quick,
        seeds=args.seeds,
        table1_seeds=args.table1_seeds,
        rows=rows,
        aa_examples=args.aa_examples,
        epochs=args.epochs,
        torch_threads=args.torch_threads,
    )
    with open(os.path.join(args.out, "loss_table.md")) as f:
        print(f.read())
    print(f"{r['seconds']} s; written to {args.out}")
    return r


if __name__ == "__main__":
    main()
