"""Tests of score_jax.losses against independent numpy formulas and the paper's closed forms."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_jax import losses


def _np_divergence(p: np.ndarray, q: np.ndarray, kind: str) -> np.ndarray:
    """Reference formulas in float64 numpy (0 log 0 = 0)."""
    p, q = p.astype(np.float64), q.astype(np.float64)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(a > 0, a * np.log(a / b), 0.0)
        return t.sum(-1)

    d = p - q
    m = (p + q) / 2
    return {
        "kl": lambda: kl(p, q),
        "se": lambda: (d**2).sum(-1),
        "l1": lambda: np.abs(d).sum(-1),
        "l2": lambda: np.sqrt((d**2).sum(-1)),
        "linf": lambda: np.abs(d).max(-1),
        "l1_sq": lambda: np.abs(d).sum(-1) ** 2,
        "js": lambda: 0.5 * kl(p, m) + 0.5 * kl(q, m),
        "js_dist": lambda: np.sqrt(0.5 * kl(p, m) + 0.5 * kl(q, m)),
    }[kind]()


def _random_dists(key, shape):
    return jax.nn.softmax(2.0 * jax.random.normal(key, shape), axis=-1)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_divergence_matches_reference_formula(kind):
    p = _random_dists(jax.random.key(0), (16, 10))
    q = _random_dists(jax.random.key(1), (16, 10))
    got = losses.divergence(p, q, kind)
    chex.assert_shape(got, (16,))
    np.testing.assert_allclose(got, _np_divergence(np.asarray(p), np.asarray(q), kind), rtol=2e-5)
    np.testing.assert_allclose(losses.divergence(p, p, kind), 0.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["se", "l1", "l2", "linf", "js", "js_dist", "l1_sq"])
def test_symmetric_divergences_are_symmetric(kind):
    p = _random_dists(jax.random.key(2), (8, 5))
    q = _random_dists(jax.random.key(3), (8, 5))
    chex.assert_trees_all_close(
        losses.divergence(p, q, kind), losses.divergence(q, p, kind), rtol=1e-5
    )


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_no_nan_at_zero_probabilities(kind):
    onehot = jax.nn.one_hot(jnp.array([0, 1, 2]), 4)
    q = jnp.array([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.0, 0, 0, 1]])  # equal, partial, disjoint

    def total(p, q):
        return jnp.sum(losses.divergence(p, q, kind))

    value = total(onehot, q)
    grads = jax.grad(total, argnums=(0, 1))(onehot, q)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads)
    # From extreme logits (softmax underflows to exactly 0).
    logits = jnp.array([[200.0, -200.0, 0.0, 0.0]] * 3)
    g = jax.grad(lambda z: jnp.sum(losses.divergence_from_logits(onehot, z, kind)))(logits)
    assert np.all(np.isfinite(g))


def test_kl_from_logits_with_onehot_is_cross_entropy():
    logits = 3.0 * jax.random.normal(jax.random.key(4), (32, 10))
    labels = jax.random.randint(jax.random.key(5), (32,), 0, 10)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    chex.assert_trees_all_close(
        losses.pgd_at_per_example(logits, labels, kind="kl"), ce, rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(losses.pgd_at_loss(logits, labels), jnp.mean(ce), rtol=1e-5)


def test_clip_bound_closed_forms():
    assert losses.clip_bound(0.4, 10, "se") == pytest.approx(0.16 * 10 / 9, rel=1e-5)
    assert losses.clip_bound(0.4, 10, "se") == pytest.approx(0.1778, abs=1e-4)
    assert losses.clip_bound(0.3, 10, "se") == pytest.approx(0.1, rel=1e-5)
    assert losses.clip_bound(0.4, 10, "kl") == pytest.approx(-np.log(0.6), rel=1e-5)
    assert losses.clip_bound(0.4, 10, "l1") == pytest.approx(0.8, rel=1e-5)
    assert losses.clip_bound(0.4, 10, "linf") == pytest.approx(0.4, rel=1e-5)
    assert losses.clip_bound(0.2, 5, "l2") == pytest.approx(0.2 * np.sqrt(5 / 4), rel=1e-5)
    with pytest.raises(ValueError, match="clip_c"):
        losses.clip_bound(1.0, 10, "se")


def test_smooth_labels():
    y = losses.smooth_labels(jnp.array([2, 0]), 5, 0.2)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0], [0.05, 0.05, 0.8, 0.05, 0.05], rtol=1e-6)
    chex.assert_trees_all_equal(losses.smooth_labels(jnp.array([1]), 3), jnp.array([[0.0, 1, 0]]))


def _np_smooth_cross_entropy(logits: np.ndarray, labels: np.ndarray, ls: float) -> np.ndarray:
    """The reference's SmoothCrossEntropyLoss (core/utils/utils.py), per example, transcribed:
    (1 - ls) * NLL + ls * mean_k(-log p_k)."""
    logp = np.log(_np_softmax(logits))
    nll = -logp[np.arange(len(labels)), labels]
    return (1 - ls) * nll + ls * (-logp.mean(-1))


def test_kl_label_smoothing_is_the_references_smooth_cross_entropy():
    ls, k = 0.1, 10
    y = losses.smooth_labels(jnp.array([3]), k, ls, kind="kl")
    np.testing.assert_allclose(y[0, 3], 1 - ls + ls / k, rtol=1e-6)
    np.testing.assert_allclose(y[0, 0], ls / k, rtol=1e-6)
    logits = 2.0 * jax.random.normal(jax.random.key(4), (16, k))
    labels = jnp.arange(16) % k
    ref = _np_smooth_cross_entropy(np.asarray(logits, np.float64), np.asarray(labels), ls)
    # KL(y~ || p) = CE(y~, p) - H(y~): the reference's loss less a constant, same gradient.
    target = np.full((k,), ls / k)
    target[0] = 1 - ls + ls / k
    entropy = -(target * np.log(target)).sum()
    kl = losses.pgd_at_per_example(logits, labels, kind="kl", label_smoothing=ls)
    np.testing.assert_allclose(kl + entropy, ref, rtol=1e-5)
    nat, _ = losses.trades_terms(logits, logits, labels, kind="kl", label_smoothing=ls)
    np.testing.assert_allclose(nat + entropy, ref, rtol=1e-5)
    # The SE path keeps the reference's trades_loss_LSE target: 1 - ls and ls/(K-1).
    se_target = losses.smooth_labels(jnp.array([3]), k, ls, kind="se")
    np.testing.assert_allclose(se_target[0, 3], 1 - ls, rtol=1e-6)
    np.testing.assert_allclose(se_target[0, 0], ls / (k - 1), rtol=1e-6)


def _np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class TradesTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.nat = 2.0 * jax.random.normal(jax.random.key(6), (16, 10))
        self.adv = self.nat + jax.random.normal(jax.random.key(7), (16, 10))
        self.labels = jax.random.randint(jax.random.key(8), (16,), 0, 10)
        p, pa = _np_softmax(self.nat), _np_softmax(self.adv)
        onehot = np.eye(10)[np.asarray(self.labels)]
        self.np_nat = ((onehot - p) ** 2).sum(-1)
        self.np_rob = ((p - pa) ** 2).sum(-1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_trades_se_formula(self):
        loss = self.variant(lambda a, b, y: losses.trades_loss(a, b, y, beta=6.0))
        np.testing.assert_allclose(
            loss(self.nat, self.adv, self.labels), np.mean(self.np_nat + 6 * self.np_rob), rtol=1e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_trades_clipping(self):
        bound = 0.09 * 10 / 9
        clip_all = self.variant(
            lambda a, b, y: losses.trades_loss(a, b, y, beta=3.0, clip_c=0.3, clip_clean=True)
        )
        clip_rob = self.variant(
            lambda a, b, y: losses.trades_loss(a, b, y, beta=3.0, clip_c=0.3, clip_clean=False)
        )
        want_all = np.mean(np.maximum(self.np_nat + 3 * self.np_rob - bound, 0))
        want_rob = np.mean(self.np_nat + 3 * np.maximum(self.np_rob - bound, 0))
        np.testing.assert_allclose(clip_all(self.nat, self.adv, self.labels), want_all, rtol=1e-5)
        np.testing.assert_allclose(clip_rob(self.nat, self.adv, self.labels), want_rob, rtol=1e-5)
        assert want_all != pytest.approx(want_rob)

    def test_trades_kl_natural_term_is_cross_entropy(self):
        nat, rob = losses.trades_terms(self.nat, self.adv, self.labels, kind="kl")
        ce = optax.softmax_cross_entropy_with_integer_labels(self.nat, self.labels)
        chex.assert_trees_all_close(nat, ce, rtol=1e-5, atol=1e-6)
        p, pa = _np_softmax(self.nat), _np_softmax(self.adv)
        np.testing.assert_allclose(rob, (p * np.log(p / pa)).sum(-1), rtol=1e-4, atol=1e-6)

    def test_robust_term_gradient_flows_through_clean_prediction(self):
        def rob_only(nat, detach):
            p = jax.nn.softmax(nat)
            p = jax.lax.stop_gradient(p) if detach else p
            return jnp.sum(losses.divergence(p, jax.nn.softmax(self.adv), "se"))

        def via_trades(nat):
            return jnp.sum(losses.trades_terms(nat, self.adv, self.labels)[1])

        g = jax.grad(via_trades)(self.nat)
        chex.assert_trees_all_close(g, jax.grad(rob_only)(self.nat, False), rtol=1e-5, atol=1e-7)
        assert float(jnp.abs(g).max()) > 1e-3

    def test_label_smoothing_target(self):
        ls = 0.1
        nat, _ = losses.trades_terms(self.nat, self.adv, self.labels, label_smoothing=ls)
        target = np.full((16, 10), ls / 9)
        target[np.arange(16), np.asarray(self.labels)] = 1 - ls
        np.testing.assert_allclose(nat, ((target - _np_softmax(self.nat)) ** 2).sum(-1), rtol=1e-5)


def test_pgd_at_se_with_clipping():
    logits = 2.0 * jax.random.normal(jax.random.key(9), (16, 10))
    labels = jnp.arange(16) % 10
    se = ((np.eye(10)[np.asarray(labels)] - _np_softmax(logits)) ** 2).sum(-1)
    bound = 0.16 * 10 / 9
    got = losses.pgd_at_loss(logits, labels, kind="se", clip_c=0.4)
    np.testing.assert_allclose(got, np.mean(np.maximum(se - bound, 0)), rtol=1e-5)


def test_cw_margin_and_accuracy():
    logits = jnp.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    labels = jnp.array([0, 2])
    chex.assert_trees_all_close(losses.cw_margin(logits, labels), jnp.array([-1.0, 4.0]))
    chex.assert_trees_all_equal(losses.accuracy(logits, labels), jnp.array([1.0, 0.0]))


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown divergence kind"):
        losses.divergence(jnp.ones((1, 2)) / 2, jnp.ones((1, 2)) / 2, "hellinger")
