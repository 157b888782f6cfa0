"""The train state and the pure adversarial train step (TRADES or PGD-AT with any divergence).

`train_step(state, batch, key)` is per-device code in the style of `jax.pmap`: gradients, metrics
and (optionally) BatchNorm statistics are averaged with `lax.pmean` over the mesh axis "batch".
`compile_train_step` maps it over a 1-D device mesh with `jax.shard_map` under `jax.jit`, donating
the state. The same code runs on one CPU, one GPU, or every core of a TPU pod.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from score_jax import attacks, data, losses, optim
from score_jax.attacks import ATTACK_BATCHNORM
from score_jax.losses import LOSS_METHODS, TRADES_PASS_ORDERS
from score_jax.parallel import AXIS, base_key, data_parallel, make_mesh, replicate, shard_batch

__all__ = [  # the parallel helpers, re-exported for the callers of train.make_mesh & co.
    "ATTACK_BATCHNORM",
    "AXIS",
    "LOSS_METHODS",
    "METHODS",
    "TRADES_PASS_ORDERS",
    "TrainState",
    "adversarial_examples",
    "base_key",
    "compile_train_step",
    "create_train_state",
    "example_keys",
    "loss_method",
    "make_loss_fn",
    "make_mesh",
    "replicate",
    "shard_batch",
    "train_step",
    "tree_finite",
    "update",
]


class TrainState(train_state.TrainState):
    """params / opt_state / step (from flax), BatchNorm running statistics and the EMA of params.

    The EMA model is evaluated with the live model's BatchNorm statistics (as the reference does).
    """

    batch_stats: Any
    ema_params: Any


def example_keys(key: jax.Array, step: jax.Array, pos: jax.Array) -> jax.Array:
    """Per-example keys fold_in(fold_in(key, step), pos): independent of the device layout."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(key), step)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, pos)


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, image_shape: tuple[int, ...], seed: int
) -> TrainState:
    """Initialises parameters (from `seed`), BatchNorm statistics, optimizer state and EMA."""

    @jax.jit
    def init(key):
        variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        return TrainState.create(
            apply_fn=model.apply,
            params=params,
            tx=tx,
            batch_stats=variables.get("batch_stats", {}),
            ema_params=params,
        )

    # rbg keys: the initialiser compiles in a fraction of threefry's time on CPU.
    return init(jax.random.key(seed, impl="rbg"))


def apply_train(model: nn.Module, params, batch_stats, inputs) -> tuple[jax.Array, Any]:
    """Logits with batch statistics, and the updated running averages."""
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, inputs, train=True, mutable=["batch_stats"]
    )
    return logits, updates["batch_stats"]


@dataclasses.dataclass(frozen=True)
class LossMethod:
    """A training method (config.loss.method): what its attack maximises and its loss.

    attack_objective(logits_fn, x, labels, stats, lc) -> (objective(x', stats) -> (values (B,),
      stats), stats): the per-example objective of the attack, after any clean pass it needs;
    loss(apply, x, x_adv, labels, stats, lc) -> (loss, stats, aux metrics), apply(inputs,
      stats) -> (logits, stats) being the model in train mode at the parameters differentiated.
    """

    attack_objective: Callable
    loss: Callable


def _trades_attack_objective(logits_fn, x, labels, stats, lc):
    """D(p || softmax f(x')), p = softmax f(x) held fixed (computed in the attack's mode)."""
    del labels
    logits_nat, stats = logits_fn(x, stats)
    p_nat = jax.lax.stop_gradient(jax.nn.softmax(logits_nat.astype(jnp.float32)))

    def objective(inputs, s):
        logits, s = logits_fn(inputs, s)
        return losses.divergence_from_logits(p_nat, logits, lc.divergence), s

    return objective, stats


def _trades_loss(apply, x, x_adv, labels, stats, lc):
    """Mean of D(y~ || p) + beta D(p || p') (clipped if clip_c), the two passes updating the
    running averages in lc.trades_pass_order."""
    order = lc.get("trades_pass_order", "clean_first")
    if order not in TRADES_PASS_ORDERS:
        raise ValueError(f"config.loss.trades_pass_order must be one of {TRADES_PASS_ORDERS}")
    if order == "clean_first":
        logits_nat, stats = apply(x, stats)
        logits_adv, stats = apply(x_adv, stats)
    else:
        logits_adv, stats = apply(x_adv, stats)
        logits_nat, stats = apply(x, stats)
    kw = dict(kind=lc.divergence, label_smoothing=lc.label_smoothing)
    per_example = losses.trades_per_example(
        logits_nat,
        logits_adv,
        labels,
        beta=lc.beta,
        clip_c=lc.get("clip_c"),
        clip_clean=lc.clip_clean,
        **kw,
    )
    natural, robust = losses.trades_terms(logits_nat, logits_adv, labels, **kw)
    aux = {
        "natural": jnp.mean(natural),
        "robust": jnp.mean(robust),
        "clean_accuracy": jnp.mean(losses.accuracy(logits_nat, labels)),
        "adv_accuracy": jnp.mean(losses.accuracy(logits_adv, labels)),
    }
    return jnp.mean(per_example), stats, aux


