"""The reference recipe (DESIGN.md section 8) against PyTorch itself: OneCycleLR driving SGD."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from score_jax import config_lib, optim  # noqa: E402
from score_jax.data import Dataset, Split, TrainBatcher  # noqa: E402

CONFIGS = "configs"


def _torch_one_cycle(optim_config, num_epochs: int):
    """Per-epoch (lr, momentum) of torch OneCycleLR(total_steps=num_epochs) driving SGD-Nesterov,
    stepped once per epoch as the reference's watrain.py does."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD(
        [param],
        lr=optim_config.learning_rate,
        momentum=0.9,
        nesterov=True,
        weight_decay=optim_config.weight_decay,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=optim_config.learning_rate, pct_start=0.025, total_steps=num_epochs
    )
    lrs, moms = [], []
    for _ in range(num_epochs):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    return np.asarray(lrs), np.asarray(moms)


def test_ddpm_schedule_every_step_equals_torch_one_cycle():
    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_ddpm.py")
    steps_per_epoch = math.ceil(50000 / config.batch_size)
    assert steps_per_epoch == 98
    total = config.num_epochs * steps_per_epoch
    lr_fn = optim.make_schedule(config.optim, steps_per_epoch, total)
    mom_fn = optim.make_momentum_schedule(config.optim, steps_per_epoch, total)
    steps = jnp.arange(total)
    lr, mom = np.asarray(jax.jit(lr_fn)(steps)), np.asarray(jax.jit(mom_fn)(steps))

    torch_lr, torch_mom = _torch_one_cycle(config.optim, config.num_epochs)
    np.testing.assert_allclose(lr, np.repeat(torch_lr, steps_per_epoch), rtol=2e-6, atol=0)
    np.testing.assert_allclose(mom, np.repeat(torch_mom, steps_per_epoch), rtol=2e-7, atol=0)
    # The shape the reference describes: lr/25 -> 0.2 at epoch 9 -> lr/25/1e4; 0.95 -> 0.85 -> 0.95.
    assert lr[0] == pytest.approx(0.2 / 25) and lr[9 * 98] == pytest.approx(0.2)
    assert lr[-1] == pytest.approx(torch_lr[-1]) and torch_lr[-1] == pytest.approx(0.2 / 25 / 1e4)
    assert mom[0] == pytest.approx(0.95) and mom[9 * 98] == pytest.approx(0.85)
    assert np.all(lr[:98] == lr[0])  # constant within an epoch


def test_optax_trajectory_equals_torch_sgd_with_cycling_momentum():
    """Nesterov SGD + weight decay + OneCycleLR (lr and momentum) stepped per epoch, on a toy
    least-squares problem: torch's parameters after every step equal optax's."""
    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_ddpm.py")
    oc = config.optim
    oc.warmup_fraction = 0.25  # a warm-up of a few epochs, so the momentum cycle is visible
    oc.weight_decay_batchnorm = True
    num_epochs, steps_per_epoch = 8, 5
    total = num_epochs * steps_per_epoch
    lr_fn = optim.make_schedule(oc, steps_per_epoch, total)
    mom_fn = optim.make_momentum_schedule(oc, steps_per_epoch, total)
    tx = optim.make_optimizer(oc, lr_fn, mom_fn)

    rng = np.random.default_rng(0)
    a = (0.5 * rng.normal(size=(total, 6, 4))).astype(np.float32)  # a contraction at lr 0.2
    b = rng.normal(size=(total, 6)).astype(np.float32)
    w0 = rng.normal(size=(4,)).astype(np.float32)

    def loss(w, a_i, b_i):
        return 0.5 * jnp.sum(jnp.square(a_i @ w["w"] - b_i))

    @jax.jit
    def step(w, opt_state, a_i, b_i):
        updates, opt_state = tx.update(jax.grad(loss)(w, a_i, b_i), opt_state, w)
        return optax.apply_updates(w, updates), opt_state

    w = {"w": jnp.asarray(w0)}
    opt_state = tx.init(w)
    ours = []
    for i in range(total):
        w, opt_state = step(w, opt_state, a[i], b[i])
        ours.append(np.asarray(w["w"]))

    tw = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.SGD(
        [tw], lr=oc.learning_rate, momentum=0.9, nesterov=True, weight_decay=oc.weight_decay
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=oc.learning_rate, pct_start=oc.warmup_fraction, total_steps=num_epochs
    )
    theirs, moms = [], set()
    for e in range(num_epochs):
        for j in range(steps_per_epoch):
            i = e * steps_per_epoch + j
            opt.zero_grad()
            loss_t = 0.5 * ((torch.from_numpy(a[i]) @ tw - torch.from_numpy(b[i])) ** 2).sum()
            loss_t.backward()
            opt.step()
            theirs.append(tw.detach().numpy().copy())
        moms.add(round(opt.param_groups[0]["momentum"], 6))
        sched.step()
    assert len(moms) >= 5  # the momentum really changed from epoch to epoch
    np.testing.assert_allclose(np.stack(ours), np.stack(theirs), rtol=1e-5, atol=1e-6)


def test_ddpm_epoch_counts_the_full_50000_images():
    """The reference's epoch is ceil(50000 / batch) iterations although 1024 images are held out:
    48976 training images at batch 512 give 98 steps, not ceil(48976 / 512) = 96."""
    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_ddpm.py")
    n = 50000 - config.dataset.num_validation
    images = np.zeros((n, 1, 1, 1), np.uint8)
    train = Split(images, np.zeros((n,), np.int32))
    ds = Dataset("fake", 10, (1, 1, 1), (0.5,), (0.5,), train, train, train, generated=train)
    kw = dict(process_index=0, process_count=1)
    batcher = TrainBatcher(
        ds,
        config.batch_size,
        0,
        config.dataset.real_fraction,
        **kw,
        epoch_size=config.dataset.epoch_size,
    )
    assert batcher.steps_per_epoch == math.ceil(50000 / 512) == 98
    assert TrainBatcher(ds, 512, 0, 0.3, **kw).steps_per_epoch == 96  # option: the split's size
    with pytest.raises(ValueError, match="config.dataset.epoch_size"):
        TrainBatcher(ds, 512, 0, 0.3, **kw, epoch_size=-1)
