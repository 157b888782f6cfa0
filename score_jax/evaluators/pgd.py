"""The "pgd" evaluator: 1[argmax f(x_adv) = y] at the PGD point x_adv that maximises
spec.objective (attacks.EVAL_OBJECTIVES); restarts keep, per example, the point with the
highest objective. num_steps 0: the clean accuracy."""

import jax
import ml_collections

from score_jax import attacks, losses
from score_jax.checks import Check, choice, integer, real, require
from score_jax.evaluators import clean
from score_jax.evaluators.kind import CorrectFn, Kind

NAME = "pgd"


def spec(
    attack: ml_collections.ConfigDict,
    *,
    objective: str,
    num_steps: int,
    step_size: float,
    restarts: int = 1,
    init: str = "uniform",
    l2_rule: str = "ball_then_box",
) -> ml_collections.ConfigDict:
    """A "pgd" evaluator (attacks.EVAL_OBJECTIVES objective) whose eps and norm are references
    to `attack`'s (config.attack): they follow `--config.attack.eps=...` until set themselves.
    `init` and `l2_rule` as attacks.pgd's."""
    return ml_collections.ConfigDict(
        dict(
            kind=NAME,
            objective=objective,
            num_steps=num_steps,
            step_size=step_size,
            restarts=restarts,
            init=init,
            l2_rule=l2_rule,
            eps=attack.get_ref("eps").identity(),
            norm=attack.get_ref("norm").identity(),
        )
    )


def points(
    spec: ml_collections.ConfigDict, logits_fn: attacks.LogitsFn, x: jax.Array, labels, keys
) -> jax.Array:
    """The points of a "pgd" evaluator: PGD maximising spec.objective with spec's eps, norm,
    step_size, num_steps, init, restarts and l2_rule."""
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


class PGDKind(Kind):
    """PGD robust accuracy, batch by batch."""

    name = NAME

    def fields(self) -> dict[str, Check]:
        return {
            "eps": real(0.0),
            "norm": choice(attacks.NORMS),
            "objective": choice(attacks.EVAL_OBJECTIVES),
            "num_steps": integer(0),
            "step_size": real(0.0),
            "restarts": integer(1),
            "init": choice(attacks.INITS),
            "l2_rule": choice(attacks.L2_RULES),
        }

    def check(self, where: str, spec: ml_collections.ConfigDict) -> None:
        require(
            spec.step_size > 0 or spec.num_steps == 0,
            f"{where}.step_size={spec.step_size} must be > 0 (num_steps={spec.num_steps})",
        )

    def describe(self, spec: ml_collections.ConfigDict) -> str:
        return f"PGD-{spec.num_steps} ({spec.objective}) {spec.norm} eps={spec.eps:.4g}"

    def correct(self, spec: ml_collections.ConfigDict) -> CorrectFn:
        """1[argmax f(x_adv) = y], x_adv = `points`; num_steps 0: clean."""

        def correct(logits_fn, x, labels, keys):
            if spec.num_steps == 0:
                return clean.correct(logits_fn, x, labels, keys)
            x_adv = points(spec, logits_fn, x, labels, keys)
            return losses.accuracy(logits_fn(x_adv), labels)

        return correct


KIND = PGDKind()
