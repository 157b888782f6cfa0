"""Targeted FAB (Croce & Hein, ICML 2020), Linf and L2, as AutoAttack's "standard" FAB-T.

Follows pyautoattack's `FABAttack.attack_single_run` with `is_targeted=True` and no random start
(FAB-T runs one restart): for target t (the k-th largest clean logit, k = 2, ..., 10) and
x_1 = x_0 = x, each of the `n_iter` iterations linearises f(x') = z_t(x') - z_y(x') at x_1,

  w = grad f(x_1),  b = <w, x_1> - f(x_1)   (the hyperplane {z : <w, z> = b}),
  d_1 = proj(x_1), d_0 = proj(x_0)           (minimal-norm steps onto it within the box, `project`)
  alpha = clip(||d_1|| / (||d_1|| + ||d_0||), 0, alpha_max)
  x_1 <- clip((x_1 + eta d_1)(1 - alpha) + (x_0 + eta d_0) alpha, 0, 1),

and when x_1 is misclassified it is kept if ||x_1 - x_0|| is the smallest so far, then pulled
back: x_1 <- x_0 + beta (x_1 - x_0). alpha_max = 0.1, eta = 1.05, beta = 0.9. An example counts
as broken when the best point is misclassified and within eps.

`projection_linf` / `projection_l2` are the reference's projections onto {<w, z> = b} n [0, 1]^d
(sort + a fixed-length bisection), per row and vmapped. Static shapes: the 9 targets run on the
whole batch in a `lax.while_loop` that stops once no example is left, unless the caller passes
`target_index` and re-gathers between targets (`autoattack.suite`); FAB-T is deterministic.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from score_jax.autoattack.apgd import _bcast

Array = jax.Array
LogitsFn = Callable[[Array], Array]

NORMS = ("linf", "l2")


def _bisect(n: int, test: Callable[[Array], Array]) -> Array:
    """The reference's bisection: lb = 0, ub = n - 1, ceil(log2 n) halvings on test(mid)."""

    def body(_, c):
        lb, ub = c
        mid = jnp.floor((lb + ub) / 2.0)
        ok = test(mid.astype(jnp.int32))
        return jnp.where(ok, mid, lb), jnp.where(ok, ub, mid)

    lb, _ = jax.lax.fori_loop(0, math.ceil(math.log2(n)), body, (0.0, float(n - 1)))
    return lb.astype(jnp.int32)


def _argsort(v: Array) -> Array:
    """`jnp.argsort(v)` of a float vector (stable, -0.0 equal to 0.0) as two one-operand integer
    sorts, which XLA:CPU runs about 10x faster than the sort carrying the indices: the key of
    element i is n * (the position of its value's first occurrence among the sorted values) + i."""
    n = v.shape[0]
    if n * n >= 2**31:
        return jnp.argsort(v)
    bits = jax.lax.bitcast_convert_type(jnp.where(v == 0, 0.0, v).astype(jnp.float32), jnp.int32)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # integer order = float order
    first = jnp.searchsorted(jax.lax.sort(keys), keys, side="left").astype(jnp.int32)
    return jax.lax.sort(first * n + jnp.arange(n, dtype=jnp.int32)) % n


def _projection_linf_row(t: Array, w: Array, b: Array) -> Array:
    """min ||d||_inf s.t. <w, t + d> = b, t + d in [0, 1]^n (one row)."""
    n = t.shape[0]
    sign = jnp.where(jnp.dot(w, t) - b >= 0, 1.0, -1.0)
    w, b = w * sign, b * sign
    a = (w < 0).astype(t.dtype)
    nz = (w != 0).astype(t.dtype)
    d = (a - t) * nz
    p = a - t * (2 * a - 1)
    indp = _argsort(p)
    b = b - jnp.dot(w, t)
    b0 = jnp.dot(w, d)
    indp2 = indp[::-1]
    ws = w[indp2]
    bs2 = -ws * d[indp2]
    s = jnp.cumsum(jnp.abs(ws))
    sb = jnp.cumsum(bs2) + b0
    b2 = sb[-1] - s[-1] * p[indp[0]]
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & ~c_l
    lb = _bisect(n, lambda m: b - (sb[m] - s[m] * p[indp[n - 1 - m]]) > 0)
    lmbd_l = jnp.maximum((b - sb[-1]) / (-s[-1]), 0.0)
    d_l = (2 * a - 1) * lmbd_l
    lmbd_2 = jnp.maximum((b - sb[lb]) / (-s[lb]), 0.0)
    d_2 = jnp.minimum(lmbd_2, d) * a + jnp.maximum(-lmbd_2, d) * (1 - a)
    d = jnp.where(c_l, d_l, jnp.where(c2, d_2, d))
    return d * nz


