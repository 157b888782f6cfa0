"""Evaluators (clean, PGD, ...) of a model on a data split, data-parallel over the mesh, and the
best-checkpoint selection rule.

`config.eval` (validation: selection) and `config.test` name their evaluators as sub-ConfigDicts
with a `kind` (EVALUATORS: batch by batch; SPLIT_EVALUATORS: on the whole split, AutoAttack);
plain fields (`select_by`, `select_ties`) are settings. Each evaluator compiles to its own jitted
step; the clean accuracy is computed once per parameter set.

    steps = compile_steps(model, evaluator_specs(config.test), mesh, batch_size=batch_size)
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
from score_jax.errors import ConfigError
from score_jax.parallel import AXIS, data_parallel, shard_batch
from score_jax.precision import eval_model, with_precision

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


def pgd_points(
    spec: ml_collections.ConfigDict, logits_fn: attacks.LogitsFn, x: Array, labels: Array, keys
) -> Array:
    """The points of a "pgd" evaluator: PGD maximising spec.objective (attacks.EVAL_OBJECTIVES)
    with spec's eps, norm, step_size, num_steps, init, restarts and l2_rule."""
    return attacks.pgd(
        attacks.eval_objective(spec.objective, logits_fn, labels),
        x,
        keys,
        eps=spec.eps,
        step_size=spec.step_size,
        num_steps=spec.num_steps,
        norm=spec.norm,
        init=spec.init,
        restarts=spec.restarts,
        l2_rule=spec.get("l2_rule", "ball_then_box"),
    )


def pgd_evaluator(spec: ml_collections.ConfigDict) -> CorrectFn:
    """1[argmax f(x_adv) = y], x_adv = `pgd_points`; num_steps 0: clean."""

    def correct(logits_fn, x, labels, keys):
        if spec.num_steps == 0:
            return clean_correct(logits_fn, x, labels, keys)
        x_adv = pgd_points(spec, logits_fn, x, labels, keys)
        return losses.accuracy(logits_fn(x_adv), labels)

    return correct


class SplitEvaluator:
    """An evaluator that runs on a whole split at once rather than batch by batch: AutoAttack,
    whose later stages attack only the examples still robust (score_jax.autoattack.suite).

    Called as (variables, split, key) -> {"accuracy", "<attack>_accuracy" after each stage,
    "num_examples"}; its stages compile once and are reused on every call.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ml_collections.ConfigDict,
        mesh: Mesh,
        batch_size: int,
        precision: str = "float32",
    ):
        from score_jax import autoattack

        self.spec, self.mesh, self.batch_size = spec, mesh, batch_size
        self.model = model = eval_model(model, precision)
        self.attacks = autoattack.resolve_attacks(spec.version, spec.attacks)
        self.options = autoattack_options(spec, self.attacks)
        self.stage_fns = autoattack.make_stage_fns(
            model,
            eps=spec.eps,
            norm=spec.norm,
            mesh=mesh,
            version=spec.version,
            attacks=spec.attacks,
            options=self.options,
            precision=precision,
        )

    def __call__(self, variables: dict, split: data.Split, key: np.ndarray) -> dict[str, float]:
        from score_jax import autoattack

        r = autoattack.evaluate(
            self.model,
            variables,
            split,
            eps=self.spec.eps,
            norm=self.spec.norm,
            version=self.spec.version,
            attacks=self.spec.attacks,
            batch_size=self.batch_size,
            mesh=self.mesh,
            key=key,
            num_examples=self.spec.num_examples,
            stage_fns=self.stage_fns,
        )
        out = {"accuracy": r["robust_accuracy"], "num_examples": r["num_examples"]}
        for stage in r["stages"]:
            out[f"{stage['attack'].replace('-', '_')}_accuracy"] = stage["robust_accuracy"]
        return out


def autoattack_options(
    spec: ml_collections.ConfigDict, attacks: tuple[str, ...]
) -> dict[str, dict]:
    """Per-attack options of an "autoattack" spec: apgd_iters / fab_iters (100), targets (9),
    square_queries (5000) are AutoAttack's standard values; smaller ones make a quick look."""
    per_attack = {
        "apgd-ce": dict(n_iter=spec.apgd_iters),
        "apgd-t": dict(n_iter=spec.apgd_iters, n_target_classes=spec.targets),
        "fab-t": dict(n_iter=spec.fab_iters, n_target_classes=spec.targets),
        "square": dict(n_queries=spec.square_queries),
    }
    return {a: per_attack[a] for a in attacks}


def autoattack_version(spec: ml_collections.ConfigDict) -> str:
    """The version an "autoattack" spec's result is reported under: "standard" only with
    AutoAttack's standard counts (autoattack.STANDARD_COUNTS), else "reduced" (or "custom")."""
    from score_jax import autoattack

    return autoattack.reported_version(
        spec.version, {k: spec[k] for k in autoattack.STANDARD_COUNTS}
    )


