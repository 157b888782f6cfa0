"""Square Attack (Andriushchenko et al., ECCV 2020), score-based, Linf and L2.

Follows pyautoattack's `SquareAttack.attack_single_run` with the margin loss
m(x') = z_y - max_{j != y} z_j (= -`losses.cw_margin`), one restart and AutoAttack's settings
(5000 queries, p_init = 0.8, `resc_schedule=False`):

  Linf  start: x + eps * (vertical stripes of random signs, one per column and channel)
        step:  a random s x s window gets +-2 eps (one sign per channel), projected onto the
               eps-ball and [0, 1]
  L2    start: a 5 x 5 grid of (h // 5)-squares of the `eta` pattern with random signs, scaled
               to norm eps
        step:  mass of a second window moves into a first one, reshaped by `eta`, rescaled so
               that the total norm stays eps
  accept the candidate when its margin is lower, or when it is misclassified (margin <= 0);
  an example stops once its best margin is <= 0.

The window side s = round(sqrt(p h w)) (Linf: >= 1; L2: >= 3 and odd; <= min(h, w)) with p
from `window_fraction`, the reference's `p_selection`.

Differences forced by JAX: the queries run as one `lax.while_loop` that stops once no example is
left, with s looked up per query (L2 cuts its s x s windows as S x S slices of the image padded by
the largest side S, zero outside the s x s corner, so one program serves every s); window
positions, signs and the random transposition of `eta` are drawn per example from its own key,
where the reference draws one window for the whole batch at each query.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import losses
from score_jax.attacks import _per_example_keys

Array = jax.Array
LogitsFn = Callable[[Array], Array]

NORMS = ("linf", "l2")


def window_fraction(it: int, n_queries: int, p_init: float = 0.8, rescale: bool = False) -> float:
    """p at query `it`: p_init halved at it > 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
    (`rescale`: it is first mapped to int(it / n_queries * 10000))."""
    if rescale:
        it = int(it / n_queries * 10000)
    halvings = sum(it > b for b in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


def window_size(p: float, h: int, w: int, norm: str) -> int:
    """s = round(sqrt(p h w)), clipped to [1, min(h, w)] (Linf) or odd and >= 3 (L2)."""
    s = int(round(math.sqrt(p * h * w)))
    if norm == "linf":
        return min(max(s, 1), min(h, w))
    s = max(s, 3)
    if s % 2 == 0:
        s += 1
    return min(s, min(h, w))


def _sides(n_queries: int, p_init: float, rescale: bool, h: int, w: int, norm: str) -> list[int]:
    """The window side s of each query."""
    return [
        window_size(window_fraction(it, n_queries, p_init, rescale), h, w, norm)
        for it in range(n_queries)
    ]


def _eta_rectangles(a: int, b: int) -> np.ndarray:
    """Concentric rectangles around (a//2, b//2): entry (i, j) = sum_{c >= m_ij} 1/(c+1)^2."""
    delta = np.zeros((a, b), np.float64)
    xc, yc = a // 2 + 1, b // 2 + 1
    for c in range(max(xc, yc)):
        r0, c0 = xc - 1 - c, yc - 1 - c
        delta[max(r0, 0) : min(r0 + 2 * c + 1, a), max(c0, 0) : min(c0 + 2 * c + 1, b)] += (
            1.0 / (c + 1) ** 2
        )
    norm = np.sqrt(np.sum(delta**2))
    return delta / norm if norm > 0 else delta


def eta(s: int) -> np.ndarray:
    """The reference's L2 window pattern: upper half +rectangles, lower half -rectangles, unit
    L2 norm (before its random transposition)."""
    delta = np.zeros((s, s), np.float64)
    delta[: s // 2] = _eta_rectangles(s // 2, s)
    delta[s // 2 :] = -_eta_rectangles(s - s // 2, s)
    return (delta / np.sqrt(np.sum(delta**2))).astype(np.float32)


def _margin(logits_fn: LogitsFn, x: Array, labels: Array) -> Array:
    return -losses.cw_margin(logits_fn(x), labels)


def _l2(v: Array, axes) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def _randint(key: Array, high: int) -> Array:
    """floor(U (high)) as the reference's random_int(0, high): in [0, high - 1], 0 if high = 0."""
    return jnp.floor(jax.random.uniform(key) * high).astype(jnp.int32)


def _window_mask(h: int, w: int, vh: Array, vw: Array, s: int | Array) -> Array:
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    inside = (rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s)
    return inside[:, :, None].astype(jnp.float32)


def _linf_init(key: Array, x: Array, eps: float) -> Array:
    _, w, c = x.shape
    return jnp.clip(x + eps * jax.random.rademacher(key, (1, w, c), jnp.float32), 0.0, 1.0)


def _l2_init(key: Array, x: Array, eps: float) -> Array:
    h, w, c = x.shape
    s = h // 5
    sp = (h - s * 5) // 2
    # The reference's windows start at sp + k s (k < h // s, resp. w // s) inside the image,
    # row by row; window n's transposition and signs come from fold_in(key, n).
    rows = len(range(sp, min(h, sp + (h // s) * s), s))
    cols = len(range(sp, min(w, sp + (w // s) * s), s))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(rows * cols))
    k_t, k_s = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    transpose = jax.vmap(jax.random.bernoulli)(k_t)
    signs = jax.vmap(lambda k: jax.random.rademacher(k, (c,), jnp.float32))(k_s)
    e = jnp.asarray(eta(s))
    blocks = jnp.where(transpose[:, None, None], e.T, e)[..., None] * signs[:, None, None, :]
    grid = blocks.reshape(rows, cols, s, s, c).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * s, cols * s, c)[: h - sp, : w - sp]
    pad = ((sp, h - sp - grid.shape[0]), (sp, w - sp - grid.shape[1]), (0, 0))
    delta = jnp.pad(grid, pad)
    delta = delta / (_l2(delta, (0, 1, 2)) + 1e-12)
    return jnp.clip(x + delta * eps, 0.0, 1.0)


def _linf_propose(key: Array, x: Array, x_best: Array, eps: float, s: int | Array) -> Array:
    h, w, c = x.shape
    k_h, k_w, k_s = jax.random.split(key, 3)
    vh, vw = _randint(k_h, h - s), _randint(k_w, w - s)
    sign = jax.random.rademacher(k_s, (c,), jnp.float32)
    x_new = x_best + _window_mask(h, w, vh, vw, s) * (2.0 * eps * sign)
    return jnp.clip(jnp.minimum(jnp.maximum(x_new, x - eps), x + eps), 0.0, 1.0)


def _eta_table(sides: list[int]) -> np.ndarray:
    """eta(s) in the top-left s x s corner of an S x S zero array (S = max(sides)), row s."""
    big = max(sides)
    table = np.zeros((big + 1, big, big), np.float32)
    for s in set(sides):
        table[s, :s, :s] = eta(s)
    return table


def _l2_propose(
    key: Array, x: Array, x_best: Array, eps: float, s: Array, eta_table: Array
) -> Array:
    h, w, c = x.shape
    big = eta_table.shape[-1]
    k_h, k_w, k_h2, k_w2, k_t, k_s = jax.random.split(key, 6)
    vh, vw = _randint(k_h, h - s), _randint(k_w, w - s)
    vh2, vw2 = _randint(k_h2, h - s), _randint(k_w2, w - s)
    corner = _window_mask(big, big, 0, 0, s)
    pad = ((0, big), (0, big), (0, 0))
    delta = x_best - x
    window_1 = jax.lax.dynamic_slice(jnp.pad(delta, pad), (vh, vw, 0), (big, big, c)) * corner
    norms_window_1 = _l2(window_1, (0, 1))
    mask_1 = _window_mask(h, w, vh, vw, s)
    mask_2 = _window_mask(h, w, vh2, vw2, s)
    norms_image = _l2(delta, (0, 1, 2))
    norms_windows = _l2(delta * jnp.maximum(mask_1, mask_2), (0, 1))
    e = eta_table[s]
    pattern = jnp.where(jax.random.bernoulli(k_t), e.T, e)
    new = pattern[:, :, None] * jax.random.rademacher(k_s, (c,), jnp.float32)[None, None, :]
    new = new + window_1 / (1e-12 + norms_window_1)
    scale = jnp.sqrt(jnp.maximum(eps**2 - norms_image**2, 0.0) / c + norms_windows**2)
    new = new / (1e-12 + _l2(new, (0, 1))) * scale
    padded = jnp.pad(delta * (1.0 - mask_2), pad)
    old = jax.lax.dynamic_slice(padded, (vh, vw, 0), (big, big, c))
    padded = jax.lax.dynamic_update_slice(padded, old * (1.0 - corner) + new, (vh, vw, 0))
    delta = padded[:h, :w]
    return jnp.clip(x + delta / (_l2(delta, (0, 1, 2)) + 1e-12) * eps, 0.0, 1.0)


def square_attack(
    logits_fn: LogitsFn,
    x: Array,
    labels: Array,
    key: Array,
    *,
    eps: float,
    norm: str = "linf",
    n_queries: int = 5000,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    mask: Array | None = None,
) -> tuple[Array, Array]:
    """Square attack on the margin; returns (x_adv, robust) with robust = argmax f(x_adv) == y
    (False for clean-misclassified examples and mask 0). `key`: one key or one per example."""
    if norm not in NORMS:
        raise ValueError(f"square norm must be one of {NORMS}, got {norm!r}")
    if n_queries < 0:
        raise ValueError(f"square n_queries must be >= 0, got {n_queries}")
    _, h, w, _ = x.shape
    keys = _per_example_keys(key, x.shape[0])
    clean = jnp.argmax(logits_fn(x), axis=-1) == labels
    if mask is not None:
        clean &= mask.astype(bool)
    # n_queries = 0: the table is never read
    sides = _sides(n_queries, p_init, rescale_schedule, h, w, norm) or [min(h, w)]
    table = jnp.asarray(sides, jnp.int32)
    if norm == "linf":
        init, propose = _linf_init, _linf_propose
    else:
        eta_table = jnp.asarray(_eta_table(sides))
        init, propose = _l2_init, functools.partial(_l2_propose, eta_table=eta_table)
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    init_keys, query_keys = fold(keys, 0), fold(keys, 1)
    x_best = jax.vmap(init, in_axes=(0, 0, None))(init_keys, x, eps)
    margin_min = jnp.where(clean, _margin(logits_fn, x_best, labels), -1.0)
    loss_min = margin_min

    def cond(c):
        i, _, margin_min, _ = c
        return (i < n_queries) & jnp.any(margin_min > 0.0)

    def body(c):
        i, x_best, margin_min, loss_min = c
        active = margin_min > 0.0
        step_keys = fold(query_keys, i)
        x_new = jax.vmap(propose, in_axes=(0, 0, 0, None, None))(
            step_keys, x, x_best, eps, table[i]
        )
        margin = _margin(logits_fn, x_new, labels)
        improved = margin < loss_min
        loss_min = jnp.where(active & improved, margin, loss_min)
        take = active & (improved | (margin <= 0.0))
        margin_min = jnp.where(take, margin, margin_min)
        x_best = jnp.where(take[:, None, None, None], x_new, x_best)
        return i + 1, x_best, margin_min, loss_min

    _, x_best, margin_min, loss_min = jax.lax.while_loop(
        cond, body, (jnp.int32(0), x_best, margin_min, loss_min)
    )

    robust = clean & (jnp.argmax(logits_fn(x_best), axis=-1) == labels)
    x_adv = jnp.where(robust[:, None, None, None] | ~clean[:, None, None, None], x, x_best)
    return jax.lax.stop_gradient(x_adv), robust
