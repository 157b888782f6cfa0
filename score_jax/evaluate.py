"""The kind-independent evaluation runner: every evaluator of a section (score_jax.evaluators,
one module per kind) on a data split, data-parallel over the mesh, and the best-checkpoint
selection rule.

`config.eval` (validation: selection) and `config.test` name their evaluators as sub-ConfigDicts
with a `kind` (evaluators.KINDS: per batch, or on the whole split as AutoAttack); plain fields
(`select_by`, `select_ties`) are settings. Each evaluator compiles to its own jitted step; the
clean accuracy is computed once per parameter set.

    steps = compile_steps(model, evaluators.specs(config.test), mesh, batch_size=batch_size)
    run_evaluators(steps, variables, split, batch_size, mesh, key)
    # -> {"clean_accuracy": .., "pgd_accuracy": .., "num_examples": ..}

`Evaluation(config, model, mesh)` is the one evaluation path of training, --mode eval and the
benchmarks: config's sections, their keys and the EMA / raw parameters of a train state.
"""

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from score_jax import data, evaluators
from score_jax.errors import ConfigError
from score_jax.evaluators import CorrectFn, SplitFn, clean
from score_jax.parallel import AXIS, data_parallel, shard_batch
from score_jax.precision import eval_model, with_precision

if TYPE_CHECKING:
    from score_jax.train import TrainState

Array = jax.Array
StepFn = Callable[[dict, dict, np.ndarray], dict[str, Array]]

CLEAN = clean.NAME
SELECT_TIES = ("strict", "later")  # a new best needs value > best / value >= best
PARAMS = ("ema", "raw")  # the parameter sets of a train state evaluated: the EMA and the raw ones


@dataclasses.dataclass(frozen=True)
class SplitStep:
    """A whole-split evaluator (a kind with per_batch False) and the name it reports under
    (its kind's result_name)."""

    run: SplitFn
    label: str

    def __call__(self, variables: dict, split: data.Split, key: np.ndarray) -> dict[str, float]:
        return self.run(variables, split, key)


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
) -> dict[str, StepFn | SplitStep]:
    """{"clean": step, <name>: step (per-batch kind) or SplitStep (whole-split kind) for each
    evaluator}; unknown kinds raise ConfigError. `batch_size`: the global batch of the
    whole-split evaluators; `precision`: EVAL_PRECISIONS (config.eval_precision)."""
    steps: dict[str, StepFn | SplitStep] = {
        CLEAN: compile_step(model, clean.correct, mesh, precision)
    }
    for name, spec in specs.items():
        kind = evaluators.KINDS.get(spec.get("kind"))
        if kind is None:
            valid = ", ".join(evaluators.KINDS)
            raise ConfigError(f"evaluator {name!r}: kind={spec.get('kind')!r}; valid: {valid}")
        if kind.per_batch:
            steps[name] = compile_step(model, kind.correct(spec), mesh, precision)
            continue
        if not batch_size:
            raise ValueError(f"evaluator {name!r} ({kind.name}) needs compile_steps' batch_size")
        run = kind.split_evaluator(model, spec, mesh, batch_size, precision)
        steps[name] = SplitStep(run, kind.result_name(name, spec))
    return steps


def _evaluator_key(key: np.ndarray, name: str) -> jax.Array:
    """The evaluator's own key: its name (not its position) folded into `key`."""
    return jax.random.fold_in(jax.random.wrap_key_data(key), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def run_evaluators(
    steps: dict[str, StepFn | SplitStep],
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
    batched = {k: v for k, v in steps.items() if not isinstance(v, SplitStep)}
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
        if isinstance(evaluator, SplitStep):
            r = evaluator(variables, split, np.asarray(jax.random.key_data(name_keys[name])))
            label = evaluator.label  # e.g. "<name>_reduced": not the standard AutoAttack
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


class Evaluation:
    """config's evaluators of `model` over `mesh`: compiled once per section, run at
    config.eval_batch_size and config.eval_precision with keys from config.seed."""

    def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh):
        self.config, self.model, self.mesh = config, model, mesh
        self._steps: dict[str, dict[str, StepFn | SplitStep]] = {}

    def steps(
        self, section: str | dict[str, ml_collections.ConfigDict]
    ) -> dict[str, StepFn | SplitStep]:
        """The compiled steps ("clean" and each evaluator) of config.<section> (built once), or
        of the given {name: evaluator spec}."""
        if not isinstance(section, str):
            return self._compile(section)
        if section not in self._steps:
            self._steps[section] = self._compile(evaluators.specs(self.config[section]))
        return self._steps[section]

    def _compile(self, specs: dict[str, ml_collections.ConfigDict]) -> dict:
        return compile_steps(
            self.model,
            specs,
            self.mesh,
            batch_size=self.config.eval_batch_size,
            precision=self.config.eval_precision,
        )

    def run(
        self,
        section: str | dict[str, ml_collections.ConfigDict],
        variables: dict,
        split: data.Split,
        params: str | None = None,
        step: int = 0,
    ) -> dict[str, float]:
        """config.<section>'s evaluators (or the given ones) on `variables` ({"params",
        "batch_stats"}) and `split`: {"clean_accuracy", "<evaluator>_accuracy", ..,
        "num_examples"}. `params` ("ema" / "raw"): which parameters these are; evaluators with
        `params="best_by"` (AutoAttack) then run only on config.best_by's. The random starts
        come from fold_in(key(seed + 1), step): fresh ones at each validation, as the
        reference draws."""
        base = jax.random.key(self.config.seed + 1)
        key = np.asarray(jax.random.key_data(jax.random.fold_in(base, step)))
        steps = self.steps(section)
        if params is not None and params != self.config.best_by:
            specs = self.config[section] if isinstance(section, str) else section
            steps = {
                k: v for k, v in steps.items() if k == CLEAN or specs[k].get("params") != "best_by"
            }
        return run_evaluators(steps, variables, split, self.config.eval_batch_size, self.mesh, key)

    def state(
        self, section: str, state: "TrainState", split: data.Split
    ) -> dict[str, dict[str, float]]:
        """`run` of the EMA and of the raw parameters of `state` at its step: {"ema": ..,
        "raw": ..}. The one evaluation path of training (validation) and --mode eval (test)."""
        chosen = {"ema": state.ema_params, "raw": state.params}
        step = int(jax.device_get(state.step))
        return {
            name: self.run(
                section,
                {"params": chosen[name], "batch_stats": state.batch_stats},
                split,
                name,
                step=step,
            )
            for name in PARAMS
        }
