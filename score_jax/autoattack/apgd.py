"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE and targeted APGD on the DLR loss (APGD-T).

One run (`apgd_run`) is a `lax.while_loop` of `n_iter` steps, following pyautoattack's
`APGDAttack.attack_single_run` for Linf and L2:

  start    x_0 = clip(x + eps t/||t||), t ~ U(-1, 1)^d (Linf) or N(0, 1)^d (L2), step eta = 2 eps
  step     z = P(x_k + eta s(g_k)), s = sign (Linf) or g/||g||_2 (L2)
           x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})), a = 1 at k = 0 else 0.75
  checks   after iteration counts w_j = ceil(p_j n_iter): p_0 = 0, p_1 = 0.22,
           p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (`checkpoint_schedule`); at w_j the step
           is halved, and the iterate reset to the best point, where
           (1) #{i in (w_{j-1}, w_j] : L(x_i) > L(x_{i-1})} <= rho (w_j - w_{j-1}), rho = 0.75, or
           (2) the step was not halved at w_{j-1} and the best loss did not grow since w_{j-1}.

An example counts as broken when any iterate (the start included) is misclassified; the returned
point is the last misclassified iterate (else the start). Reference quirk kept: at the first
check, condition (1) compares L(x_0) with the zero-initialised last row of the loss history.

Differences forced by static shapes: restarts (and target classes, unless the caller passes
`target_index` and re-gathers between targets as `autoattack.suite` does) run on the whole batch
(the reference re-gathers the still-robust examples); an example's result is the logical OR over
runs, which is what the reference computes, and the runs stop early (`lax.while_loop`) once no
example is left. Random starts come from one PRNG key per example (the reference draws one torch
stream for the batch).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import losses
from score_jax.attacks import _per_example_keys

Array = jax.Array
LogitsFn = Callable[[Array], Array]
LossFn = Callable[[Array, Array], Array]  # (logits, labels) -> (B,)

NORMS = ("linf", "l2")
MOMENTUM = 0.75


def dlr_loss(logits: Array, labels: Array) -> Array:
    """Untargeted DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), z sorted descending
    as z_pi1 >= z_pi2 >= ..."""
    logits = logits.astype(jnp.float32)
    z = jnp.sort(logits, axis=-1)
    return losses.cw_margin(logits, labels) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_loss_targeted(logits: Array, labels: Array, targets: Array) -> Array:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12), z_pi sorted descending."""
    logits = logits.astype(jnp.float32)
    z = jnp.sort(logits, axis=-1)
    z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    z_t = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return -(z_y - z_t) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def ce_loss(logits: Array, labels: Array) -> Array:
    """Cross-entropy -log softmax(z)_y per example."""
    return losses.pgd_at_per_example(logits, labels)


def checkpoint_schedule(n_iter: int) -> list[tuple[int, int]]:
    """(i, k) of each check: after iteration i (0-based), over the last k iterations.

    Intervals in integers as the reference: k_1 = max(int(0.22 n), 1), then
    k_{j+1} = max(k_j - max(int(0.03 n), 1), max(int(0.06 n), 1)).
    """
    k = max(int(0.22 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)
    k_min = max(int(0.06 * n_iter), 1)
    out, i = [], k - 1
    while i < n_iter:
        out.append((i, k))
        k = max(k - size_decr, k_min)
        i += k
    return out


def _flat_norm(v: Array, norm: str) -> Array:
    """Per-example ||v|| (Linf or L2), shaped (B, 1, ..., 1)."""
    axes = tuple(range(1, v.ndim))
    if norm == "linf":
        return jnp.max(jnp.abs(v), axis=axes, keepdims=True)
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def _normalize(v: Array, norm: str) -> Array:
    return v / (_flat_norm(v, norm) + 1e-12)


def _project(z: Array, x: Array, eps: float, norm: str) -> Array:
    """The reference's projection onto the eps-ball around x, then the box [0, 1]."""
    if norm == "linf":
        return jnp.clip(jnp.minimum(jnp.maximum(z, x - eps), x + eps), 0.0, 1.0)
    d = z - x
    return jnp.clip(x + _normalize(d, norm) * jnp.minimum(eps, _flat_norm(d, "l2")), 0.0, 1.0)


def _bcast(mask: Array, like: Array) -> Array:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))