def result_name(name: str, spec: ml_collections.ConfigDict) -> str:
    """The name evaluator `name`'s results are reported under (metrics keys, tables):
    "<name>_reduced" for an AutoAttack at reduced counts, else `name`."""
    if spec.get("kind") == "autoattack" and autoattack_version(spec) == "reduced":
        return f"{name}_reduced"
    return name


# kind -> builder of the evaluator's per-example correctness from its spec.
EVALUATORS: dict[str, Callable[[ml_collections.ConfigDict], CorrectFn]] = {
    "pgd": pgd_evaluator,
}
# kind -> SplitEvaluator class (built with the model, spec, mesh and eval batch size).
SPLIT_EVALUATORS: dict[str, type[SplitEvaluator]] = {"autoattack": SplitEvaluator}
KINDS = (*EVALUATORS, *SPLIT_EVALUATORS)


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


def compile_step(
    model: nn.Module, correct_fn: CorrectFn, mesh: Mesh, precision: str = "float32"
) -> StepFn:
    """jit(shard_map(eval_step)): variables replicated, batch split on "batch"; the model and
    the step at `precision` (`eval_model`, `with_precision`)."""
    model = eval_model(model, precision)
    step = with_precision(
        functools.partial(eval_step, model=model, correct_fn=correct_fn), precision
    )
    return data_parallel(step, mesh, (P(), P(AXIS), P()), P())


def compile_steps(
    model: nn.Module,
    specs: dict[str, ml_collections.ConfigDict],
    mesh: Mesh,
    *,
    batch_size: int | None = None,
    precision: str = "float32",
) -> dict[str, StepFn | SplitEvaluator]:
    """{"clean": step, <name>: step (or SplitEvaluator) for each evaluator}; unknown kinds raise
    ConfigError. `batch_size`: the global batch of the split evaluators (AutoAttack);
    `precision`: EVAL_PRECISIONS (config.eval_precision)."""
    steps: dict[str, StepFn | SplitEvaluator] = {
        CLEAN: compile_step(model, clean_correct, mesh, precision)
    }
    for name, spec in specs.items():
        kind = spec.get("kind")
        if kind in EVALUATORS:
            steps[name] = compile_step(model, EVALUATORS[kind](spec), mesh, precision)
        elif kind in SPLIT_EVALUATORS:
            if not batch_size:
                raise ValueError(f"evaluator {name!r} ({kind}) needs compile_steps' batch_size")
            steps[name] = SPLIT_EVALUATORS[kind](model, spec, mesh, batch_size, precision)
        else:
            raise ConfigError(f"evaluator {name!r}: kind={kind!r}; valid: {', '.join(KINDS)}")
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
    batched = {k: v for k, v in steps.items() if not isinstance(v, SplitEvaluator)}
    for i, host_batch in enumerate(data.eval_batches(split, batch_size)):
        batch = shard_batch(host_batch, mesh)
        for name, step in batched.items():
            batch_key = np.asarray(jax.random.key_data(jax.random.fold_in(name_keys[name], i)))
            sums = step(variables, batch, batch_key)
            totals[name] = sums if i == 0 else jax.tree.map(jnp.add, totals[name], sums)
    totals_host = jax.tree.map(float, totals)  # one host transfer at the end
    count = totals_host[CLEAN]["count"]
    out = {f"{name}_accuracy": t["correct"] / max(count, 1.0) for name, t in totals_host.items()}
    out["num_examples"] = int(count)
    for name, evaluator in steps.items():
        if isinstance(evaluator, SplitEvaluator):
            r = evaluator(variables, split, np.asarray(jax.random.key_data(name_keys[name])))
            label = result_name(name, evaluator.spec)  # "<name>_reduced": not the standard AA
            out[f"{label}_accuracy"] = r.pop("accuracy")
            n = r.pop("num_examples")
            if n != out["num_examples"]:  # spec.num_examples: only the first n examples
                out[f"{label}_num_examples"] = n
            out.update({f"{label}_{k}": v for k, v in r.items()})
    return out


def selection_value(results: dict[str, float], select_by: tuple[str, ...] | list[str]) -> float:
    """min over the evaluators `select_by` of their accuracy in `results` (run_evaluators';
    an AutoAttack at reduced counts reports as "<name>_reduced")."""

    def accuracy(name: str) -> float:
        key = f"{name}_accuracy"
        return results[key if key in results else f"{name}_reduced_accuracy"]

    return min(accuracy(name) for name in select_by)


def improves(value: float, best: float, ties: str) -> bool:
    """Whether `value` makes a new best checkpoint: value > best ("strict", the basic setting's
    reference) or value >= best ("later", the DDPM setting's reference). Before the first
    evaluation best is -1, so the first one always does (the reference starts from 0)."""
    if ties not in SELECT_TIES:
        raise ValueError(f"select_ties={ties!r}; valid: {', '.join(SELECT_TIES)}")
    return value > best if ties == "strict" else value >= best
