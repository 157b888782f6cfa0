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
from score_jax.models.random_weights import random_variables  # noqa: E402

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


# ------------------------------------------------------------ attacks vs PyTorch transcriptions


def _models(name: str, kw: dict, shape: tuple[int, ...], seed: int = 1):
    """A Flax model with random variables and the same weights in the exported torch model."""
    from score_jax import models
    from score_jax.torch_bridge.convert import export_state_dict
    from score_jax.torch_bridge.models import build_torch_model

    flax_model = models.get_model(name, 10, conv_impl="xla", **kw)
    shapes = jax.eval_shape(
        lambda: flax_model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
    )
    variables = random_variables(shapes, seed)
    torch_model = build_torch_model(name, 10, **kw)
    torch_model.load_state_dict(export_state_dict(name, variables), strict=True)
    return flax_model, variables, torch_model


def _state(variables):
    from score_jax import train

    return train.TrainState.create(
        apply_fn=None,
        params=variables["params"],
        tx=optax.sgd(0.1),
        batch_stats=variables["batch_stats"],
        ema_params=variables["params"],
    )


def _nchw(a) -> "torch.Tensor":
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous()


def _nhwc(t: "torch.Tensor") -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def _torch_trades_lse_attack(model, x, delta0, eps, step_size, steps, attack):
    """gowal21uncovering/utils/trades.py `trades_loss_LSE`'s attack, transcribed (CPU)."""
    model.train()
    for m in model.modules():  # track_bn_stats(model, False)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
    p_natural = torch.nn.functional.softmax(model(x), dim=1).detach()
    if attack == "linf-pgd":
        x_adv = torch.clamp(x.detach() + delta0, 0.0, 1.0)
        for _ in range(steps):
            x_adv.requires_grad_()
            output_adv = torch.nn.functional.softmax(model(x_adv), dim=1)
            loss_lse = torch.sum((output_adv - p_natural) ** 2)
            grad = torch.autograd.grad(loss_lse, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
    else:
        batch_size = len(x)
        delta = delta0.clone().requires_grad_(True)
        optimizer_delta = torch.optim.SGD([delta], lr=eps / steps * 2)
        for _ in range(steps):
            adv = x + delta
            optimizer_delta.zero_grad()
            output_adv = torch.nn.functional.softmax(model(adv), dim=1)
            loss = (-1) * torch.sum((output_adv - p_natural) ** 2)
            loss.backward()
            grad_norms = delta.grad.view(batch_size, -1).norm(p=2, dim=1)
            delta.grad.div_(grad_norms.view(-1, 1, 1, 1))
            assert not (grad_norms == 0).any()  # the random branch is not transcribed
            optimizer_delta.step()
            delta.data.add_(x)
            delta.data.clamp_(0, 1).sub_(x)
            delta.data.renorm_(p=2, dim=0, maxnorm=eps)
        x_adv = x + delta.detach()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = True
    return torch.clamp(x_adv, 0.0, 1.0)


@pytest.mark.parametrize("variant", ["", "l2"])
def test_ddpm_attack_equals_reference_trades_lse(variant):
    from score_jax import attacks, train

    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_ddpm.py", variant)
    ac = config.attack
    kw = dict(depth=10, width=1)  # a tiny WRN (SiLU) keeps both frameworks quick on CPU
    flax_model, variables, torch_model = _models("wrn-16-2", kw, (8, 8, 3))
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (8, 8, 8, 3)).astype(np.float32)
    x[:2, :2] = 0.0  # pixels on the box's faces, where the clamping order matters
    x[2:4, -2:] = 1.0
    labels = jnp.arange(8) % 10
    keys = jax.random.split(jax.random.key(5), 8)

    @jax.jit
    def ours(state, x, keys):
        return train.adversarial_examples(flax_model, config, state, x, labels, keys)

    state = _state(variables)
    x_adv, stats = ours(state, jnp.asarray(x), keys)
    delta0 = attacks.initial_delta(keys, jnp.asarray(x), eps=ac.eps, norm=ac.norm, init=ac.init)
    if variant == "l2":
        # Normalised (not sign) gradient steps carry float32 rounding along, so compare with
        # the float64 transcription: on the 2-core Xeon JAX's float32 result lay 1.0e-5 to
        # 7.7e-5 from it over 8 seeds (4.5e-5 for this one), a rounding walk that another CPU's
        # code generation (XLA compiles for the host's vector units) can lengthen; the other L2
        # order, ball_then_box, lands 4.7e-2 to 6.8e-2 away. 1e-3 keeps both margins (the
        # earlier 1e-4 was within 1.3x of seed 5's distance).
        torch_model, to_torch = torch_model.double(), lambda a: _nchw(a).double()
        attack, atol = "l2-pgd", 1e-3
    else:
        to_torch, attack, atol = _nchw, "linf-pgd", 2e-6
    expected = _torch_trades_lse_attack(
        torch_model, to_torch(x), to_torch(delta0), ac.eps, ac.step_size, ac.num_steps, attack
    )
    expected = _nhwc(expected)
    x_adv = np.asarray(x_adv)
    np.testing.assert_allclose(x_adv, expected, atol=atol, rtol=0)
    # Not a degenerate comparison: the attack moved, and up to the ball's edge.
    if variant == "l2":
        assert ac.step_size == pytest.approx(2 * (128 / 255) / 10)
        norms = np.sqrt(((x_adv - x) ** 2).reshape(8, -1).sum(-1))
        assert norms.max() > 0.9 * ac.eps and norms.max() <= ac.eps + 1e-5
    else:
        assert np.abs(x_adv - x).max() == pytest.approx(8 / 255, abs=1e-6)
        assert np.mean(np.abs(x_adv - x) > 7 / 255) > 0.5
    # batch_frozen: the running averages are untouched.
    chex_equal = jax.tree.map(np.array_equal, jax.device_get(stats), variables["batch_stats"])
    assert all(jax.tree.leaves(chex_equal))