def _projection_l2_row(t: Array, w: Array, b: Array) -> Array:
    """min ||d||_2 s.t. <w, t + d> = b, t + d in [0, 1]^n (one row)."""
    n = t.shape[0]
    c = jnp.dot(w, t) - b
    sign = jnp.where(c >= 0, 1.0, -1.0)
    w, c = w * sign, c * sign
    small = jnp.abs(w) < 1e-8
    r = jnp.clip(jnp.maximum(t / w, (t - 1) / w), -1e12, 1e12)
    r = jnp.where(small, 1e12, r)
    r = jnp.where(r == -1e12, 1e12, r)
    indr = _argsort(r)
    rs = r[indr]
    rs2 = jnp.concatenate([rs[1:], jnp.zeros((1,), rs.dtype)])
    rs = jnp.where(rs == 1e12, 0.0, rs)
    rs2 = jnp.where(rs2 == 1e12, 0.0, rs2)
    w3s = jnp.square(w)[indr]
    w5 = jnp.sum(w3s)
    ws = w5 - jnp.cumsum(w3s)
    d = jnp.where(small, 0.0, -(r * w))
    s = jnp.concatenate([-w5 * rs[:1], jnp.cumsum((-rs2 + rs) * ws) - w5 * rs[0]])
    c4 = s[0] + c < 0
    c3 = jnp.dot(d, w) + c > 0
    c2 = ~(c4 | c3)
    lb = _bisect(n, lambda m: s[m] + c > 0)
    d_4 = -(c / w5) * w
    alpha = jnp.where(ws[lb] == 0, 0.0, (s[lb] + c) / ws[lb] + rs[lb])
    c5 = (alpha > r).astype(t.dtype)
    d_2 = d * c5 - alpha * w * (1 - c5)
    d = jnp.where(c4, d_4, jnp.where(c2, d_2, d))
    return jnp.where(small, 0.0, d)


def projection_linf(points: Array, w: Array, b: Array) -> Array:
    """Rows (N, n): the Linf-minimal d with <w, p + d> = b inside the box (the reference's
    `projection_linf`)."""
    return jax.vmap(_projection_linf_row)(points, w, b)


def projection_l2(points: Array, w: Array, b: Array) -> Array:
    """Rows (N, n): the L2-minimal d with <w, p + d> = b inside the box (`projection_l2`)."""
    return jax.vmap(_projection_l2_row)(points, w, b)


def _row_norm(v: Array, norm: str) -> Array:
    if norm == "linf":
        return jnp.max(jnp.abs(v), axis=1)
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=1))