def _pgd_at_attack_objective(logits_fn, x, labels, stats, lc):
    """D(y~ || softmax f(x'))."""
    del x

    def objective(inputs, s):
        logits, s = logits_fn(inputs, s)
        return losses.pgd_at_per_example(
            logits, labels, kind=lc.divergence, label_smoothing=lc.label_smoothing
        ), s

    return objective, stats


def _pgd_at_loss(apply, x, x_adv, labels, stats, lc):
    """Mean of D(y~ || p') (clipped if clip_c)."""
    del x
    logits_adv, stats = apply(x_adv, stats)
    loss = losses.pgd_at_loss(
        logits_adv,
        labels,
        kind=lc.divergence,
        clip_c=lc.get("clip_c"),
        label_smoothing=lc.label_smoothing,
    )
    return loss, stats, {"adv_accuracy": jnp.mean(losses.accuracy(logits_adv, labels))}


# config.loss.method -> its attack objective and loss (names: losses.LOSS_METHODS).
METHODS: dict[str, LossMethod] = {
    "trades": LossMethod(_trades_attack_objective, _trades_loss),
    "pgd_at": LossMethod(_pgd_at_attack_objective, _pgd_at_loss),
}


def loss_method(name: str) -> LossMethod:
    if name not in METHODS:
        raise ValueError(f"config.loss.method must be one of {LOSS_METHODS}, got {name!r}")
    return METHODS[name]


def adversarial_examples(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    state: TrainState,
    x: jax.Array,
    labels: jax.Array,
    keys: jax.Array,
) -> tuple[jax.Array, Any]:
    """config.attack's PGD on the training objective, with per-example keys; returns x_adv and
    the BatchNorm running averages the loss's passes start from.

    TRADES maximises D(p || softmax f(x')), p = softmax f(x) (computed in the same mode);
    PGD-AT maximises D(y~ || softmax f(x')). config.attack.batchnorm is the model's mode in every
    attack pass (p's included): "batch_frozen": batch statistics, running averages untouched
    (PyTorch train mode with track_running_stats off: the DDPM setting's TRADES); "eval": the
    running averages (model.eval(): the basic setting's TRADES); "batch_update": batch
    statistics, and every pass updates the running averages as PyTorch's train mode does (the
    basic setting's PGD-AT).
    """
    lc, ac = config.loss, config.attack
    mode = ac.batchnorm
    if mode not in ATTACK_BATCHNORM:
        raise ValueError(f"config.attack.batchnorm must be one of {ATTACK_BATCHNORM}, got {mode!r}")

    def logits_fn(inputs: jax.Array, stats: Any) -> tuple[jax.Array, Any]:
        if mode == "eval":
            variables = {"params": state.params, "batch_stats": stats}
            return model.apply(variables, inputs, train=False), stats
        logits, new_stats = apply_train(model, state.params, stats, inputs)
        return logits, (new_stats if mode == "batch_update" else stats)

    objective, stats = loss_method(lc.method).attack_objective(
        logits_fn, x, labels, state.batch_stats, lc
    )
    return attacks.pgd_with_state(
        objective,
        x,
        keys,
        stats,
        eps=ac.eps,
        step_size=ac.step_size,
        num_steps=ac.num_steps,
        norm=ac.norm,
        init=ac.init,
        l2_rule=ac.l2_rule,
    )


def make_loss_fn(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    batch_stats: Any,
    x: jax.Array,
    x_adv: jax.Array,
    labels: jax.Array,
):
    """params -> (loss, (new batch_stats, aux metrics)) of config.loss on this batch.

    TRADES: mean of D(y~ || p) + beta D(p || p'), p = softmax f(x), p' = softmax f(x') (clipped
    if clip_c; D = KL gives cross-entropy for the first term), the clean and the adversarial
    pass updating the running averages in config.loss.trades_pass_order. PGD-AT: mean of
    D(y~ || p') (clipped if clip_c).
    """
    method = loss_method(config.loss.method)

    def loss_fn(params):
        def apply(inputs, stats):
            return apply_train(model, params, stats, inputs)

        loss, stats, aux = method.loss(apply, x, x_adv, labels, batch_stats, config.loss)
        return loss, (stats, aux)

    return loss_fn


