"""SCORE losses: divergences between class distributions and the training objectives built on them.

Pure functions of arrays (no model inside). `p` is always the target distribution, `q` the model's;
every divergence is reduced over the last (class) axis and returns one value per example.

Notation (Pang et al., ICML 2022): p = softmax(f(x)), p' = softmax(f(x_adv)), y~ the (smoothed)
labels, K the number of classes. "KL -> SE" replaces KL(.||.) by the squared error ||P - Q||_2^2.
"""

import jax
import jax.numpy as jnp
import numpy as np

from score_jax.errors import ConfigError

Array = jax.Array

DIVERGENCES = ("kl", "se", "l1", "l2", "linf", "js", "js_dist", "l1_sq")
# Training methods (config.loss.method; train.METHODS holds their attack objective and loss).
LOSS_METHODS = ("trades", "pgd_at")
# TRADES: the order of the loss's clean and adversarial passes (they update the running averages).
TRADES_PASS_ORDERS = ("clean_first", "adv_first")

# Probabilities below this are treated as 0 inside a logarithm (value and gradient stay finite).
_TINY = 1e-30


def _safe_log(q: Array) -> Array:
    return jnp.log(jnp.maximum(q, _TINY))


def _xlogx(p: Array) -> Array:
    """p log p with 0 log 0 = 0 and a finite gradient at 0 (double-where)."""
    pos = p > 0
    return jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1.0)), 0.0)


