"""`--mode autoattack`: AutoAttack (pyautoattack) on the exported PyTorch model, next to the
project's own JAX PGD-20 on the same test examples and the same (exported) parameters.

Writes <workdir>/autoattack.json.
"""

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from score_jax import autoattack, checkpoint, data, evaluate, workdir_io
from score_jax.errors import CheckpointError, ConfigError
from score_jax.evaluators import autoattack as autoattack_kind
from score_jax.evaluators import pgd as pgd_kind
from score_jax.setup import Setup
from score_jax.torch_bridge import convert, export

RESULTS_FILE = "autoattack.json"
NORMS = {"linf": "Linf", "l2": "L2"}
PGD_STEPS = 20
SPEC = "config.test.autoattack"


def autoattack_spec(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.test.autoattack, the one AutoAttack spec: the JAX evaluator's after training and
    --mode autoattack's (version, attacks, num_examples, eps, norm and the counts apgd_iters,
    fab_iters, targets, square_queries, on both sides)."""
    spec = config.test.get("autoattack")
    if not isinstance(spec, ml_collections.ConfigDict) or spec.get("kind") != autoattack_kind.NAME:
        raise ConfigError(
            f"{SPEC} must be an {autoattack_kind.NAME!r} evaluator for --mode autoattack"
        )
    return spec


def custom_attacks(aa: ml_collections.ConfigDict) -> list[str]:
    """config.test.autoattack.attacks as a list (entries may also be comma-separated), validated
    by the one version / attacks rule (autoattack.resolve_attacks); [] unless version "custom"."""
    raw = aa.get("attacks", ()) or ()
    if isinstance(raw, str):
        raw = (raw,)
    attacks = [a.strip() for item in raw for a in str(item).split(",") if a.strip()]
    autoattack.resolve_attacks(aa.version, attacks, where=SPEC)
    if aa.num_examples == 0 or aa.num_examples < -1:
        raise ConfigError(f"{SPEC}.num_examples={aa.num_examples}: -1 (all) or > 0")
    return attacks


@contextlib.contextmanager
def _autoattack_log_to_stdout() -> Iterator[None]:
    """Prints AutoAttack's progress lines (logger "auto-attack", DEBUG) to stdout."""
    logger = logging.getLogger("auto-attack")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("AutoAttack: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        sys.stdout.flush()


def reference_adversary(
    model: torch.nn.Module,
    aa: ml_collections.ConfigDict,
    attacks: list[str],
    *,
    seed: int,
    device,
):
    """pyautoattack's AutoAttack running what the JAX suite runs for spec `aa`: its version's
    (or `attacks`') list, one restart per attack, and the spec's counts (apgd_iters for APGD-CE
    and APGD-T, fab_iters, targets for APGD-T and FAB-T, square_queries): the standard ones
    unless the spec lowers them (then both sides report "reduced")."""
    from pyautoattack import AutoAttack

    adversary = AutoAttack(
        model,
        norm=NORMS[aa.norm],
        eps=float(aa.eps),
        version=aa.version,
        attacks=attacks or None,
        seed=seed,
        device=device,
    )
    for attack in (adversary.apgd, adversary.apgd_targeted):
        attack.n_iter, attack.n_restarts = int(aa.apgd_iters), 1
    adversary.apgd_targeted.n_target_classes = int(aa.targets)
    adversary.fab.n_iter, adversary.fab.n_restarts = int(aa.fab_iters), 1
    adversary.fab.n_target_classes = int(aa.targets)
    adversary.square.n_queries, adversary.square.n_restarts = int(aa.square_queries), 1
    return adversary


def _predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                model(x[i : i + batch_size].to(device)).argmax(1).cpu()
                for i in range(0, len(x), batch_size)
            ]
        )


