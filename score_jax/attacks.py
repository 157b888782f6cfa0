"""Projected gradient descent attacks as one jitted `lax.fori_loop`.

An attack maximises a per-example `objective(x_adv) -> (B,)`; the caller closes over the model, its
parameters, labels or clean predictions. The objectives below are built from `score_jax.losses`, so
training, attacks and evaluation share one copy of the loss math. A model enters only as a pure
`logits_fn(x) -> logits`.

    logits_fn = lambda x: model.apply(variables, x, train=False)
    x_adv = pgd(label_objective(logits_fn, y), x, key, eps=8/255, step_size=2/255, num_steps=10)
    x_fgsm = fgsm(label_objective(logits_fn, y), x, eps=8/255)

Linf steps: delta <- clip_eps(delta + a sign(g)); L2 steps: delta <- proj_eps(delta + a g/||g||_2);
both then clip x + delta to the image box [0, 1]. `l2_rule="box_then_ball"` is the L2 loop of the
reference's `trades_loss_LSE` (clip to the box first, then renorm to the ball; start unprojected);
`l2_rule="advertorch"` that of its validation PGD (core/attacks/pgd.py, advertorch's code).
`pgd_with_state` threads a state (BatchNorm running averages) through the attack's passes.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from score_jax import losses
from score_jax.errors import ConfigError

Array = jax.Array
Objective = Callable[[Array], Array]
LogitsFn = Callable[[Array], Array]

NORMS = ("linf", "l2")
# The model's BatchNorm mode in the training attack's passes (train.adversarial_examples).
ATTACK_BATCHNORM = ("batch_frozen", "eval", "batch_update")
INITS = ("uniform", "normal", "zero", "uniform_radius", "box_point")
L2_RULES = ("ball_then_box", "box_then_ball", "advertorch")
# torch.Tensor.renorm's guard: a delta with norm above eps is scaled by eps / (norm + 1e-7).
_RENORM_EPS = 1e-7


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


def initial_delta(
    key: Array, x: Array, *, eps: float, norm: str, init: str, restart: int | Array = 0
) -> Array:
    """The start of `pgd`'s restart `restart` before any projection, from one key or one key
    per example (each example's start depends only on its key); see `_init_delta`."""
    if init == "zero":
        return jnp.zeros_like(x)
    keys = _per_example_keys(key, x.shape[0])
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, restart)
    return _init_delta(keys, x, eps=eps, norm=norm, init=init)


def _init_delta(keys: Array, x: Array, *, eps: float, norm: str, init: str) -> Array:
    """zero; normal: 0.001 N(0, 1); linf, every other init: U(-eps, eps)^d. L2: uniform: uniform
    in the ball; uniform_radius: eps U(0, 1) n/||n||, n ~ N(0, 1)^d (without_DDPM/train_cifar.py's
    `attack_pgd`); box_point: (u - x) min(1, eps/||u - x||), u ~ U(0, 1)^d a point of the image box
    (core/attacks/utils.py `rand_init_delta`)."""
    shape = x.shape[1:]
    if init == "zero":
        return jnp.zeros_like(x)
    if init == "normal":
        return jax.vmap(lambda k: 0.001 * jax.random.normal(k, shape, x.dtype))(keys)
    if norm == "linf":
        return jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype, -eps, eps))(keys)
    if init == "uniform_radius":

        def radial(k: Array) -> Array:
            k_dir, k_rad = jax.random.split(k)
            n = jax.random.normal(k_dir, shape, x.dtype)
            return n * (jax.random.uniform(k_rad, (), x.dtype) * eps / jnp.linalg.norm(n))

        return jax.vmap(radial)(keys)
    if init == "box_point":
        u = jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype))(keys)
        d = u - x
        return d * jnp.minimum(1.0, eps / jnp.maximum(_l2_norm(d), 1e-12))
    dim = x[0].size

    def ball(k: Array) -> Array:
        k_dir, k_rad = jax.random.split(k)
        direction = jax.random.normal(k_dir, shape, x.dtype)
        direction /= jnp.maximum(jnp.linalg.norm(direction), 1e-12)
        return eps * jax.random.uniform(k_rad, (), x.dtype) ** (1.0 / dim) * direction

    return jax.vmap(ball)(keys)


