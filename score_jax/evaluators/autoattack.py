"""The "autoattack" evaluator: the JAX AutoAttack (score_jax.autoattack) on the whole split,
whose later stages attack only the examples still robust; reported as version "standard" only
at AutoAttack's standard counts, else "reduced" (or "custom"). `--mode autoattack` runs
pyautoattack from the same spec."""

from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np
from jax.sharding import Mesh

from score_jax import attacks, data
from score_jax.autoattack import suite
from score_jax.checks import Check, choice, integer, real, require
from score_jax.evaluators.kind import Kind, SplitFn
from score_jax.precision import eval_model

NAME = "autoattack"


def spec(
    attack: ml_collections.ConfigDict,
    *,
    version: str = "standard",
    attacks: tuple[str, ...] = (),
    num_examples: int = -1,
    params: str = "best_by",
) -> ml_collections.ConfigDict:
    """An "autoattack" evaluator at config.attack's eps and norm (references, as pgd.spec's);
    `--mode autoattack` runs pyautoattack from the same spec (version, attacks, num_examples,
    eps, norm). version "standard" (APGD-CE, APGD-T, FAB-T, Square) or "custom" (`attacks`);
    the iteration counts are AutoAttack's standard ones; `num_examples`: the first n examples
    (-1: all); `params`: "best_by" evaluates only config.best_by's parameters (AutoAttack is
    the costly evaluator), "all" both."""
    return ml_collections.ConfigDict(
        dict(
            kind=NAME,
            version=version,
            attacks=tuple(attacks),
            num_examples=num_examples,
            params=params,
            **suite.STANDARD_COUNTS,
            eps=attack.get_ref("eps").identity(),
            norm=attack.get_ref("norm").identity(),
        )
    )


def options(spec: ml_collections.ConfigDict, names: tuple[str, ...]) -> dict[str, dict]:
    """Per-attack options of a spec: apgd_iters / fab_iters (100), targets (9), square_queries
    (5000) are AutoAttack's standard values; smaller ones make a quick look."""
    per_attack = {
        "apgd-ce": dict(n_iter=spec.apgd_iters),
        "apgd-t": dict(n_iter=spec.apgd_iters, n_target_classes=spec.targets),
        "fab-t": dict(n_iter=spec.fab_iters, n_target_classes=spec.targets),
        "square": dict(n_queries=spec.square_queries),
    }
    return {a: per_attack[a] for a in names}


def reported_version(spec: ml_collections.ConfigDict) -> str:
    """The version a spec's result is reported under: "standard" only with AutoAttack's
    standard counts (suite.STANDARD_COUNTS), else "reduced" (or "custom")."""
    return suite.reported_version(spec.version, {k: spec[k] for k in suite.STANDARD_COUNTS})


class SuiteEvaluator:
    """(variables, split, key) -> {"accuracy", "<attack>_accuracy" after each stage,
    "num_examples"}; its stages compile once and are reused on every call."""

    def __init__(
        self,
        model: nn.Module,
        spec: ml_collections.ConfigDict,
        mesh: Mesh,
        batch_size: int,
        precision: str = "float32",
    ):
        self.spec, self.mesh, self.batch_size = spec, mesh, batch_size
        self.model = model = eval_model(model, precision)
        self.attacks = suite.resolve_attacks(spec.version, spec.attacks)
        self.options = options(spec, self.attacks)
        self.stage_fns = suite.make_stage_fns(
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
        r = suite.evaluate(
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


class AutoAttackKind(Kind):
    """AutoAttack robust accuracy, on the whole split."""

    name = NAME
    per_batch = False

    def fields(self) -> dict[str, Check]:
        return {
            "eps": real(0.0, lo_open=True),
            "norm": choice(attacks.NORMS),
            "version": choice((*suite.VERSIONS, "custom")),
            "attacks": (
                lambda v: isinstance(v, tuple | list) and all(a in suite.ATTACKS for a in v),
                f"a tuple of names of {suite.ATTACKS}",
            ),
            "num_examples": integer(1, or_value=-1),
            "params": choice(("best_by", "all")),
            "apgd_iters": integer(1),
            "fab_iters": integer(1),
            "targets": integer(1),
            "square_queries": integer(1),
        }

    def check(self, where: str, spec: ml_collections.ConfigDict) -> None:
        suite.resolve_attacks(spec.version, tuple(spec.attacks), where=where)
        require(spec.targets <= 9, f"{where}.targets={spec.targets} must be <= 9 (AutoAttack's)")

    def describe(self, spec: ml_collections.ConfigDict) -> str:
        version = reported_version(spec)
        shown = version if version != "custom" else ", ".join(spec.attacks)
        if version != "standard":  # the counts that make it not the standard AutoAttack
            shown += (
                f" (APGD {spec.apgd_iters} it., FAB {spec.fab_iters} it., {spec.targets} "
                f"targets, Square {spec.square_queries} queries)"
            )
        n = "" if spec.num_examples == -1 else f", first {spec.num_examples}"
        return f"AutoAttack {shown} (JAX) {spec.norm} eps={spec.eps:.4g}{n}"

    def record(self, spec: ml_collections.ConfigDict) -> dict[str, Any]:
        """Its spec, "version" the one it is reported under (`reported_version`), the
        configured one kept as "configured_version"."""
        return {
            **spec.to_dict(),
            "version": reported_version(spec),
            "configured_version": spec.version,
        }

    def result_name(self, name: str, spec: ml_collections.ConfigDict) -> str:
        """ "<name>_reduced" at reduced counts (not the standard AutoAttack), else `name`."""
        return f"{name}_reduced" if reported_version(spec) == "reduced" else name

    def split_evaluator(
        self,
        model: nn.Module,
        spec: ml_collections.ConfigDict,
        mesh: Mesh,
        batch_size: int,
        precision: str,
    ) -> SplitFn:
        return SuiteEvaluator(model, spec, mesh, batch_size, precision)


KIND = AutoAttackKind()
