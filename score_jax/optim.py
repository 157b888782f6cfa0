"""Optimizer, weight-decay mask, learning-rate and momentum schedules and the EMA of weights.

The reference settings (DESIGN.md sections 3, 8): SGD with momentum 0.9 and weight decay 5e-4 added
to the gradient before momentum (PyTorch's `SGD(weight_decay=...)`); the DDPM setting uses Nesterov,
no decay on BatchNorm, PyTorch's `OneCycleLR` stepped once per epoch (lr and momentum both cycled)
and an EMA with tau 0.995.
"""

import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from score_jax.errors import ConfigError

SCHEDULES = ("one_cycle", "cyclic_cosine", "piecewise", "cosine", "constant")
SCHEDULE_UNITS = ("step", "step_end", "epoch")


def weight_decay_mask(params, decay_batchnorm: bool):
    """True for the leaves to decay; BatchNorm leaves (modules named "batchnorm*" / "bn*") are
    excluded unless `decay_batchnorm`."""

    def is_bn(path: tuple[str, ...]) -> bool:
        return any(p.lower().startswith(("batchnorm", "bn")) for p in path[:-1])

    flat = flax.traverse_util.flatten_dict(params)
    mask = {k: decay_batchnorm or not is_bn(k) for k in flat}
    return flax.traverse_util.unflatten_dict(mask)


def one_cycle(
    total: int, pct_start: float, initial: float, peak: float, final: float
) -> optax.Schedule:
    """PyTorch `OneCycleLR`'s two cosine phases (three_phase=False) over units t = 0..total-1.

    The peak is at w = pct_start * total - 1 (a float, as PyTorch computes it); with
    a(s, e, pct) = e + (s - e) (1 + cos(pi pct)) / 2 the value is a(initial, peak, t / w) for
    t <= w, else a(peak, final, (t - w) / (total - 1 - w)). Written as
    e + (s - e) sin^2(pi (1 - pct) / 2): float32-accurate also near the end of a phase.
    Units past the end keep the last value.
    """
    w = float(pct_start * total) - 1.0
    last = float(total - 1)
    warm_len = w if w != 0 else 1.0
    decay_len = last - w if last != w else 1.0

    def schedule(t) -> jax.Array:
        t = jnp.minimum(jnp.asarray(t, jnp.float32), last)
        warm = t <= w
        rest = jnp.where(warm, (w - t) / warm_len, (last - t) / decay_len)
        start = jnp.where(warm, initial, peak)
        end = jnp.where(warm, peak, final)
        return end + (start - end) * jnp.square(jnp.sin(0.5 * jnp.pi * rest))

    return schedule


def _units(optim_config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
    """(units per epoch, total units, step -> unit) of config.optim.schedule_unit."""
    unit = optim_config.schedule_unit
    if unit == "step":
        return steps_per_epoch, max(total_steps, 1), lambda step: step
    if unit == "step_end":
        return steps_per_epoch, max(total_steps, 1), lambda step: jnp.asarray(step) + 1
    if unit == "epoch":
        epochs = max(math.ceil(total_steps / steps_per_epoch), 1)
        return 1, epochs, lambda step: jnp.asarray(step) // steps_per_epoch
    raise ConfigError(f"config.optim.schedule_unit must be one of {SCHEDULE_UNITS}, got {unit!r}")


def make_schedule(
    optim_config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """The learning rate per step.

    The schedule advances once per step, at the step's start ("step") or its end ("step_end":
    step s runs at the schedule's value at s + 1, as without_DDPM/train_cifar.py sets the lr of
    iteration i of epoch e from e + (i + 1) / len(loader), so a piecewise drop at epoch E applies
    from step E * steps_per_epoch - 1), or once per epoch with schedule_unit "epoch" (PyTorch's
    `scheduler.step()` at the end of every epoch: the lr is constant within an epoch).
    one_cycle: PyTorch `OneCycleLR(max_lr=lr, pct_start=warmup_fraction, div_factor=warmup_div,
      final_div_factor=final_div_factor)` (cosine from lr/warmup_div up to lr, then down to
      lr/warmup_div/final_div_factor; `one_cycle`).
    cyclic_cosine: linear warm-up over warmup_fraction of training from lr/warmup_div to lr, then
      cosine decay to 0.
    piecewise: lr multiplied by lr_decay_factor at each epoch of lr_boundaries_epochs.
    cosine: cosine decay from lr to 0; constant: lr.
    """
    lr = float(optim_config.learning_rate)
    name = optim_config.schedule
    per_epoch, total, to_unit = _units(optim_config, steps_per_epoch, total_steps)
    if name == "constant":
        inner = optax.constant_schedule(lr)
    elif name == "cosine":
        inner = optax.cosine_decay_schedule(lr, total)
    elif name == "piecewise":
        boundaries = {
            int(e * per_epoch): float(optim_config.lr_decay_factor)
            for e in optim_config.lr_boundaries_epochs
        }
        inner = optax.piecewise_constant_schedule(lr, boundaries)
    elif name == "one_cycle":
        initial = lr / float(optim_config.warmup_div)
        final = initial / float(optim_config.final_div_factor)
        inner = one_cycle(total, float(optim_config.warmup_fraction), initial, lr, final)
    elif name == "cyclic_cosine":
        warmup = int(round(float(optim_config.warmup_fraction) * total))
        inner = optax.warmup_cosine_decay_schedule(
            init_value=lr / float(optim_config.warmup_div),
            peak_value=lr,
            warmup_steps=warmup,
            decay_steps=max(total, warmup + 1),
            end_value=0.0,
        )
    else:
        raise ConfigError(f"config.optim.schedule must be one of {SCHEDULES}, got {name!r}")
    return lambda step: inner(to_unit(step))


def make_momentum_schedule(
    optim_config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
    """The SGD momentum per step: config.optim.momentum, or with cycle_momentum (one_cycle only)
    PyTorch OneCycleLR's cycle from max_momentum down to base_momentum at the lr peak and back,
    in the units of the lr schedule."""
    if not optim_config.cycle_momentum:
        return optax.constant_schedule(float(optim_config.momentum))
    if optim_config.schedule != "one_cycle":
        raise ConfigError(
            "config.optim.cycle_momentum needs config.optim.schedule='one_cycle', got "
            f"{optim_config.schedule!r}"
        )
    _, total, to_unit = _units(optim_config, steps_per_epoch, total_steps)
    low, high = float(optim_config.base_momentum), float(optim_config.max_momentum)
    inner = one_cycle(total, float(optim_config.warmup_fraction), high, low, high)
    return lambda step: inner(to_unit(step))


def make_optimizer(
    optim_config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    momentum: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
    """[clip_by_global_norm] -> add wd * param (masked) -> SGD(momentum, nesterov) at `schedule`.

    SGD is PyTorch's: v <- mu_t v + g; the step is lr_t (g + mu_t v) (Nesterov) or lr_t v, with
    `momentum` (a float or a per-step schedule; default config.optim.momentum) and the lr
    injected per step (`optax.inject_hyperparams`).
    """
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
    if momentum is None:
        momentum = float(optim_config.momentum)
    sgd = optax.inject_hyperparams(optax.sgd, static_args=("nesterov",))
    parts.append(sgd(schedule, momentum=momentum, nesterov=bool(optim_config.nesterov)))
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