def _safe_sqrt(x: Array) -> Array:
    """sqrt(x) with gradient 0 (not inf) at x = 0."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _kl(p: Array, q: Array, log_q: Array | None) -> Array:
    """KL(p||q) = sum_k p_k log p_k - p_k log q_k."""
    log_q = _safe_log(q) if log_q is None else log_q
    return jnp.sum(_xlogx(p) - p * log_q, axis=-1)


def _divergence(p: Array, q: Array, kind: str, log_q: Array | None = None) -> Array:
    diff = p - q
    if kind == "kl":
        return _kl(p, q, log_q)
    if kind == "se":
        return jnp.sum(jnp.square(diff), axis=-1)
    if kind == "l1":
        return jnp.sum(jnp.abs(diff), axis=-1)
    if kind == "l2":
        return _safe_sqrt(jnp.sum(jnp.square(diff), axis=-1))
    if kind == "linf":
        return jnp.max(jnp.abs(diff), axis=-1)
    if kind == "l1_sq":
        return jnp.square(jnp.sum(jnp.abs(diff), axis=-1))
    if kind in ("js", "js_dist"):
        m = 0.5 * (p + q)
        js = 0.5 * _kl(p, m, None) + 0.5 * _kl(q, m, None)
        js = jnp.maximum(js, 0.0)  # rounding can make it -1e-8
        return js if kind == "js" else _safe_sqrt(js)
    raise ConfigError(f"unknown divergence kind {kind!r}; valid kinds: {', '.join(DIVERGENCES)}")


def divergence(p: Array, q: Array, kind: str) -> Array:
    """D(p || q) per example, over the last axis, for probability vectors p (target) and q (model).

    kl: sum p log(p/q) (0 log 0 = 0); se: sum (p-q)^2; l1: sum |p-q|; l2: sqrt(sum (p-q)^2);
    linf: max |p-q|; js: (KL(p||m) + KL(q||m))/2 with m = (p+q)/2; js_dist: sqrt(js);
    l1_sq: (sum |p-q|)^2.
    """
    return _divergence(p, q, kind)


def divergence_from_logits(p: Array, logits: Array, kind: str) -> Array:
    """D(p || softmax(logits)) per example; KL uses log_softmax, so it is exact for tiny q."""
    logits = logits.astype(jnp.float32)
    return _divergence(p, jax.nn.softmax(logits), kind, log_q=jax.nn.log_softmax(logits))


def smooth_labels(
    labels: Array, num_classes: int, label_smoothing: float = 0.0, kind: str = "se"
) -> Array:
    """The smoothed target y~ of divergence `kind`, as the reference builds it.

    kind "kl" (the reference's `SmoothCrossEntropyLoss`, (1 - ls) NLL + ls mean_k(-log p_k)):
    (1 - ls) onehot(y) + ls/K, i.e. 1 - ls + ls/K on the true class and ls/K elsewhere.
    Every other kind (the SE path of `trades_loss_LSE`): (1 - ls K/(K-1)) onehot(y) + ls/(K-1),
    i.e. 1 - ls on the true class and ls/(K-1) elsewhere.
    """
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if not label_smoothing:
        return onehot
    k = num_classes
    if kind == "kl":
        return (1.0 - label_smoothing) * onehot + label_smoothing / k
    return (1.0 - label_smoothing * k / (k - 1)) * onehot + label_smoothing / (k - 1)


def clip_bound(c: float, num_classes: int, kind: str) -> float:
    """Clipping threshold D(e_1 || q_c), q_c = (1-c, c/(K-1), ..., c/(K-1)) (Table 2 of the paper).

    Closed forms: SE c^2 K/(K-1) (0.1778 at c=0.4, K=10); KL -log(1-c).
    """
    if not 0.0 <= c < 1.0:
        raise ConfigError(f"clip_c must lie in [0, 1), got {c}")
    e1 = np.zeros((num_classes,), np.float32)
    e1[0] = 1.0
    q = np.full((num_classes,), c / (num_classes - 1), np.float32)
    q[0] = 1.0 - c
    # Evaluated eagerly on constants, also while tracing: a Python float baked into the program.
    with jax.ensure_compile_time_eval():
        return float(_divergence(jnp.asarray(e1), jnp.asarray(q), kind))


def _clip(loss: Array, clip_c: float | None, num_classes: int, kind: str) -> Array:
    """relu(loss - bound) per example when clipping is on, else loss."""
    if clip_c is None:
        return loss
    return jax.nn.relu(loss - clip_bound(clip_c, num_classes, kind))


def pgd_at_per_example(
    logits_adv: Array,
    labels: Array,
    *,
    kind: str = "kl",
    clip_c: float | None = None,
    label_smoothing: float = 0.0,
) -> Array:
    """Madry PGD-AT per example: D(y~ || p'), clipped to relu(D - bound) when clip_c is given.

    kind "kl" with one-hot labels is the cross-entropy.
    """
    num_classes = logits_adv.shape[-1]
    target = smooth_labels(labels, num_classes, label_smoothing, kind)
    return _clip(divergence_from_logits(target, logits_adv, kind), clip_c, num_classes, kind)


def pgd_at_loss(
    logits_adv: Array,
    labels: Array,
    *,
    kind: str = "kl",
    clip_c: float | None = None,
    label_smoothing: float = 0.0,
) -> Array:
    """Mean over the batch of `pgd_at_per_example`."""
    return jnp.mean(
        pgd_at_per_example(
            logits_adv, labels, kind=kind, clip_c=clip_c, label_smoothing=label_smoothing
        )
    )


def trades_terms(
    logits_nat: Array,
    logits_adv: Array,
    labels: Array,
    *,
    kind: str = "se",
    label_smoothing: float = 0.0,
) -> tuple[Array, Array]:
    """The two TRADES terms per example: natural D(y~ || p) and robust D(p || p').

    Gradients flow through both p and p' in the robust term.
    """
    num_classes = logits_nat.shape[-1]
    target = smooth_labels(labels, num_classes, label_smoothing, kind)
    natural = divergence_from_logits(target, logits_nat, kind)
    robust = divergence_from_logits(
        jax.nn.softmax(logits_nat.astype(jnp.float32)), logits_adv, kind
    )
    return natural, robust


def trades_per_example(
    logits_nat: Array,
    logits_adv: Array,
    labels: Array,
    *,
    beta: float,
    kind: str = "se",
    clip_c: float | None = None,
    clip_clean: bool = True,
    label_smoothing: float = 0.0,
) -> Array:
    """TRADES per example: nat + beta rob, with nat = D(y~||p), rob = D(p||p').

    With clip_c: clip_clean=True gives relu(nat + beta rob - bound), clip_clean=False gives
    nat + beta relu(rob - bound); bound = clip_bound(clip_c, K, kind).
    """
    natural, robust = trades_terms(
        logits_nat, logits_adv, labels, kind=kind, label_smoothing=label_smoothing
    )
    num_classes = logits_nat.shape[-1]
    if clip_clean:
        return _clip(natural + beta * robust, clip_c, num_classes, kind)
    return natural + beta * _clip(robust, clip_c, num_classes, kind)


def trades_loss(
    logits_nat: Array,
    logits_adv: Array,
    labels: Array,
    *,
    beta: float,
    kind: str = "se",
    clip_c: float | None = None,
    clip_clean: bool = True,
    label_smoothing: float = 0.0,
) -> Array:
    """Mean over the batch of `trades_per_example` (a scalar)."""
    return jnp.mean(
        trades_per_example(
            logits_nat,
            logits_adv,
            labels,
            beta=beta,
            kind=kind,
            clip_c=clip_c,
            clip_clean=clip_clean,
            label_smoothing=label_smoothing,
        )
    )


def cw_margin(logits: Array, labels: Array) -> Array:
    """Carlini-Wagner margin per example, max_{j != y} z_j - z_y (positive = misclassified)."""
    logits = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    true = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return other - true


def cw_margin_clamped(logits: Array, labels: Array) -> Array:
    """The reference's CW loss min(max_{j != y} z_j - z_y, 0): 0, with zero gradient, once an
    example is misclassified (the DDPM setting's validation attack)."""
    return jnp.minimum(cw_margin(logits, labels), 0.0)


def accuracy(logits: Array, labels: Array) -> Array:
    """Per-example 0/1 correctness (float32)."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