def apgd_run(
    logits_fn: LogitsFn,
    loss_fn: LossFn,
    x: Array,
    labels: Array,
    keys: Array,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    rho: float = 0.75,
    x_init: Array | None = None,
    active: Array | None = None,
) -> tuple[Array, Array]:
    """One APGD run maximising sum_i loss_fn(logits_fn(x'), labels)_i; returns (x_adv, robust).

    robust[i] is False when some iterate of example i was misclassified; x_adv is then the last
    such iterate. `keys` holds one PRNG key per example (typed or raw uint32); `x_init`, when
    given, replaces the random start (as the reference's `x_init`). With `active` (a mask), the
    run stops once no active example is robust: the flags are those of all n_iter iterations,
    x_adv of a broken example may be an earlier misclassified iterate.
    """
    if norm not in NORMS:
        raise ValueError(f"apgd norm must be one of {NORMS}, got {norm!r}")
    if n_iter < 1:
        raise ValueError(f"apgd n_iter must be >= 1, got {n_iter}")
    shape = x.shape[1:]
    keys = _per_example_keys(keys, x.shape[0])
    if norm == "linf":
        t = jax.vmap(lambda k: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0))(keys)
    else:
        t = jax.vmap(lambda k: jax.random.normal(k, shape, x.dtype))(keys)
    x_adv = jnp.clip(x + eps * _normalize(t, norm) if x_init is None else x_init, 0.0, 1.0)

    def loss_grad(z: Array) -> tuple[Array, Array, Array]:
        def total(z):
            logits = logits_fn(z)
            per = loss_fn(logits, labels)
            return jnp.sum(per), (per, logits)

        (_, (per, logits)), g = jax.value_and_grad(total, has_aux=True)(z)
        return per, jnp.argmax(logits, axis=-1) == labels, g

    loss0, pred0, grad0 = loss_grad(x_adv)
    sched = checkpoint_schedule(n_iter)
    check_k = np.zeros((n_iter,), np.int32)
    for i, k in sched:
        check_k[i] = k
    check_k = jnp.asarray(check_k)
    hist_off = jnp.arange(n_iter)
    batch = x.shape[0]

    state = dict(
        i=jnp.int32(0),
        x_adv=x_adv,
        x_old=x_adv,
        grad=grad0,
        x_best=x_adv,
        grad_best=grad0,
        loss_best=loss0,
        x_best_adv=x_adv,
        robust=pred0,
        step=jnp.full((batch,), 2.0 * eps, x.dtype),
        loss_steps=jnp.zeros((n_iter, batch), jnp.float32),
        loss_best_last=loss0,
        reduced_last=jnp.ones((batch,), bool),
    )

    def body(s: dict) -> dict:
        i = s["i"]
        x_k, grad = s["x_adv"], s["grad"]
        grad2 = x_k - s["x_old"]
        a = jnp.where(i > 0, MOMENTUM, 1.0)
        step = _bcast(s["step"], x)
        if norm == "linf":
            z = _project(x_k + step * jnp.sign(grad), x, eps, norm)
        else:
            z = _project(x_k + step * _normalize(grad, norm), x, eps, norm)
        x_new = _project(x_k + (z - x_k) * a + grad2 * (1.0 - a), x, eps, norm)

        loss, pred, grad = loss_grad(x_new)
        robust = s["robust"] & pred
        x_best_adv = jnp.where(_bcast(~pred, x), x_new, s["x_best_adv"])
        loss_steps = s["loss_steps"].at[i].set(loss)
        better = loss > s["loss_best"]
        x_best = jnp.where(_bcast(better, x), x_new, s["x_best"])
        grad_best = jnp.where(_bcast(better, x), grad, s["grad_best"])
        loss_best = jnp.where(better, loss, s["loss_best"])

        # Check (1): count increases over the last k iterations (history indices wrap, as torch's).
        k = check_k[i]
        cur = loss_steps[(i - hist_off) % n_iter]
        prev = loss_steps[(i - hist_off - 1) % n_iter]
        inc = jnp.sum(jnp.where((hist_off < k)[:, None], cur > prev, False), axis=0)
        osc = inc <= k * rho
        no_impr = ~s["reduced_last"] & (s["loss_best_last"] >= loss_best)
        halve = (k > 0) & (osc | no_impr)
        at_check = k > 0
        return dict(
            i=i + 1,
            x_adv=jnp.where(_bcast(halve, x), x_best, x_new),
            x_old=x_k,
            grad=jnp.where(_bcast(halve, x), grad_best, grad),
            x_best=x_best,
            grad_best=grad_best,
            loss_best=loss_best,
            x_best_adv=x_best_adv,
            robust=robust,
            step=jnp.where(halve, s["step"] / 2.0, s["step"]),
            loss_steps=loss_steps,
            loss_best_last=jnp.where(at_check, loss_best, s["loss_best_last"]),
            reduced_last=jnp.where(at_check, osc | no_impr, s["reduced_last"]),
        )

    def cond(s: dict) -> Array:
        left = True if active is None else jnp.any(s["robust"] & active)
        return (s["i"] < n_iter) & left

    s = jax.lax.while_loop(cond, body, state)
    return jax.lax.stop_gradient(s["x_best_adv"]), s["robust"]