def _biased_running_var(model):
    """Makes torch's BatchNorm update running_var with the biased batch variance, as Flax does
    (torch uses the unbiased one: a factor n/(n-1), n = batch x height x width, that the README
    lists); nothing else about the updates changes."""

    def pre(module, inputs):
        module._old_var = module.running_var.clone()
        module._batch_var = inputs[0].detach().var(dim=(0, 2, 3), unbiased=False)

    def post(module, inputs, output):
        if module.training and module.track_running_stats:
            m = module.momentum
            module.running_var.data.copy_((1 - m) * module._old_var + m * module._batch_var)

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)


def _torch_pgd_at_step_stats(model, x, y, delta0, eps, alpha, steps, attack_updates: bool):
    """without_DDPM/train_cifar.py, one PGD-AT (SE) iteration: `attack_pgd_divergence` with the
    model in train mode (every pass updates the running averages), then the loss's pass on
    clamp(x + delta). Returns the BatchNorm buffers afterwards."""
    f = torch.nn.functional
    model.train()
    onehot = f.one_hot(y, num_classes=10).float()
    delta = torch.clamp(delta0.clone(), -x, 1 - x)
    delta.requires_grad = True
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = attack_updates  # False: the alternative, for contrast
    for _ in range(steps):
        output = f.softmax(model(x + delta), dim=1)
        loss = torch.sum((output - onehot) ** 2, dim=-1)
        loss.mean().backward()
        grad = delta.grad.detach()
        delta.data = torch.clamp(delta + alpha * torch.sign(grad), min=-eps, max=eps)
        delta.data = torch.clamp(delta, -x, 1 - x)
        delta.grad.zero_()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = True
    model(torch.clamp(x + delta.detach(), 0, 1))  # the loss's pass (train mode)
    return {k: v.numpy().copy() for k, v in model.state_dict().items() if "running" in k}