def _check(
    eps: float, step_size: float, num_steps: int, norm: str, init: str, restarts: int, l2_rule: str
):
    if l2_rule not in L2_RULES:
        raise ConfigError(f"attack l2_rule must be one of {L2_RULES}, got {l2_rule!r}")
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
    l2_rule: str = "ball_then_box",
    x_min: float = 0.0,
    x_max: float = 1.0,
) -> Array:
    """x_adv maximising sum_i objective(x_adv)_i within ||x_adv - x|| <= eps and the box.

    `key` is one PRNG key or one key per example (then example i's start depends only on key i);
    the start of restart r is `initial_delta(key, x, ..., restart=r)`.
    With restarts > 1 each example keeps the restart with the highest final objective, a later
    one on a tie (as the reference's `attack_pgd` keeps the highest cross-entropy with >=; its
    `attack_pgd_divergence` keeps the last restart whatever its objective).
    L2 rules: "ball_then_box": the start is projected; a step is
      delta <- proj_box(proj_ball(delta + a g/max(||g||, 1e-12))).
    "box_then_ball" (the reference's `trades_loss_LSE`): the start is not projected; a step is
      d = delta + a g/||g|| (an example with g = 0 steps along a N(0, 1) draw instead),
      d <- clip(x + d, x_min, x_max) - x, then delta <- d min(1, eps/(||d|| + 1e-7)).
    "advertorch" (the reference's validation PGD, core/attacks/pgd.py): the start is not
      projected (its `box_point` start lies in the ball and the box); a step is
      d = delta + a g/max(||g||, 1e-6) (g = 0: no step), d <- clip(x + d, x_min, x_max) - x, then
      delta <- d min(1, eps/||d||).
    The result carries `stop_gradient`.
    """
    x_adv, _ = pgd_with_state(
        lambda inputs, state: (objective(inputs), state),
        x,
        key,
        None,
        eps=eps,
        step_size=step_size,
        num_steps=num_steps,
        norm=norm,
        init=init,
        restarts=restarts,
        l2_rule=l2_rule,
        x_min=x_min,
        x_max=x_max,
    )
    return x_adv


