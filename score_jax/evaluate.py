"""Evaluators (clean, PGD, ...) of a model on a data split, data-parallel over the mesh, and the
best-checkpoint selection rule.

`config.eval` (validation: selection) and `config.test` name their evaluators as sub-ConfigDicts
with a `kind` (EVALUATORS); plain fields (`select_by`, `select_ties`) are settings. Each evaluator
compiles to its own jitted step; the clean accuracy is computed once per parameter set.

    steps = compile_steps(model, evaluator_specs(config.test), mesh)
    run_evaluators(steps, variables, split, batch_size, mesh, key)
    # -> {"clean_accuracy": .., "pgd_accuracy": .., "num_examples": ..}

Robust accuracy of "pgd": the fraction of examples still classified correctly at the PGD point
that maximises the objective (restarts keep, per example, the point with the highest objective).
"""

import functools
import zlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from score_jax import attacks, data, losses
from score_jax.train import AXIS, shard_batch

Array = jax.Array
# correct(logits_fn, x, labels, keys) -> per-example 0/1 correctness (B,) under the evaluator.
CorrectFn = Callable[[attacks.LogitsFn, Array, Array, Array], Array]
StepFn = Callable[[dict, dict, np.ndarray], dict[str, Array]]

CLEAN = "clean"
SELECT_TIES = ("strict", "later")  # a new best needs value > best / value >= best


def clean_correct(logits_fn: attacks.LogitsFn, x: Array, labels: Array, keys: Array) -> Array:
    """1[argmax f(x) = y]."""
    del keys
    return losses.accuracy(logits_fn(x), labels)


def pgd_evaluator(spec: ml_collections.ConfigDict) -> CorrectFn:
    """1[argmax f(x_adv) = y], x_adv = PGD maximising spec.objective (attacks.EVAL_OBJECTIVES)
    with spec's eps, norm, step_size, num_steps, init and restarts; num_steps 0: clean."""

    def correct(logits_fn, x, labels, keys):
        if spec.num_steps == 0:
            return clean_correct(logits_fn, x, labels, keys)
        x_adv = attacks.pgd(
            attacks.eval_objective(spec.objective, logits_fn, labels),
            x,
            keys,
            eps=spec.eps,
            step_size=spec.step_size,
            num_steps=spec.num_steps,
            norm=spec.norm,
            init=spec.init,
            restarts=spec.restarts,
        )
        return losses.accuracy(logits_fn(x_adv), labels)

    return correct


# kind -> builder of the evaluator's per-example correctness from its spec.
EVALUATORS: dict[str, Callable[[ml_collections.ConfigDict], CorrectFn]] = {
    "pgd": pgd_evaluator,
}


def evaluator_specs(section: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The named evaluators of config.eval / config.test (its ConfigDict entries), in order."""
    return {k: v for k, v in section.items() if isinstance(v, ml_collections.ConfigDict)}


def eval_step(
    variables: dict,
    batch: dict[str, Array],
    key: Array,
    *,
    model: nn.Module,
    correct_fn: CorrectFn,
) -> dict[str, Array]:
    """Per-device code: sums over the global batch of correct and of the example count."""
    x = batch["image"].astype(jnp.float32) / 255.0
    labels, mask = batch["label"], batch["mask"]

    def logits_fn(inputs):
        return model.apply(variables, inputs, train=False)

    offset = jax.lax.axis_index(AXIS) * x.shape[0]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        jax.random.wrap_key_data(key), offset + jnp.arange(x.shape[0])
    )
    correct = correct_fn(logits_fn, x, labels, keys)
    sums = {"correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
    return jax.lax.psum(sums, AXIS)


def compile_step(model: nn.Module, correct_fn: CorrectFn, mesh: Mesh) -> StepFn:
    """jit(shard_map(eval_step)): variables replicated, batch split on "batch"."""
    step = functools.partial(eval_step, model=model, correct_fn=correct_fn)
    return jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(), check_vma=False)
    )


def compile_steps(
    model: nn.Module, specs: dict[str, ml_collections.ConfigDict], mesh: Mesh
) -> dict[str, StepFn]:
    """{"clean": step, <name>: step for each evaluator}; unknown kinds raise ValueError."""
    steps = {CLEAN: compile_step(model, clean_correct, mesh)}
    for name, spec in specs.items():
        if spec.get("kind") not in EVALUATORS:
            raise ValueError(
                f"evaluator {name!r}: kind={spec.get('kind')!r}; valid: {', '.join(EVALUATORS)}"
            )
        steps[name] = compile_step(model, EVALUATORS[spec.kind](spec), mesh)
    return steps


def _evaluator_key(key: np.ndarray, name: str) -> jax.Array:
    """The evaluator's own key: its name (not its position) folded into `key`."""
    return jax.random.fold_in(jax.random.wrap_key_data(key), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def run_evaluators(
    steps: dict[str, StepFn],
    variables: dict,
    split: data.Split,
    batch_size: int,
    mesh: Mesh,
    key: np.ndarray,
) -> dict[str, float]:
    """{"<name>_accuracy" for each step (incl. "clean"), "num_examples"} of `variables` on `split`.

    Batch i of evaluator `name` uses fold_in(fold_in(key, name), i), example j of it fold_in(.., j).
    """
    totals: dict[str, dict[str, Array]] = {}
    name_keys = {name: _evaluator_key(key, name) for name in steps}
    for i, host_batch in enumerate(data.eval_batches(split, batch_size)):
        batch = shard_batch(host_batch, mesh)
        for name, step in steps.items():
            batch_key = np.asarray(jax.random.key_data(jax.random.fold_in(name_keys[name], i)))
            sums = step(variables, batch, batch_key)
            totals[name] = sums if i == 0 else jax.tree.map(jnp.add, totals[name], sums)
    totals_host = jax.tree.map(float, totals)  # one host transfer at the end
    count = totals_host[CLEAN]["count"]
    out = {f"{name}_accuracy": t["correct"] / max(count, 1.0) for name, t in totals_host.items()}
    out["num_examples"] = int(count)
    return out


def selection_value(results: dict[str, float], select_by: tuple[str, ...] | list[str]) -> float:
    """min over the evaluators `select_by` of their accuracy in `results` (run_evaluators')."""
    return min(results[f"{name}_accuracy"] for name in select_by)


def improves(value: float, best: float, ties: str) -> bool:
    """Whether `value` makes a new best checkpoint: value > best ("strict", the basic setting's
    reference) or value >= best ("later", the DDPM setting's reference). Before the first
    evaluation best is -1, so the first one always does (the reference starts from 0)."""
    if ties not in SELECT_TIES:
        raise ValueError(f"select_ties={ties!r}; valid: {', '.join(SELECT_TIES)}")
    return value > best if ties == "strict" else value >= best