def test_basic_pgd_at_running_stats_equal_reference_after_one_step():
    import copy

    from score_jax import attacks, train
    from score_jax.torch_bridge.convert import export_state_dict

    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_basic.py", "pgd_at-se")
    assert config.attack.batchnorm == "batch_update"
    config.augment.crop_padding, config.augment.flip = 0, False
    config.model.name = "small-cnn"  # BN momentum 0.1 as PreAct-ResNet-18's, and quick
    kw = dict(width=8, hidden=16)
    flax_model, variables, torch_model = _models("small-cnn", kw, (8, 8, 3), seed=2)
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 1.0, (8, 8, 8, 3)).astype(np.float32)
    y = (np.arange(8) % 10).astype(np.int32)
    batch = {"image": (x * 255).round().astype(np.uint8), "label": y, "pos": np.arange(8)}
    x = batch["image"].astype(np.float32) / 255.0
    mesh = train.make_mesh(jax.devices()[:1])
    step_fn = train.compile_train_step(flax_model, config, optax.constant_schedule(0.05), 0, mesh)
    key = train.base_key(0)
    new_state, _ = step_fn(train.replicate(_state(variables), mesh), batch, key)

    # The same start as the train step's attack: its per-example keys (train_step's fold 2).
    keys = train.example_keys(key, jnp.asarray(0), jnp.arange(8))
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 2)
    ac = config.attack
    delta0 = attacks.initial_delta(keys, jnp.asarray(x), eps=ac.eps, norm="linf", init="uniform")
    args = (_nchw(x), torch.from_numpy(y).long(), _nchw(delta0), ac.eps, ac.step_size, 10)
    reference_model = copy.deepcopy(torch_model)
    _biased_running_var(reference_model)
    expected = _torch_pgd_at_step_stats(reference_model, *args, attack_updates=True)
    ours = export_state_dict(
        "small-cnn",
        {"params": new_state.params, "batch_stats": jax.device_get(new_state.batch_stats)},
    )
    for k, v in expected.items():
        np.testing.assert_allclose(ours[k].numpy(), v, rtol=1e-5, atol=1e-6, err_msg=k)
    # Contrast: had only the loss's pass updated them, the statistics would be far off.
    contrast_model = copy.deepcopy(torch_model)
    _biased_running_var(contrast_model)
    contrast = _torch_pgd_at_step_stats(contrast_model, *args, attack_updates=False)
    k = "bn_0.running_mean" if "bn_0.running_mean" in contrast else sorted(contrast)[0]
    assert np.abs(contrast[k] - expected[k]).max() > 1e-2


@pytest.mark.parametrize(
    "path,variant,expected",
    [
        ("cifar10_ddpm.py", "", dict(init="uniform", batchnorm="batch_frozen", rotation=0.0)),
        ("cifar10_ddpm.py", "l2", dict(init="normal", l2_rule="box_then_ball", rotation=0.0)),
        ("cifar100_ddpm.py", "", dict(init="uniform", batchnorm="batch_frozen", rotation=15.0)),
        ("cifar10_basic.py", "trades-se", dict(init="normal", batchnorm="eval", torch_init=True)),
        ("cifar10_basic.py", "pgd_at-kl", dict(init="uniform", batchnorm="batch_update")),
    ],
)
def test_configs_carry_the_reference_recipe(path, variant, expected):
    """DESIGN.md section 8, field by field."""
    c = config_lib.load_config_file(f"{CONFIGS}/{path}", variant)
    config_lib.validate(c)
    assert c.attack.init == expected["init"]
    assert c.attack.batchnorm == expected.get("batchnorm", "batch_frozen")
    assert c.attack.l2_rule == expected.get("l2_rule", "ball_then_box")
    assert c.augment.rotation_degrees == expected.get("rotation", 0.0)
    assert (c.model.init_scheme == "torch") == expected.get(
        "torch_init", path == "cifar10_basic.py"
    )
    if "ddpm" in path:
        assert (c.optim.schedule, c.optim.schedule_unit, c.optim.cycle_momentum) == (
            "one_cycle",
            "epoch",
            True,
        )
        assert c.dataset.epoch_size == 50000