def pgd_with_state(
    objective: Callable[[Array, Any], tuple[Array, Any]],
    x: Array,
    key: Array | None,
    state: Any,
    *,
    eps: float,
    step_size: float,
    num_steps: int,
    norm: str = "linf",
    init: str = "uniform",
    restarts: int = 1,
    l2_rule: str = "ball_then_box",
    x_min: float = 0.0,
    x_max: float = 1.0,
) -> tuple[Array, Any]:
    """`pgd` with `objective(x_adv, state) -> (values (B,), new state)`: the state (e.g. the
    BatchNorm running averages PyTorch updates in train mode) is carried from each gradient pass
    to the next, in order, and returned with x_adv. The passes that compare restarts
    (restarts > 1) read the state without updating it."""
    _check(eps, step_size, num_steps, norm, init, restarts, l2_rule)
    if init != "zero" and key is None:
        raise ValueError(f"pgd with init={init!r} needs a PRNG key")
    if l2_rule == "box_then_ball" and norm == "l2" and key is None:
        raise ValueError("pgd with l2_rule='box_then_ball' needs a PRNG key")
    keys = None if key is None else _per_example_keys(key, x.shape[0])
    box_first = norm == "l2" and l2_rule in ("box_then_ball", "advertorch")

    def total(delta: Array, s: Any) -> tuple[Array, Any]:
        values, s = objective(x + delta, s)
        return jnp.sum(values), s

    grad_fn = jax.grad(total, has_aux=True)

    def l2_direction(g: Array, run_keys: Array | None, i: Array) -> Array:
        norm_g = _l2_norm(g)
        if not box_first:
            return g / jnp.maximum(norm_g, 1e-12)
        if l2_rule == "advertorch":
            return g / jnp.maximum(norm_g, 1e-6)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(run_keys, i + 1)
        noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(step_keys)
        return jnp.where(norm_g > 0, g / jnp.where(norm_g > 0, norm_g, 1.0), noise)

    def run(r: int | Array, s: Any) -> tuple[Array, Any]:
        run_keys = None
        if keys is not None:
            run_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, r)
        delta = jnp.zeros_like(x)
        if init != "zero":
            delta = _init_delta(run_keys, x, eps=eps, norm=norm, init=init)
        if not box_first:
            delta = project(delta, x, eps=eps, norm=norm, x_min=x_min, x_max=x_max)

        def step(i: Array, carry: tuple[Array, Any]) -> tuple[Array, Any]:
            delta, s = carry
            g, s = grad_fn(delta, s)
            if norm == "linf":
                delta = project(
                    delta + step_size * jnp.sign(g), x, eps=eps, norm=norm, x_min=x_min, x_max=x_max
                )
            elif box_first:
                delta = delta + step_size * l2_direction(g, run_keys, i)
                delta = jnp.clip(x + delta, x_min, x_max) - x
                norm_d = _l2_norm(delta)
                if l2_rule == "advertorch":
                    delta = delta * jnp.minimum(1.0, eps / jnp.maximum(norm_d, 1e-12))
                else:
                    delta = delta * jnp.where(norm_d > eps, eps / (norm_d + _RENORM_EPS), 1.0)
            else:
                delta = project(
                    delta + step_size * l2_direction(g, run_keys, i),
                    x,
                    eps=eps,
                    norm=norm,
                    x_min=x_min,
                    x_max=x_max,
                )
            return delta, s

        delta, s = jax.lax.fori_loop(0, num_steps, step, (delta, s))
        return jnp.clip(x + delta, x_min, x_max), s

    x_adv, state = run(0, state)
    if restarts > 1:

        def keep_best(r: Array, carry: tuple[Array, Array, Any]) -> tuple[Array, Array, Any]:
            x_best, v_best, s = carry
            x_new, s = run(r, s)
            v_new = objective(x_new, s)[0]
            better = v_new >= v_best
            mask = better.reshape((-1,) + (1,) * (x.ndim - 1))
            return jnp.where(mask, x_new, x_best), jnp.where(better, v_new, v_best), s

        best = objective(x_adv, state)[0]
        x_adv, _, state = jax.lax.fori_loop(1, restarts, keep_best, (x_adv, best, state))
    return jax.lax.stop_gradient(x_adv), state


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


def cw_objective(logits_fn: LogitsFn, labels: Array, *, clamped: bool = False) -> Objective:
    """CW margin max_{j != y} f_j(x') - f_y(x') (evaluation's PGD-CW); `clamped`: min(margin, 0),
    the reference's CW loss."""
    margin = losses.cw_margin_clamped if clamped else losses.cw_margin
    return lambda x: margin(logits_fn(x), labels)


# "ce"; "cw" / "cw_clamped" (margin, unclamped / the reference's); a divergence kind D: the
# PGD-AT objective D(onehot(y) || softmax f(x')) ("kl" is the cross-entropy).
EVAL_OBJECTIVES = ("ce", "cw", "cw_clamped", *losses.DIVERGENCES)


def eval_objective(name: str, logits_fn: LogitsFn, labels: Array) -> Objective:
    """An evaluation objective by name (EVAL_OBJECTIVES)."""
    if name == "ce":
        return label_objective(logits_fn, labels)
    if name in ("cw", "cw_clamped"):
        return cw_objective(logits_fn, labels, clamped=name == "cw_clamped")
    if name in losses.DIVERGENCES:
        return label_objective(logits_fn, labels, kind=name)
    raise ConfigError(f"unknown attack objective {name!r}; valid: {EVAL_OBJECTIVES}")