def pgd20_spec(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.test.pgd with PGD_STEPS steps (eps and norm as config.test.pgd resolves them)."""
    if "pgd" not in config.test or config.test.pgd.get("kind") != pgd_kind.NAME:
        raise ValueError(
            f"config.test.pgd must be a {pgd_kind.NAME!r} evaluator for the JAX PGD-20 cross-check"
        )
    spec = ml_collections.ConfigDict(config.test.pgd.to_dict())
    spec.num_steps = PGD_STEPS
    return spec


def jax_pgd20(
    setup: Setup, model_name: str, state: dict[str, torch.Tensor], split: data.Split
) -> dict[str, float]:
    """{"clean_accuracy", "pgd_accuracy", "num_examples"}: config.test.pgd with 20 steps, on the
    JAX model holding the weights of the PyTorch state dict `state`, on `split`."""
    image_shape = split.images.shape[1:]
    template = jax.eval_shape(
        lambda: setup.model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
    )
    variables = convert.import_state_dict(model_name, state, template)
    evaluation = evaluate.Evaluation(setup.config, setup.model, setup.mesh)
    return evaluation.run({"pgd": pgd20_spec(setup.config)}, variables, split)


def _stale(meta: dict[str, Any], workdir: str) -> str:
    """Why the export `meta` is older than the checkpoint it should come from ("" if it is not):
    the best checkpoint if there is one, else the last (as export_workdir chooses)."""
    if not checkpoint.exists(workdir):
        return ""  # nothing to compare with: the export is all there is
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        best = ckpt.latest_step(best=True)
        current = ("best", best) if best is not None else ("last", ckpt.latest_step())
    finally:
        ckpt.close()
    if current[1] is None:
        return ""
    exported = (meta.get("checkpoint"), meta.get("step"))
    if exported == current:
        return ""
    return (
        f"it holds the {exported[0]} checkpoint at step {exported[1]}, the workdir's "
        f"{current[0]} checkpoint is at step {current[1]}"
    )


def run_autoattack(
    config: ml_collections.ConfigDict, workdir: str, params: str = "auto"
) -> dict[str, Any]:
    """AutoAttack and JAX PGD-20 accuracy on the first config.test.autoattack.num_examples test
    examples, of <workdir>/export (exported first, with `params`, if missing; "auto":
    config.best_by, the parameters selection used); pyautoattack at the spec's settings
    (`reference_adversary`)."""
    if jax.process_count() > 1:
        raise ConfigError(
            "--mode autoattack runs in a single process: start it without --distributed / "
            "--coordinator_address (it reads the checkpoint that all processes wrote)"
        )
    aa = autoattack_spec(config)
    attacks = custom_attacks(aa)
    params = export.resolve_params(config, params)
    pgd_spec = pgd20_spec(config)
    if aa.norm not in NORMS:
        raise ConfigError(f"{SPEC}.norm={aa.norm!r}: AutoAttack needs linf or l2")
    batch_size = int(config.eval_batch_size)
    out_dir = export.export_dir(workdir)
    if not all(
        workdir_io.exists(workdir_io.join(out_dir, f))
        for f in (export.MODEL_FILE, export.META_FILE)
    ):
        export.export_workdir(config, workdir, params)
    meta = export.read_meta(out_dir)
    stale = _stale(meta, workdir)
    if stale:
        print(f"The export in {out_dir} is stale ({stale}): exporting again", flush=True)
        export.export_workdir(config, workdir, params)
        meta = export.read_meta(out_dir)
    if meta.get("params") != params:
        print(f"Using the existing export in {out_dir} ({meta.get('params')} params)", flush=True)
    name = config.model.name
    if meta["architecture"] != name or meta.get("dataset") != config.dataset.name:
        raise CheckpointError(
            f"{out_dir} holds a {meta['architecture']} for {meta.get('dataset')}, but the config "
            f"is {name} on {config.dataset.name}; delete it to export again"
        )
    model = export.load_exported(out_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)

    setup = Setup(config, workdir)
    test = setup.dataset.test
    n = len(test) if aa.num_examples < 0 else min(int(aa.num_examples), len(test))
    split = data.Split(np.asarray(test.images[:n]), np.asarray(test.labels[:n]))
    x = torch.from_numpy(split.images.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(split.labels.astype(np.int64))

    clean = (_predict(model, x, batch_size, device) == y).float().mean().item()
    norm, eps = NORMS[aa.norm], float(aa.eps)
    adversary = reference_adversary(model, aa, attacks, seed=int(config.seed), device=device)
    used = list(adversary.attacks_to_run)
    version = autoattack_kind.reported_version(aa)
    print(
        f"AutoAttack ({version}: {', '.join(used)}) {norm} eps={eps:.4g} on {n} test examples "
        f"of {meta['architecture']} ({meta['params']} params, step {meta['step']}), {device}",
        flush=True,
    )
    start = time.perf_counter()
    with _autoattack_log_to_stdout():
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    seconds = time.perf_counter() - start
    robust = (y_adv.cpu() == y).float().mean().item()
    linf = (x_adv.cpu() - x).abs().reshape(n, -1).max(1)[0].max().item()

    pgd = jax_pgd20(setup, name, model.state_dict(), split)
    results = {
        "architecture": meta["architecture"],
        "params": meta["params"],
        "checkpoint": meta.get("checkpoint"),
        "step": meta.get("step"),
        "num_examples": n,
        "eps": eps,
        "norm": norm,
        "version": version,
        "attacks": used,
        "counts": {k: int(aa[k]) for k in autoattack.STANDARD_COUNTS},
        "clean_accuracy": clean,
        "robust_accuracy": robust,
        "seconds": seconds,
        "max_linf_perturbation": linf,
        "jax_clean_accuracy": pgd["clean_accuracy"],
        "pgd20_accuracy": pgd["pgd_accuracy"],
        "pgd20_attack": pgd_spec.to_dict(),
        "device": str(device),
    }
    path = os.fspath(workdir_io.join(workdir, RESULTS_FILE))
    workdir_io.write_json_atomic(path, results)
    print(
        f"{n} test examples: clean {100 * clean:.2f}% (JAX {100 * pgd['clean_accuracy']:.2f}%), "
        f"PGD-{PGD_STEPS} {100 * pgd['pgd_accuracy']:.2f}%, AutoAttack {100 * robust:.2f}% "
        f"({seconds:.1f} s); written to {path}",
        flush=True,
    )
    return results