# ------------------------------------------- the last reference points (DESIGN.md section 8)


def test_basic_epoch_and_lr_drops_equal_train_cifar():
    """without_DDPM/train_cifar.py: 391 iterations per epoch over all 50000 images, 110 epochs,
    iteration i of epoch e at lr_schedule(e + (i + 1) / 391) (lr_max until 100, /10 until 105,
    then /100), although 1024 images are held out here."""
    from score_jax import data, setup

    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_basic.py", "trades-se")
    info = data.dataset_info(config.dataset)
    assert info.num_train == 50000 - 1024
    parts = setup.build_model_and_optimizer(config, info)
    assert (parts.steps_per_epoch, parts.total_steps) == (391, 43010)

    lr_max = config.optim.learning_rate

    def lr_schedule(t: float) -> float:  # train_cifar.py's, transcribed
        if t < 100:
            return lr_max
        elif t < 105:
            return lr_max / 10.0
        return lr_max / 100.0

    expected = [lr_schedule(e + (i + 1) / 391) for e in range(110) for i in range(391)]
    ours = np.asarray(jax.jit(jax.vmap(parts.schedule))(jnp.arange(43010)))
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert expected[39098] == lr_max and expected[39099] == lr_max / 10  # the drops, as a check
    assert expected[41053] == lr_max / 10 and expected[41054] == lr_max / 100


def test_wrn_logits_init_equals_torch_linear_with_zero_bias():
    """core/models/wideresnetwithswish.py: `logits` is an nn.Linear with its default weight
    (kaiming-uniform a=sqrt(5): U(+-1/sqrt(fan_in)), std 1/sqrt(3 fan_in)) and a zeroed bias;
    Flax's default Dense (LeCun normal, std 1/sqrt(fan_in)) starts 1.7x wider."""
    from score_jax import models

    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_ddpm.py")
    model = models.get_model(
        "wrn-16-2", 10, depth=10, width=1, init_scheme=config.model.init_scheme, conv_impl="xla"
    )
    init = lambda k: model.init(k, jnp.zeros((1, 8, 8, 3)), train=False)["params"]["logits"]  # noqa: E731
    logits = jax.jit(jax.vmap(init))(jax.random.split(jax.random.key(0, impl="rbg"), 64))
    ours, bias = np.asarray(logits["kernel"]), np.asarray(logits["bias"])
    fan_in = ours.shape[1]
    assert fan_in == 64
    torch.manual_seed(0)
    theirs = np.concatenate(
        [torch.nn.Linear(fan_in, 10).weight.detach().numpy().ravel() for _ in range(64)]
    )
    bound = 1.0 / np.sqrt(fan_in)
    assert not bias.any()
    assert np.abs(ours).max() <= bound * (1 + 1e-6) and np.abs(ours).max() > 0.99 * bound
    for moment in (2, 4):  # uniform's: bound^2 / 3, bound^4 / 5 (torch's draws agree)
        want = bound**moment / (moment + 1)
        np.testing.assert_allclose(np.mean(theirs**moment), want, rtol=0.06)
        np.testing.assert_allclose(np.mean(ours**moment), want, rtol=0.06)