def _runs(
    run: Callable[[Array, Array], tuple[Array, Array]],
    x: Array,
    keys: Array,
    robust: Array,
    num_runs: int,
    first: Array | int = 0,
) -> tuple[Array, Array]:
    """Runs run(r, keys_r, robust) for first <= r < first + num_runs while some example is
    robust; ORs the breaks."""

    def cond(c):
        r, _, rob = c
        return (r < first + num_runs) & jnp.any(rob)

    def body(c):
        r, x_adv, rob = c
        run_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, r)
        x_r, rob_r = run(r, run_keys, rob)
        broken = rob & ~rob_r
        return r + 1, jnp.where(_bcast(broken, x), x_r, x_adv), rob & rob_r

    _, x_adv, robust = jax.lax.while_loop(cond, body, (jnp.asarray(first, jnp.int32), x, robust))
    return jax.lax.stop_gradient(x_adv), robust


def _apgd_runner(logits_fn, loss_of_run, x, labels, eps, norm, n_iter, rho, early_stop):
    """run(r, keys, alive) for `_runs`: APGD on loss_of_run(r), stopping early if asked."""

    def run(r, run_keys, alive):
        return apgd_run(
            logits_fn,
            loss_of_run(r),
            x,
            labels,
            run_keys,
            eps=eps,
            norm=norm,
            n_iter=n_iter,
            rho=rho,
            active=alive if early_stop else None,
        )

    return run


def _initial_robust(logits_fn: LogitsFn, x: Array, labels: Array, mask: Array | None):
    logits = logits_fn(x)
    robust = jnp.argmax(logits, axis=-1) == labels
    if mask is not None:
        robust &= mask.astype(bool)
    return logits, robust


def apgd_ce(
    logits_fn: LogitsFn,
    x: Array,
    labels: Array,
    key: Array,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    n_restarts: int = 1,
    rho: float = 0.75,
    mask: Array | None = None,
    early_stop: bool = False,
) -> tuple[Array, Array]:
    """APGD on the cross-entropy: (x_adv, robust) after `n_restarts` runs (AutoAttack standard: 1).

    robust is False for examples misclassified clean, broken by a run, or with mask 0.
    `early_stop`: a run ends once no example is left (`apgd_run`'s `active`; same flags).
    """
    _, robust = _initial_robust(logits_fn, x, labels, mask)
    run = _apgd_runner(logits_fn, lambda r: ce_loss, x, labels, eps, norm, n_iter, rho, early_stop)
    return _runs(run, x, _per_example_keys(key, x.shape[0]), robust, n_restarts)


def apgd_targeted(
    logits_fn: LogitsFn,
    x: Array,
    labels: Array,
    key: Array,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    n_target_classes: int = 9,
    n_restarts: int = 1,
    rho: float = 0.75,
    mask: Array | None = None,
    target_index: Array | int | None = None,
    early_stop: bool = False,
) -> tuple[Array, Array]:
    """APGD-T: for target = the 2nd, ..., (n_target_classes+1)-th largest clean logit, APGD on
    `dlr_loss_targeted` (`n_restarts` runs each); (x_adv, robust) as `apgd_ce`.

    `target_index` j (may be traced) runs only the target ranked j + 2, with the random starts
    of those runs in the full loop, so that a caller can re-gather the still-robust examples
    between targets as the reference does (`autoattack.suite`). `early_stop` as in `apgd_ce`."""
    keys = _per_example_keys(key, x.shape[0])
    logits, robust = _initial_robust(logits_fn, x, labels, mask)
    num_classes = logits.shape[-1]
    if n_target_classes > num_classes - 1:
        raise ValueError(
            f"apgd-t n_target_classes={n_target_classes} needs more than {num_classes} classes"
        )
    order = jnp.argsort(logits, axis=-1)
    first = 0 if target_index is None else target_index * n_restarts

    def loss_of_run(r):
        target = jnp.take(order, num_classes - 2 - r // n_restarts, axis=1)
        return lambda z, y: dlr_loss_targeted(z, y, target)

    run = _apgd_runner(logits_fn, loss_of_run, x, labels, eps, norm, n_iter, rho, early_stop)
    num_runs = n_restarts if target_index is not None else n_target_classes * n_restarts
    return _runs(run, x, keys, robust, num_runs, first=first)
