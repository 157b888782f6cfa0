"""Optimizer (PyTorch SGD semantics), weight-decay mask, schedules and the reference EMA."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from score_jax import config_lib, optim


def _optim_config(**kw) -> ml_collections.ConfigDict:
    c = config_lib.base_config().optim
    for k, v in kw.items():
        c[k] = v
    return c


def test_weight_decay_mask_skips_only_batchnorm():
    params = {
        "conv_0": {"kernel": 1.0},
        "batchnorm_0": {"scale": 1.0, "bias": 1.0},
        "layer_0": {"block_0": {"bn1": {"scale": 1.0}, "conv1": {"kernel": 1.0}}},
        "logits": {"kernel": 1.0, "bias": 1.0},
    }
    mask = optim.weight_decay_mask(params, decay_batchnorm=False)
    assert mask["conv_0"]["kernel"] and mask["logits"]["bias"]
    assert not mask["batchnorm_0"]["scale"] and not mask["batchnorm_0"]["bias"]
    assert not mask["layer_0"]["block_0"]["bn1"]["scale"]
    assert mask["layer_0"]["block_0"]["conv1"]["kernel"]
    assert all(jax.tree.leaves(optim.weight_decay_mask(params, decay_batchnorm=True)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_pytorch_formula(nesterov):
    # torch.optim.SGD: g <- g + wd p; v <- mu v + g; p <- p - lr (g + mu v if nesterov else v)
    lr, mu, wd = 0.1, 0.9, 5e-4
    config = _optim_config(nesterov=nesterov, weight_decay=wd, weight_decay_batchnorm=False)
    tx = optim.make_optimizer(config, optax.constant_schedule(lr))
    params = {"conv": {"kernel": jnp.array([1.0, -2.0])}, "bn": {"scale": jnp.array([0.5])}}
    state = tx.init(params)
    p = {k: np.asarray(v[list(v)[0]], np.float64) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for step in range(3):
        grads = {
            "conv": {"kernel": jnp.array([0.3, 0.1 * step])},
            "bn": {"scale": jnp.array([1.0])},
        }
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for k, g in (("conv", [0.3, 0.1 * step]), ("bn", [1.0])):
            g = np.asarray(g) + (wd * p[k] if k == "conv" else 0.0)
            v[k] = mu * v[k] + g
            p[k] = p[k] - lr * (g + mu * v[k] if nesterov else v[k])
    np.testing.assert_allclose(params["conv"]["kernel"], p["conv"], rtol=1e-6)
    np.testing.assert_allclose(params["bn"]["scale"], p["bn"], rtol=1e-6)


def test_grad_clipping():
    config = _optim_config(weight_decay=0.0, momentum=0.0, grad_clip_norm=1.0)
    tx = optim.make_optimizer(config, optax.constant_schedule(1.0))
    params = {"w": jnp.zeros(2)}
    updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)


def test_cyclic_cosine_schedule():
    total = 1000
    lr = optim.make_schedule(_optim_config(schedule="cyclic_cosine", learning_rate=0.2), 10, total)
    assert float(lr(0)) == pytest.approx(0.2 / 25)
    assert float(lr(25)) == pytest.approx(0.2)  # 2.5% warm-up
    assert float(lr(12)) == pytest.approx(0.2 / 25 + (0.2 - 0.2 / 25) * 12 / 25, rel=1e-5)
    mid = 25 + (total - 25) // 2
    assert float(lr(mid)) == pytest.approx(0.1, rel=1e-2)  # cosine half-way
    assert float(lr(total)) == pytest.approx(0.0, abs=1e-7)


def test_piecewise_schedule_in_epochs():
    config = _optim_config(schedule="piecewise", learning_rate=0.1, lr_boundaries_epochs=(100, 105))
    lr = optim.make_schedule(config, steps_per_epoch=391, total_steps=110 * 391)
    assert float(lr(100 * 391 - 1)) == pytest.approx(0.1)
    assert float(lr(100 * 391)) == pytest.approx(0.01)
    assert float(lr(105 * 391)) == pytest.approx(0.001)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="config.optim.schedule"):
        optim.make_schedule(_optim_config(schedule="linear"), 1, 10)


def test_ema_decay_reference_formula():
    # 0 before the warm-up ends, then min(tau, (1 + d) / (10 + d)).
    assert float(optim.ema_decay(4, 0.995, 5)) == 0.0
    assert float(optim.ema_decay(5, 0.995, 5)) == pytest.approx(1 / 10)
    assert float(optim.ema_decay(15, 0.995, 5)) == pytest.approx(11 / 20)
    assert float(optim.ema_decay(100000, 0.995, 5)) == pytest.approx(0.995)


def test_ema_update():
    ema, params = {"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}
    np.testing.assert_allclose(optim.ema_update(ema, params, 2, 0.995, 5)["w"], [3.0])
    # step 15, warm-up 5: decay 11/20 -> 0.55 * 1 + 0.45 * 3
    np.testing.assert_allclose(optim.ema_update(ema, params, 15, 0.995, 5)["w"], [1.9], rtol=1e-6)


def test_cycle_momentum_needs_one_cycle():
    with pytest.raises(ValueError, match="config.optim.cycle_momentum"):
        optim.make_momentum_schedule(_optim_config(cycle_momentum=True), 10, 100)
    with pytest.raises(ValueError, match="config.optim.schedule_unit"):
        optim.make_schedule(_optim_config(schedule_unit="batch"), 10, 100)


def test_epoch_unit_holds_the_lr_within_an_epoch():
    lr = optim.make_schedule(_optim_config(schedule="cosine", schedule_unit="epoch"), 10, 100)
    # cosine over 10 epochs: epoch e has 0.05 (1 + cos(pi e / 10)) / 2 for all its 10 steps.
    for step in (0, 9, 10, 55, 99):
        expected = 0.05 * 0.5 * (1 + np.cos(np.pi * (step // 10) / 10))
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6)