def _bn_momentum(model, momentum: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum


def _ddpm_step_stats(torch_model, x, momentum):
    """trades_loss_LSE's loss passes in train mode, f(x_natural) then f(x_adv) (here x_adv = x:
    eps 0), with the BatchNorm momentum watrain.py sets for this step."""
    _bn_momentum(torch_model, momentum)
    torch_model.train()
    with torch.no_grad():
        torch_model(x)
        torch_model(x)
    return {k: v.numpy().copy() for k, v in torch_model.state_dict().items() if "running" in k}


def test_ddpm_first_step_running_stats_equal_watrain():
    """watrain.py: BatchNorm momentum 1 at global step 0 (the running statistics become the
    first batch's), then 0.01. The TRADES attack here has eps 0, so x_adv = x on both sides."""
    import copy

    from score_jax import train
    from score_jax.torch_bridge.convert import export_state_dict

    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_ddpm.py")
    assert config.bn_first_batch_stats
    config.attack.eps = 0.0
    config.augment.crop_padding, config.augment.flip = 0, False
    kw = dict(depth=10, width=1)
    flax_model, variables, torch_model = _models("wrn-16-2", kw, (8, 8, 3), seed=3)
    rng = np.random.default_rng(4)
    batches = [
        {
            "image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
            "label": (np.arange(8) % 10).astype(np.int32),
            "pos": np.arange(8, dtype=np.int32),
        }
        for _ in range(2)
    ]
    mesh = train.make_mesh(jax.devices()[:1])
    step_fn = train.compile_train_step(flax_model, config, optax.constant_schedule(0.05), 0, mesh)
    key = train.base_key(0)
    state = train.replicate(_state(variables), mesh)
    reference = copy.deepcopy(torch_model)
    _biased_running_var(reference)  # Flax's biased variance (a README difference)
    # Not degenerate: the usual first update (momentum 0.01) ends far from momentum 1's.
    usual = copy.deepcopy(torch_model)
    _biased_running_var(usual)
    usual = _ddpm_step_stats(usual, _nchw(batches[0]["image"].astype(np.float32) / 255.0), 0.01)
    for step, (batch, momentum) in enumerate(zip(batches, (1.0, 0.01), strict=True)):
        if step == 1:  # the reference continues from our updated weights and statistics
            reference.load_state_dict(
                export_state_dict(
                    "wrn-16-2",
                    {"params": state.params, "batch_stats": jax.device_get(state.batch_stats)},
                )
            )
        x = _nchw(batch["image"].astype(np.float32) / 255.0)
        expected = _ddpm_step_stats(reference, x, momentum)
        state, metrics = step_fn(state, batch, key)
        assert float(metrics["finite"]) == 1.0
        ours = export_state_dict(
            "wrn-16-2",
            {"params": state.params, "batch_stats": jax.device_get(state.batch_stats)},
        )
        for k, v in expected.items():
            np.testing.assert_allclose(ours[k].numpy(), v, rtol=1e-5, atol=1e-6, err_msg=k)
        if step == 0:
            assert max(np.abs(usual[k] - expected[k]).max() for k in expected) > 1e-2


def _reference_semisup_counts(n: int, batch: int, unsup_fraction: float, batches: int, epochs):
    """core/data/semisup.py's SemiSupervisedSampler, transcribed: per epoch (one __iter__) a
    fresh torch.randperm of the labelled indices, cut into slices of batch - int(batch *
    unsup_fraction); returns the labelled indices of each epoch."""
    sup_inds = list(range(n))
    sup_batch = batch - int(batch * unsup_fraction)
    out = []
    for _ in range(epochs):
        seen, counter = [], 0
        while counter < batches:
            shuffled = [sup_inds[i] for i in torch.randperm(len(sup_inds))]
            for k in range(0, len(sup_inds), sup_batch):
                if counter == batches:
                    break
                seen.extend(shuffled[k : k + sup_batch])
                counter += 1
        out.append(np.asarray(seen))
    return out


def test_ddpm_real_images_per_epoch_equal_semisup_sampler():
    """Each epoch a fresh permutation of the real images, of which the first steps x real per
    batch are used: per epoch no image twice, epochs independent (their overlap and the spread
    of the counts per image as the reference sampler's); the old stream saw every image once
    before any twice."""
    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_ddpm.py")
    assert config.dataset.real_sampling == "per_epoch"
    n, batch, epochs = 200, 10, 30
    images = np.zeros((n, 1, 1, 1), np.uint8)
    train_split = Split(images, np.arange(n, dtype=np.int32))
    generated = Split(np.zeros((50, 1, 1, 1), np.uint8), np.full((50,), -1, np.int32))
    ds = Dataset("fake", 10, (1, 1, 1), (0.5,), (0.5,), *(train_split,) * 3, generated=generated)
    kw = dict(process_index=0, process_count=1, epoch_size=200)  # 20 steps per epoch
    ours, stream = (
        TrainBatcher(ds, batch, 0, 0.3, **kw, real_sampling=sampling)
        for sampling in ("per_epoch", "stream")
    )
    assert ours.steps_per_epoch == 20 and ours.num_real == 3

    def epochs_of(batcher):
        out = []
        for e in range(epochs):
            labels = [batcher.batch(s)["label"] for s in range(e * 20, (e + 1) * 20)]
            labels = np.concatenate(labels)
            out.append(labels[labels >= 0])
        return out

    torch.manual_seed(0)
    reference = _reference_semisup_counts(n, batch, 0.7, 20, epochs)

    def stats(per_epoch, distinct=True):
        assert all(len(e) == 60 for e in per_epoch)
        assert not distinct or all(len(set(e.tolist())) == 60 for e in per_epoch)
        counts = np.bincount(np.concatenate(per_epoch), minlength=n)
        pairs = zip(per_epoch[:-1], per_epoch[1:], strict=True)
        return counts.var(), np.mean([len(np.intersect1d(a, b)) for a, b in pairs])

    ref_var, ref_overlap = stats(reference)
    our_var, our_overlap = stats(epochs_of(ours))
    # Binomial(30, 0.3) counts: variance 6.3; consecutive epochs share 60 * 60 / 200 = 18.
    assert ref_var == pytest.approx(6.3, rel=0.3) and ref_overlap == pytest.approx(18, rel=0.2)
    assert our_var == pytest.approx(ref_var, rel=0.3)
    assert our_overlap == pytest.approx(ref_overlap, rel=0.2)
    old_var, old_overlap = stats(epochs_of(stream), distinct=False)
    assert old_var < 1.0 and old_overlap < 6  # the old stream: 9 passes, each image 9 times


def test_basic_trades_running_stats_follow_train_cifar_pass_order():
    """train_cifar.py's TRADES iteration computes f(x_adv) before f(x) in train mode, so the
    running averages take the adversarial batch first (the attack runs in eval mode)."""
    import copy

    from score_jax import train
    from score_jax.torch_bridge.convert import export_state_dict

    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_basic.py", "trades-se")
    assert config.loss.trades_pass_order == "adv_first" and config.attack.batchnorm == "eval"
    config.augment.crop_padding, config.augment.flip = 0, False
    kw = dict(width=8, hidden=16)
    flax_model, variables, torch_model = _models("small-cnn", kw, (8, 8, 3), seed=2)
    rng = np.random.default_rng(1)
    batch = {
        "image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
        "label": (np.arange(8) % 10).astype(np.int32),
        "pos": np.arange(8, dtype=np.int32),
    }
    x = jnp.asarray(batch["image"].astype(np.float32) / 255.0)
    mesh = train.make_mesh(jax.devices()[:1])
    step_fn = train.compile_train_step(flax_model, config, optax.constant_schedule(0.05), 0, mesh)
    key = train.base_key(0)
    state = _state(variables)
    new_state, _ = step_fn(train.replicate(state, mesh), batch, key)
    # The train step's attack, outside it: its per-example keys (train_step's fold 2).
    keys = train.example_keys(key, jnp.asarray(0), jnp.arange(8))
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 2)
    x_adv, _ = jax.jit(
        lambda s, x, k: train.adversarial_examples(
            flax_model, config, s, x, jnp.asarray(batch["label"]), k
        )
    )(state, x, keys)
    assert float(jnp.abs(x_adv - x).max()) > 7 / 255

    def torch_stats(first, second):
        model = copy.deepcopy(torch_model)
        _biased_running_var(model)
        model.train()
        with torch.no_grad():
            model(_nchw(first))
            model(_nchw(second))
        return {k: v.numpy() for k, v in model.state_dict().items() if "running" in k}

    expected = torch_stats(x_adv, x)
    ours = export_state_dict(
        "small-cnn",
        {"params": new_state.params, "batch_stats": jax.device_get(new_state.batch_stats)},
    )
    for k, v in expected.items():
        np.testing.assert_allclose(ours[k].numpy(), v, rtol=1e-5, atol=1e-6, err_msg=k)
    contrast = torch_stats(x, x_adv)  # the clean pass first
    assert max(np.abs(contrast[k] - expected[k]).max() for k in expected) > 1e-4


