"""Projected gradient descent attacks as one jitted `lax.fori_loop`.

An attack maximises a per-example `objective(x_adv) -> (B,)`; the caller closes over the model, its
parameters, labels or clean predictions. The objectives below are built from `score_jax.losses`, so
training, attacks and evaluation share one copy of the loss math. A model enters only as a pure
`logits_fn(x) -> logits`.

    logits_fn = lambda x: model.apply(variables, x, train=False)
    x_adv = pgd(label_objective(logits_fn, y), x, key, eps=8/255, step_size=2/255, num_steps=10)
    x_fgsm = fgsm(label_objective(logits_fn, y), x, eps=8/255)

Linf steps: delta <- clip_eps(delta + a sign(g)); L2 steps: delta <- proj_eps(delta + a g/||g||_2);
both then clip x + delta to the image box [0, 1].
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from score_jax import losses
from score_jax.errors import ConfigError

Array = jax.Array
Objective = Callable[[Array], Array]
LogitsFn = Callable[[Array], Array]

NORMS = ("linf", "l2")
INITS = ("uniform", "normal", "zero")


def _per_example_keys(key: Array, n: int) -> Array:
    """One key per example: `key` itself when it already holds n keys, else split(key, n)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        single = key.ndim == 0
    else:
        single = key.ndim == 1
    return jax.random.split(key, n) if single else key


def _l2_norm(v: Array) -> Array:
    """Per-example L2 norm, broadcastable against v."""
    axes = tuple(range(1, v.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def project(delta: Array, x: Array, *, eps: float, norm: str, x_min: float, x_max: float) -> Array:
    """Projection of delta onto the eps-ball of `norm`, then of x + delta onto [x_min, x_max]."""
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / jnp.maximum(_l2_norm(delta), 1e-12))
    return jnp.clip(x + delta, x_min, x_max) - x


def _init_delta(keys: Array, x: Array, *, eps: float, norm: str, init: str) -> Array:
    """uniform: U(-eps, eps)^d (linf) or uniform in the L2 ball; normal: 0.001 N(0, 1); zero."""
    shape = x.shape[1:]
    if init == "zero":
        return jnp.zeros_like(x)
    if init == "normal":
        return jax.vmap(lambda k: 0.001 * jax.random.normal(k, shape, x.dtype))(keys)
    if norm == "linf":
        return jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype, -eps, eps))(keys)
    dim = x[0].size

    def ball(k: Array) -> Array:
        k_dir, k_rad = jax.random.split(k)
        direction = jax.random.normal(k_dir, shape, x.dtype)
        direction /= jnp.maximum(jnp.linalg.norm(direction), 1e-12)
        return eps * jax.random.uniform(k_rad, (), x.dtype) ** (1.0 / dim) * direction

    return jax.vmap(ball)(keys)


def _check(eps: float, step_size: float, num_steps: int, norm: str, init: str, restarts: int):
    if norm not in NORMS:
        raise ConfigError(f"attack norm must be one of {NORMS}, got {norm!r}")
    if init not in INITS:
        raise ConfigError(f"attack init must be one of {INITS}, got {init!r}")
    if eps < 0:
        raise ConfigError(f"attack eps must be >= 0, got {eps}")
    if step_size <= 0 and num_steps > 0:
        raise ConfigError(f"attack step_size must be > 0, got {step_size}")
    if num_steps < 0 or restarts < 1:
        raise ConfigError(f"need num_steps >= 0 and restarts >= 1, got {num_steps}, {restarts}")


def pgd(
    objective: Objective,
    x: Array,
    key: Array | None,
    *,
    eps: float,
    step_size: float,
    num_steps: int,
    norm: str = "linf",
    init: str = "uniform",
    restarts: int = 1,
    x_min: float = 0.0,
    x_max: float = 1.0,
) -> Array:
    """x_adv maximising sum_i objective(x_adv)_i within ||x_adv - x|| <= eps and the box.

    `key` is one PRNG key or one key per example (then example i's start depends only on key i).
    With restarts > 1 each example keeps the restart with the highest final objective (the PyTorch
    reference keeps the last restart instead: a known defect, deliberately not copied).
    The result carries `stop_gradient`.
    """
    _check(eps, step_size, num_steps, norm, init, restarts)
    if init != "zero":
        if key is None:
            raise ValueError(f"pgd with init={init!r} needs a PRNG key")
        keys = _per_example_keys(key, x.shape[0])
    grad_fn = jax.grad(lambda d: jnp.sum(objective(x + d)))

    def step(_, delta: Array) -> Array:
        g = grad_fn(delta)
        if norm == "linf":
            delta = delta + step_size * jnp.sign(g)
        else:
            delta = delta + step_size * g / jnp.maximum(_l2_norm(g), 1e-12)
        return project(delta, x, eps=eps, norm=norm, x_min=x_min, x_max=x_max)

    def run(r: int | Array) -> tuple[Array, Array]:
        if init == "zero":
            delta = jnp.zeros_like(x)
        else:
            run_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, r)
            delta = _init_delta(run_keys, x, eps=eps, norm=norm, init=init)
            delta = project(delta, x, eps=eps, norm=norm, x_min=x_min, x_max=x_max)
        delta = jax.lax.fori_loop(0, num_steps, step, delta)
        return x + delta, objective(x + delta)

    x_adv, best = run(0)
    if restarts > 1:

        def keep_best(r: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
            x_best, v_best = carry
            x_new, v_new = run(r)
            better = v_new > v_best
            mask = better.reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.where(mask, x_new, x_best), jnp.where(better, v_new, v_best)

        x_adv, best = jax.lax.fori_loop(1, restarts, keep_best, (x_adv, best))
    return jax.lax.stop_gradient(x_adv)


def fgsm(objective: Objective, x: Array, *, eps: float, norm: str = "linf") -> Array:
    """One step of size eps from x: x + eps sign(g) (linf) or x + eps g/||g|| (l2), in the box."""
    return pgd(
        objective,
        x,
        None,
        eps=eps,
        step_size=eps,
        num_steps=1,
        norm=norm,
        init="zero",
    )


def label_objective(
    logits_fn: LogitsFn, labels: Array, *, kind: str = "kl", label_smoothing: float = 0.0
) -> Objective:
    """PGD-AT objective D(y~ || softmax f(x')) (kind "kl": the cross-entropy)."""
    return lambda x: losses.pgd_at_per_example(
        logits_fn(x), labels, kind=kind, label_smoothing=label_smoothing
    )


def trades_objective(logits_fn: LogitsFn, p_nat: Array, *, kind: str = "se") -> Objective:
    """TRADES objective D(p || softmax f(x')) with the clean prediction p held fixed."""
    p_nat = jax.lax.stop_gradient(p_nat)
    return lambda x: losses.divergence_from_logits(p_nat, logits_fn(x), kind)


def cw_objective(logits_fn: LogitsFn, labels: Array) -> Objective:
    """CW margin max_{j != y} f_j(x') - f_y(x') (evaluation's PGD-CW)."""
    return lambda x: losses.cw_margin(logits_fn(x), labels)


EVAL_OBJECTIVES = ("ce", "cw")


def eval_objective(name: str, logits_fn: LogitsFn, labels: Array) -> Objective:
    """An evaluation objective by name: "ce" (cross-entropy) or "cw" (margin)."""
    if name == "ce":
        return label_objective(logits_fn, labels)
    if name == "cw":
        return cw_objective(logits_fn, labels)
    raise ConfigError(f"unknown attack objective {name!r}; valid: {EVAL_OBJECTIVES}")
