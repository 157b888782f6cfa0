"""Optimizer, weight-decay mask, learning-rate schedules and the EMA of weights.

The reference settings (DESIGN.md section 3): SGD with momentum 0.9 and weight decay 5e-4 added to
the gradient before momentum (PyTorch's `SGD(weight_decay=...)`); the DDPM setting uses Nesterov,
no decay on BatchNorm, a one-cycle cosine schedule and an EMA with tau 0.995.
"""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from score_jax.errors import ConfigError

SCHEDULES = ("cyclic_cosine", "piecewise", "cosine", "constant")


def weight_decay_mask(params, decay_batchnorm: bool):
    """True for the leaves to decay; BatchNorm leaves (modules named "batchnorm*" / "bn*") are
    excluded unless `decay_batchnorm`."""

    def is_bn(path: tuple[str, ...]) -> bool:
        return any(p.lower().startswith(("batchnorm", "bn")) for p in path[:-1])

    flat = flax.traverse_util.flatten_dict(params)
    mask = {k: decay_batchnorm or not is_bn(k) for k in flat}
    return flax.traverse_util.unflatten_dict(mask)


def make_schedule(
    optim_config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """The learning rate per step.

    cyclic_cosine: linear warm-up over warmup_fraction of training from lr/warmup_div to lr, then
      cosine decay to 0 (the one-cycle schedule of the DDPM setting).
    piecewise: lr multiplied by lr_decay_factor at each epoch of lr_boundaries_epochs.
    cosine: cosine decay from lr to 0; constant: lr.
    """
    lr = float(optim_config.learning_rate)
    name = optim_config.schedule
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    if name == "piecewise":
        boundaries = {
            int(e * steps_per_epoch): float(optim_config.lr_decay_factor)
            for e in optim_config.lr_boundaries_epochs
        }
        return optax.piecewise_constant_schedule(lr, boundaries)
    if name == "cyclic_cosine":
        warmup = int(round(float(optim_config.warmup_fraction) * total_steps))
        return optax.warmup_cosine_decay_schedule(
            init_value=lr / float(optim_config.warmup_div),
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=0.0,
        )
    raise ConfigError(f"config.optim.schedule must be one of {SCHEDULES}, got {name!r}")


def make_optimizer(
    optim_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """[clip_by_global_norm] -> add wd * param (masked) -> SGD(momentum, nesterov) at `schedule`."""
    parts = []
    if optim_config.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
    if optim_config.weight_decay:
        decay_bn = bool(optim_config.weight_decay_batchnorm)
        parts.append(
            optax.add_decayed_weights(
                float(optim_config.weight_decay), mask=lambda p: weight_decay_mask(p, decay_bn)
            )
        )
    parts.append(
        optax.sgd(
            schedule, momentum=float(optim_config.momentum), nesterov=bool(optim_config.nesterov)
        )
    )
    return optax.chain(*parts)


def ema_decay(step: jax.Array, tau: float, warmup_steps: int) -> jax.Array:
    """The reference EMA decay: 0 before warmup_steps, then min(tau, (1 + d)/(10 + d)),
    d = step - warmup_steps."""
    d = jnp.asarray(step, jnp.float32) - warmup_steps
    return jnp.where(d >= 0, jnp.minimum(tau, (1.0 + d) / (10.0 + d)), 0.0)


def ema_update(ema_params, params, step: jax.Array, tau: float, warmup_steps: int):
    """ema <- decay * ema + (1 - decay) * params, decay = ema_decay(step, tau, warmup_steps)."""
    decay = ema_decay(step, tau, warmup_steps)
    return optax.incremental_update(params, ema_params, 1.0 - decay)