def test_basic_l2_start_is_a_normal_direction_at_a_uniform_radius():
    """train_cifar.py's `attack_pgd` / `attack_pgd_divergence` L2 start: delta = n r eps/||n||,
    n ~ N(0, 1)^d, r ~ U(0, 1) (then clamped to the box), so the radius is uniform in
    [0, eps]; a uniform draw in the ball has radius eps U^(1/d), nearly always close to eps."""
    from score_jax import attacks

    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_basic.py", "pgd_at-se,l2")
    assert config.attack.init == "uniform_radius"
    assert config.eval.pgd.init == config.eval.pgd_se.init == "uniform_radius"
    eps, n = config.attack.eps, 4000
    x = jnp.full((n, 8, 8, 3), 0.5)  # in the box's interior: no clamping
    ours = attacks.initial_delta(jax.random.key(0), x, eps=eps, norm="l2", init="uniform_radius")
    ours = np.sqrt(np.sum(np.asarray(ours) ** 2, axis=(1, 2, 3))) / eps
    torch.manual_seed(0)
    delta = torch.zeros((n, 3, 8, 8)).normal_()  # the reference's lines
    norms = delta.view(n, -1).norm(p=2, dim=1).view(n, 1, 1, 1)
    delta *= torch.zeros_like(norms).uniform_(0, 1) / norms * eps
    theirs = delta.view(n, -1).norm(p=2, dim=1).numpy() / eps
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert np.quantile(theirs, q) == pytest.approx(q, abs=0.03)
        assert np.quantile(ours, q) == pytest.approx(q, abs=0.03)
    old = attacks.initial_delta(jax.random.key(0), x, eps=eps, norm="l2", init="uniform")
    assert np.quantile(np.sqrt(np.sum(np.asarray(old) ** 2, axis=(1, 2, 3))) / eps, 0.1) > 0.9