def update(
    state: TrainState, grads: Any, batch_stats: Any, ema_decay: float, ema_warmup_steps: int
) -> TrainState:
    """The optimizer step, the new running averages, and the EMA of the new parameters."""
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    ema = optim.ema_update(
        state.ema_params, new_state.params, new_state.step, ema_decay, ema_warmup_steps
    )
    return new_state.replace(ema_params=ema)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    model: nn.Module,
    config: ml_collections.ConfigDict,
    learning_rate_fn: optax.Schedule,
    ema_warmup_steps: int,
    sync_batch_stats: bool,
    momentum_fn: optax.Schedule | None = None,
    divergence_guard: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One step on this device's part of the batch: augment, attack, loss, update, EMA.

    The attack and the loss are `adversarial_examples` and `make_loss_fn`; gradients and metrics
    are averaged over devices. With config.bn_first_batch_stats every BatchNorm pass of step 0
    has momentum 1 (PyTorch terms), so the running statistics become the batch's. The divergence
    guard: unless the loss, the gradient and the
    updated state (params, EMA, optimizer state, batch statistics) are all finite, the state is
    left unchanged and metrics["finite"] = 0 (metrics["finite_<part>"] say which part failed).
    `divergence_guard=False` leaves it out (benchmarks/overheads.py measures its cost; training
    always keeps it).
    """
    keys = example_keys(key, state.step, batch["pos"])
    aug_keys, attack_keys = (
        jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i) for i in (1, 2)
    )
    x = batch["image"].astype(jnp.float32) / 255.0
    x = data.augment(
        x,
        aug_keys,
        crop_padding=config.augment.crop_padding,
        flip=config.augment.flip,
        rotation_degrees=config.augment.rotation_degrees,
    )
    labels = batch["label"]
    if config.get("bn_first_batch_stats", False):
        model = model.clone(bn_momentum_override=jnp.where(state.step == 0, 0.0, model.bn_momentum))
    x_adv, attack_stats = adversarial_examples(model, config, state, x, labels, attack_keys)
    loss_fn = make_loss_fn(model, config, attack_stats, x, x_adv, labels)
    (loss, (batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    if not sync_batch_stats:  # per-device statistics (the reference's DataParallel): average them
        batch_stats = jax.lax.pmean(batch_stats, AXIS)
    metrics = jax.lax.pmean({"loss": loss, **aux}, AXIS)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = learning_rate_fn(state.step)
    if momentum_fn is not None:
        metrics["momentum"] = momentum_fn(state.step)
    new_state = update(state, grads, batch_stats, config.ema.decay, ema_warmup_steps)
    if not divergence_guard:
        return new_state, metrics
    checks = {
        "loss": jnp.isfinite(metrics["loss"]),
        "grad_norm": jnp.isfinite(metrics["grad_norm"]),
        "params": tree_finite(new_state.params),
        "ema_params": tree_finite(new_state.ema_params),
        "opt_state": tree_finite(new_state.opt_state),
        "batch_stats": tree_finite(new_state.batch_stats),
    }
    finite = functools.reduce(jnp.logical_and, checks.values())
    metrics["finite"] = finite.astype(jnp.float32)
    metrics.update({f"finite_{k}": v.astype(jnp.float32) for k, v in checks.items()})
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, metrics


def tree_finite(tree: Any) -> jax.Array:
    """Whether sum(x^2) over the floating leaves of `tree` is finite in float32: every value is
    finite and the tree's norm is representable (|x| < ~1e19), which also rejects an update that
    overflowed into huge but finite weights (the next step's loss would be inf or NaN)."""
    total = jnp.zeros((), jnp.float32)
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return jnp.isfinite(total)


def compile_train_step(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    learning_rate_fn: optax.Schedule,
    ema_warmup_steps: int,
    mesh: Mesh,
    momentum_fn: optax.Schedule | None = None,
    divergence_guard: bool = True,
):
    """jit(shard_map(train_step)) over `mesh`: state replicated, batch split on "batch".

    `learning_rate_fn` and `momentum_fn` (optional) are logged as metrics; the optimizer in the
    state applies its own. `divergence_guard`: see `train_step`."""
    sync = bool(config.sync_batch_stats)
    step = functools.partial(
        train_step,
        model=model.clone(bn_axis_name=AXIS) if sync else model,
        config=config,
        learning_rate_fn=learning_rate_fn,
        ema_warmup_steps=ema_warmup_steps,
        sync_batch_stats=sync,
        momentum_fn=momentum_fn,
        divergence_guard=divergence_guard,
    )
    return data_parallel(step, mesh, (P(), P(AXIS), P()), (P(), P()), donate_argnums=0)