def fab_targeted_run(
    logits_fn: LogitsFn,
    x: Array,
    labels: Array,
    targets: Array,
    *,
    norm: str = "linf",
    n_iter: int = 100,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    active: Array | None = None,
    eps: float | None = None,
) -> tuple[Array, Array]:
    """One targeted FAB run from x; returns (x_best, dist) with dist = ||x_best - x|| of the
    closest misclassified iterate, 1e10 where none was found (x_best = x there). With `active`
    and `eps`, the run stops once every active example has dist <= eps (whether dist <= eps
    is then as after n_iter iterations; x_best may be farther)."""
    batch = x.shape[0]
    x0 = x.reshape(batch, -1)
    project = projection_linf if norm == "linf" else projection_l2

    def diff(z: Array) -> tuple[Array, Array]:
        logits = logits_fn(z)
        z_y = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        z_t = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
        return jnp.sum(-(z_y - z_t)), -(z_y - z_t)

    grad_fn = jax.grad(diff, has_aux=True)

    def body(c):
        i, x1, adv, res = c
        g, df = grad_fn(x1)
        w = g.reshape(batch, -1)
        x1f = x1.reshape(batch, -1)
        b = -df + jnp.sum(w * x1f, axis=1)
        d3 = project(jnp.concatenate([x1f, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]))
        d1, d2 = d3[:batch], d3[batch:]
        a0 = jnp.maximum(_row_norm(d3, norm), 1e-8)
        a1, a2 = a0[:batch], a0[batch:]
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x1f = jnp.clip((x1f + eta * d1) * (1 - alpha) + (x0 + d2 * eta) * alpha, 0.0, 1.0)
        x1 = x1f.reshape(x.shape)
        is_adv = jnp.argmax(logits_fn(x1), axis=-1) != labels
        t = _row_norm(x1f - x0, norm)
        closer = is_adv & (t < res)
        adv = jnp.where(_bcast(closer, x), x1, adv)
        res = jnp.where(closer, t, res)
        x1 = jnp.where(_bcast(is_adv, x), x + (x1 - x) * beta, x1)
        return i + 1, x1, adv, res

    def cond(c):
        i, _, _, res = c
        left = True if active is None else jnp.any(active & (res > eps))
        return (i < n_iter) & left

    res0 = jnp.full((batch,), 1e10, jnp.float32)
    _, _, adv, res = jax.lax.while_loop(cond, body, (jnp.int32(0), x, x, res0))
    return adv, res


def fab_targeted(
    logits_fn: LogitsFn,
    x: Array,
    labels: Array,
    *,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    n_target_classes: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    mask: Array | None = None,
    target_index: Array | int | None = None,
    early_stop: bool = False,
) -> tuple[Array, Array]:
    """FAB-T over the targets ranked 2, ..., n_target_classes + 1 by the clean logits; returns
    (x_adv, robust): robust is False where a run found a misclassified point within eps (and for
    clean-misclassified examples or mask 0). `target_index` j (may be traced) runs only the
    target ranked j + 2 (a caller re-gathering between targets, `autoattack.suite`).
    `early_stop`: a run ends once no example is left (`fab_targeted_run`'s `active`)."""
    if norm not in NORMS:
        raise ValueError(f"fab norm must be one of {NORMS}, got {norm!r}")
    logits = logits_fn(x)
    num_classes = logits.shape[-1]
    if n_target_classes > num_classes - 1:
        raise ValueError(
            f"fab-t n_target_classes={n_target_classes} needs more than {num_classes} classes"
        )
    robust = jnp.argmax(logits, axis=-1) == labels
    if mask is not None:
        robust &= mask.astype(bool)
    order = jnp.argsort(logits, axis=-1)

    first = 0 if target_index is None else target_index
    stop = first + (n_target_classes if target_index is None else 1)

    def cond(c):
        r, _, rob = c
        return (r < stop) & jnp.any(rob)

    def body(c):
        r, x_adv, rob = c
        targets = jnp.take(order, num_classes - 2 - r, axis=1)
        adv, res = fab_targeted_run(
            logits_fn,
            x,
            labels,
            targets,
            norm=norm,
            n_iter=n_iter,
            alpha_max=alpha_max,
            eta=eta,
            beta=beta,
            active=rob if early_stop else None,
            eps=eps,
        )
        fooled = (jnp.argmax(logits_fn(adv), axis=-1) != labels) & (res <= eps)
        broken = rob & fooled
        return r + 1, jnp.where(_bcast(broken, x), adv, x_adv), rob & ~fooled

    _, x_adv, robust = jax.lax.while_loop(cond, body, (jnp.asarray(first, jnp.int32), x, robust))
    return jax.lax.stop_gradient(x_adv), robust