def _torch_advertorch_l2_pgd(model, x, y, delta0, eps, eps_iter, steps):
    """core/attacks/pgd.py `perturb_iterative` (ord 2) with core/attacks/utils.py's CWLoss,
    transcribed (CPU), from the start `delta0` (its rand_init_delta, here drawn by JAX)."""
    model.eval()
    delta = delta0.clone().requires_grad_(True)
    onehot = torch.nn.functional.one_hot(y, 10).to(x.dtype)
    for _ in range(steps):
        output = model(x + delta)
        real = (onehot * output).sum(1)
        other = ((1.0 - onehot) * output - onehot * 10000.0).max(1)[0]
        loss = torch.sum(-torch.clamp(real - other, min=0.0))
        loss.backward()
        grad = delta.grad.data
        norm = grad.abs().pow(2).view(len(x), -1).sum(dim=1).pow(0.5)
        grad = grad / torch.max(norm, torch.ones_like(norm) * 1e-6).view(-1, 1, 1, 1)
        delta.data = delta.data + eps_iter * grad
        delta.data = torch.clamp(x.data + delta.data, 0.0, 1.0) - x.data
        norm = delta.data.abs().pow(2).view(len(x), -1).sum(dim=1).pow(0.5)
        factor = torch.min(eps / norm, torch.ones_like(norm))
        delta.data = delta.data * factor.view(-1, 1, 1, 1)
        delta.grad.data.zero_()
    return torch.clamp(x + delta, 0.0, 1.0)


