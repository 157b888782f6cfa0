"""Tests of the PGD / FGSM attacks on small analytic models."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import attacks, losses

D = 12  # input dimension of the toy models (images of shape (2, 2, 3))
SHAPE = (2, 2, 3)


def _linear(key, num_classes):
    w = jax.random.normal(key, (D, num_classes))
    return w, lambda x: x.reshape(x.shape[0], -1) @ w


def _mlp(key, num_classes=5):
    k1, k2 = jax.random.split(key)
    w1, w2 = jax.random.normal(k1, (D, 32)), jax.random.normal(k2, (32, num_classes))
    return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def _images(key, n=8):
    return jax.random.uniform(key, (n, *SHAPE))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("init", ["uniform", "normal", "zero"])
def test_stays_in_ball_and_box(norm, init):
    logits_fn = _mlp(jax.random.key(0))
    eps = 0.3 if norm == "linf" else 1.0

    @jax.jit
    def attack(x, labels, key):
        objective = attacks.label_objective(logits_fn, labels)
        return attacks.pgd(
            objective,
            x,
            key,
            eps=eps,
            step_size=eps / 2,
            num_steps=7,
            norm=norm,
            init=init,
            restarts=2,
        )

    for seed in range(5):
        kx, ky, ka = jax.random.split(jax.random.key(seed), 3)
        x = _images(kx)
        x_adv = attack(x, jax.random.randint(ky, (8,), 0, 5), ka)
        chex.assert_shape(x_adv, x.shape)
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        delta = (x_adv - x).reshape(8, -1)
        size = jnp.abs(delta).max(-1) if norm == "linf" else jnp.linalg.norm(delta, axis=-1)
        assert float(size.max()) <= eps + 1e-5


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_raises_objective_over_clean_and_noise(norm):
    logits_fn = _mlp(jax.random.key(1))
    x = _images(jax.random.key(2), 64)
    labels = jnp.argmax(logits_fn(x), -1)  # start from correctly classified points
    objective = attacks.label_objective(logits_fn, labels)
    eps = 0.1 if norm == "linf" else 0.3
    x_adv = attacks.pgd(
        objective, x, jax.random.key(3), eps=eps, step_size=eps / 4, num_steps=10, norm=norm
    )
    noise = attacks.project(
        eps * jax.random.normal(jax.random.key(4), x.shape), x, eps=eps, norm=norm, x_min=0, x_max=1
    )
    adv, clean, noisy = objective(x_adv), objective(x), objective(x + noise)
    assert float(jnp.mean(adv)) > float(jnp.mean(noisy)) > 0
    assert float(jnp.mean(adv > clean)) > 0.95


def test_linf_reaches_closed_form_worst_case_of_linear_model():
    # Two classes: the CE of class y grows with the margin (w_o - w_y) . x, so the worst case in the
    # Linf ball (box inactive: x = 0.5, eps = 0.1) is x + eps sign(w_o - w_y).
    w, logits_fn = _linear(jax.random.key(5), 2)
    x = jnp.full((4, *SHAPE), 0.5)
    labels = jnp.array([0, 1, 0, 1])
    x_adv = attacks.pgd(
        attacks.label_objective(logits_fn, labels),
        x,
        jax.random.key(6),
        eps=0.1,
        step_size=0.03,
        num_steps=20,
    )
    direction = (w[:, 1 - labels] - w[:, labels]).T.reshape(x.shape)
    chex.assert_trees_all_close(x_adv, x + 0.1 * jnp.sign(direction), atol=1e-6)
    # FGSM is exactly that one step for a linear model.
    x_fgsm = attacks.fgsm(attacks.label_objective(logits_fn, labels), x, eps=0.1)
    chex.assert_trees_all_close(x_fgsm, x + 0.1 * jnp.sign(direction), atol=1e-6)


def test_l2_linear_worst_case():
    w, logits_fn = _linear(jax.random.key(7), 2)
    x = jnp.full((2, *SHAPE), 0.5)
    labels = jnp.array([0, 1])
    x_adv = attacks.pgd(
        attacks.cw_objective(logits_fn, labels),
        x,
        jax.random.key(8),
        eps=0.2,
        step_size=0.05,
        num_steps=30,
        norm="l2",
        init="zero",
    )
    direction = (w[:, 1 - labels] - w[:, labels]).T
    want = x + 0.2 * (direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)).reshape(
        x.shape
    )
    chex.assert_trees_all_close(x_adv, want, atol=1e-4)


def test_restarts_never_worse_than_one_run():
    logits_fn = _mlp(jax.random.key(9))
    x = _images(jax.random.key(10), 32)
    objective = attacks.cw_objective(logits_fn, jnp.arange(32) % 5)
    kw = dict(eps=0.2, step_size=0.05, num_steps=3)
    one = objective(attacks.pgd(objective, x, jax.random.key(11), restarts=1, **kw))
    many = objective(attacks.pgd(objective, x, jax.random.key(11), restarts=6, **kw))
    assert bool(jnp.all(many >= one - 1e-6))
    assert bool(jnp.any(many > one + 1e-4))  # some example found a better restart


def test_restart_ties_go_to_the_later_restart_as_attack_pgd():
    """without_DDPM/train_cifar.py's `attack_pgd`: max_delta[all_loss >= max_loss] = delta, so
    of equal final objectives the later restart's point is kept (here every objective is 0: no
    gradient, each restart stays at its own start)."""
    x = _images(jax.random.key(30), 4)
    key = jax.random.key(31)
    kw = dict(eps=0.1, norm="linf", init="uniform")
    flat = lambda inputs: jnp.zeros(inputs.shape[0])  # noqa: E731
    x_adv = attacks.pgd(flat, x, key, step_size=0.03, num_steps=2, restarts=3, **kw)
    last = jnp.clip(x + attacks.initial_delta(key, x, restart=2, **kw), 0.0, 1.0)
    first = jnp.clip(x + attacks.initial_delta(key, x, restart=0, **kw), 0.0, 1.0)
    chex.assert_trees_all_close(x_adv, last, atol=1e-7)
    assert float(jnp.abs(x_adv - first).max()) > 1e-2


def test_per_example_keys_make_examples_independent():
    logits_fn = _mlp(jax.random.key(12))
    x = _images(jax.random.key(13), 6)
    labels = jnp.arange(6) % 5
    keys = jax.random.split(jax.random.key(14), 6)
    kw = dict(eps=0.2, step_size=0.05, num_steps=3)
    full = attacks.pgd(attacks.label_objective(logits_fn, labels), x, keys, **kw)
    perm = jnp.array([5, 3, 1, 0, 2, 4])
    permuted = attacks.pgd(
        attacks.label_objective(logits_fn, labels[perm]), x[perm], keys[perm], **kw
    )
    chex.assert_trees_all_close(permuted, full[perm], atol=1e-6)


def test_trades_objective_matches_divergence_and_has_no_gradient_to_p_nat():
    logits_fn = _mlp(jax.random.key(15))
    x = _images(jax.random.key(16), 4)
    p_nat = jax.nn.softmax(logits_fn(x))
    obj = attacks.trades_objective(logits_fn, p_nat, kind="kl")
    chex.assert_trees_all_close(obj(x), jnp.zeros(4), atol=1e-5)
    x2 = x + 0.05
    chex.assert_trees_all_close(
        obj(x2),
        losses.divergence(p_nat, jax.nn.softmax(logits_fn(x2)), "kl"),
        rtol=1e-3,
        atol=1e-5,
    )


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_no_jit_agree(self):
        logits_fn = _mlp(jax.random.key(17))
        x = _images(jax.random.key(18), 8)
        labels = jnp.arange(8) % 5

        def attack(x, key):
            return attacks.pgd(
                attacks.label_objective(logits_fn, labels),
                x,
                key,
                eps=0.1,
                step_size=0.02,
                num_steps=5,
                restarts=2,
            )

        got = self.variant(attack)(x, jax.random.key(19))
        want = attack(x, jax.random.key(19))
        chex.assert_trees_all_close(got, want, atol=1e-6)


def test_bad_arguments():
    x = _images(jax.random.key(20), 2)
    obj = lambda x: jnp.sum(x, axis=(1, 2, 3))
    with pytest.raises(ValueError, match="norm"):
        attacks.pgd(obj, x, jax.random.key(0), eps=0.1, step_size=0.1, num_steps=1, norm="l3")
    with pytest.raises(ValueError, match="eps"):
        attacks.pgd(obj, x, jax.random.key(0), eps=-0.1, step_size=0.1, num_steps=1)
    with pytest.raises(ValueError, match="step_size"):
        attacks.pgd(obj, x, jax.random.key(0), eps=0.1, step_size=0.0, num_steps=1)
    with pytest.raises(ValueError, match="key"):
        attacks.pgd(obj, x, None, eps=0.1, step_size=0.1, num_steps=1)


def test_objective_raised_numerically():
    # The attack objective after PGD really is the per-example CE of the returned point.
    logits_fn = _mlp(jax.random.key(21))
    x = _images(jax.random.key(22), 4)
    labels = jnp.arange(4)
    x_adv = attacks.pgd(
        attacks.label_objective(logits_fn, labels),
        x,
        jax.random.key(23),
        eps=0.1,
        step_size=0.05,
        num_steps=4,
    )
    logits = np.asarray(logits_fn(x_adv), np.float64)
    ce = -(logits[np.arange(4), labels] - np.log(np.exp(logits).sum(-1)))
    np.testing.assert_allclose(
        attacks.label_objective(logits_fn, labels)(x_adv), ce, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("restarts", [1, 3])
def test_state_threads_through_every_gradient_pass(restarts):
    # The state counts the passes (as BatchNorm's running averages count PyTorch's train-mode
    # forwards): num_steps per restart; the passes comparing restarts leave it alone.
    logits_fn = _mlp(jax.random.key(30))
    x = _images(jax.random.key(31))
    labels = jnp.arange(8) % 5

    def objective(inputs, count):
        return losses.pgd_at_per_example(logits_fn(inputs), labels), count + 1

    kw = dict(eps=0.1, step_size=0.03, num_steps=4, restarts=restarts)
    x_adv, count = attacks.pgd_with_state(objective, x, jax.random.key(32), 0, **kw)
    assert int(count) == 4 * restarts
    stateless = attacks.pgd(attacks.label_objective(logits_fn, labels), x, jax.random.key(32), **kw)
    np.testing.assert_array_equal(x_adv, stateless)


def test_box_then_ball_rule():
    """The reference's L2 order: step, clip to the box, renorm to the ball; a zero gradient
    steps along a random direction; the start 0.001 N(0,1) is used unprojected."""
    x = jnp.concatenate([jnp.zeros((4, *SHAPE)), jnp.ones((4, *SHAPE))]) * 0.98 + 0.01
    eps, step = 0.5, 0.1
    flat = lambda x: jnp.zeros((x.shape[0],))  # noqa: E731  zero gradient everywhere
    kw = dict(eps=eps, step_size=step, norm="l2", init="normal", l2_rule="box_then_ball")
    x_adv = attacks.pgd(flat, x, jax.random.key(40), num_steps=30, **kw)
    delta = np.asarray(x_adv - x).reshape(8, -1)
    norms = np.linalg.norm(delta, axis=1)
    assert (norms > 0.3).all() and (norms <= eps + 1e-6).all()  # random steps, renormed
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # One step on a linear objective by hand: d = delta0 + a g/||g||, clip to the box, renorm.
    w = jax.random.normal(jax.random.key(41), SHAPE)
    linear = lambda x: jnp.sum(x * w, axis=(1, 2, 3))  # noqa: E731
    key = jax.random.key(42)
    d0 = np.asarray(attacks.initial_delta(key, x, eps=eps, norm="l2", init="normal"))
    got = np.asarray(attacks.pgd(linear, x, key, num_steps=1, **kw))
    w_np = np.asarray(w)
    d = d0 + step * w_np / np.linalg.norm(w_np)
    d = np.clip(np.asarray(x) + d, 0, 1) - np.asarray(x)
    n = np.linalg.norm(d.reshape(8, -1), axis=1).reshape(8, 1, 1, 1)
    d = d * np.where(n > eps, eps / (n + 1e-7), 1.0)
    np.testing.assert_allclose(got, np.clip(np.asarray(x) + d, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="l2_rule"):
        attacks.pgd(linear, x, key, num_steps=1, **{**kw, "l2_rule": "ball_first"})