def test_ddpm_l2_validation_attack_equals_core_attacks_pgd():
    """watrain.py's eval attack for L2: core/attacks/pgd.py's L2PGDAttack on CWLoss, 40 steps of
    --attack-step (default 2/255), from rand_init_delta's start (a uniform point of the image
    box, scaled to the ball), each step normalised, clipped to the box, then to the ball."""
    from score_jax import attacks
    from score_jax.evaluators import pgd

    config = config_lib.load_config_file(f"{CONFIGS}/cifar10_ddpm.py", "l2")
    spec = config.eval.pgd_cw
    assert (spec.num_steps, spec.step_size, spec.objective) == (40, 2 / 255, "cw_clamped")
    assert (spec.eps, spec.norm) == (128 / 255, "l2")
    flax_model, variables, torch_model = _models("wrn-16-2", dict(depth=10, width=1), (8, 8, 3))
    rng = np.random.default_rng(0)
    n = 16
    x = rng.uniform(0.0, 1.0, (n, 8, 8, 3)).astype(np.float32)
    labels = jnp.arange(n) % 10
    keys = jax.random.split(jax.random.key(7), n)

    def logits_fn(inputs):
        return flax_model.apply(variables, inputs, train=False)

    points = jax.jit(lambda x, k: pgd.points(spec, logits_fn, x, labels, k))
    x_adv = np.asarray(points(jnp.asarray(x), keys))
    delta0 = np.asarray(
        attacks.initial_delta(keys, jnp.asarray(x), eps=spec.eps, norm="l2", init=spec.init)
    )
    # The start: on the sphere (||u - x|| > eps here), in the box, towards the box's points.
    norms0 = np.sqrt((delta0**2).reshape(n, -1).sum(-1))
    np.testing.assert_allclose(norms0, spec.eps, rtol=1e-5)
    assert (x + delta0).min() >= 0.0 and (x + delta0).max() <= 1.0
    cos = np.sum(delta0 * (0.5 - x), axis=(1, 2, 3)) / (
        norms0 * np.sqrt(((0.5 - x) ** 2).reshape(n, -1).sum(-1))
    )
    assert cos.mean() > 0.5  # an isotropic start would give ~0
    torch_model = torch_model.double()
    expected = _torch_advertorch_l2_pgd(
        torch_model,
        _nchw(x).double(),
        torch.from_numpy(np.asarray(labels)).long(),
        _nchw(delta0).double(),
        spec.eps,
        spec.step_size,
        spec.num_steps,
    )
    np.testing.assert_allclose(x_adv, _nhwc(expected), atol=2e-4, rtol=0)
    moved = np.sqrt(((x_adv - x - delta0) ** 2).reshape(n, -1).sum(-1))
    assert moved.max() > 0.05  # the steps did something (not the start alone)


def test_old_ddpm_checkpoints_are_refused_and_old_digits_ones_resume():
    """A checkpoint's fingerprint from before the new reference defaults: refused for the DDPM
    recipe (its real-image sampling, first-step BatchNorm and logits init changed), resumed for
    digits (whose recipe did not change)."""
    from score_jax import checkpoint

    def old(config):
        saved = checkpoint.fingerprint(config)
        for field in checkpoint.ADDED_FIELDS:
            section, _, name = field.rpartition(".")
            (saved[section] if section else saved).pop(name)
        return saved

    ddpm = config_lib.load_config_file(f"{CONFIGS}/cifar10_ddpm.py")
    saved = old(ddpm)
    saved["model"]["init_scheme"] = "default"
    assert checkpoint.fingerprint_mismatch(saved, checkpoint.fingerprint(ddpm)) == [
        "bn_first_batch_stats",
        "dataset.real_sampling",
        "model.init_scheme",
    ]
    digits = config_lib.load_config_file(f"{CONFIGS}/digits.py")
    assert checkpoint.fingerprint_mismatch(old(digits), checkpoint.fingerprint(digits)) == []
    basic = config_lib.load_config_file(f"{CONFIGS}/cifar10_basic.py", "trades-se")
    saved = old(basic)
    saved["dataset"]["epoch_size"], saved["optim"]["schedule_unit"] = 0, "step"
    assert checkpoint.fingerprint_mismatch(saved, checkpoint.fingerprint(basic)) == [
        "dataset.epoch_size",
        "loss.trades_pass_order",
        "optim.schedule_unit",
    ]
