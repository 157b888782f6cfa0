"""The base configuration every `configs/*.py` starts from, and its validation.

Configs are data: each `configs/<name>.py` defines `get_config()` returning this ConfigDict with
the paper's values filled in. Every field is overridable as `--config.a.b=value`.
"""

import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from score_jax import attacks, losses, optim
from score_jax.data import DATASET_NAMES
from score_jax.errors import ConfigError

CIFAR10_EPS = 8 / 255


def base_config() -> ml_collections.ConfigDict:
    """Defaults of the paper's basic setting (PreAct-ResNet-18, CIFAR-10, Linf 8/255)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 128  # global, over all devices and hosts
    c.eval_batch_size = 256
    c.num_epochs = 110
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.log_every_steps = 50
    c.eval_every_epochs = (
        1  # validation PGD accuracy (best-checkpoint selection); 0: only at the end
    )
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.best_by = "ema"  # "ema" | "raw": whose validation PGD accuracy selects the best checkpoint
    c.resume_ignore_mismatch = False
    c.resume_fallback = False  # a corrupt newest checkpoint: resume from the previous one
    c.resume_extend = False  # resume with another num_train_steps / num_epochs (new schedule)
    c.sync_batch_stats = True  # BatchNorm statistics over the global batch (False: per device)
    c.progress_bar = True

    c.dataset = ml_collections.ConfigDict(
        dict(name="cifar10", data_dir="", num_validation=1024, ddpm_path="", real_fraction=1.0)
    )
    c.augment = ml_collections.ConfigDict(dict(crop_padding=4, flip=True))
    c.model = ml_collections.ConfigDict(
        # activation "" = the model's default (SiLU for WRNs, ReLU otherwise).
        dict(name="preact-resnet-18", activation="", conv_impl="auto", dtype="float32")
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            type="trades",  # "trades" | "pgd_at"
            kind="se",  # a divergence of score_jax.losses.DIVERGENCES
            beta=6.0,
            clip_c=config_dict.placeholder(float),  # None: no clipping
            clip_clean=True,
            label_smoothing=0.0,
        )
    )
    c.attack = ml_collections.ConfigDict(
        dict(norm="linf", eps=CIFAR10_EPS, step_size=2 / 255, num_steps=10, init="normal")
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            learning_rate=0.05,
            momentum=0.9,
            nesterov=False,
            weight_decay=5e-4,
            weight_decay_batchnorm=True,
            grad_clip_norm=config_dict.placeholder(float),
            schedule="piecewise",
            lr_boundaries_epochs=(100, 105),
            lr_decay_factor=0.1,
            warmup_fraction=0.025,
            warmup_div=25.0,
        )
    )
    c.ema = ml_collections.ConfigDict(dict(decay=0.995, warmup_fraction=0.025))
    # PGD on the validation split during training (eps and norm are config.attack's).
    c.eval = ml_collections.ConfigDict(
        dict(objective="ce", num_steps=10, step_size=2 / 255, restarts=1, init="uniform")
    )
    # PGD on the test split at the end of training and in --mode eval.
    c.test = ml_collections.ConfigDict(
        dict(objective="ce", num_steps=20, step_size=2 / 255, restarts=1, init="uniform")
    )
    # --mode autoattack (score_jax.torch_bridge): AutoAttack on the first num_examples test
    # examples (-1: all); version "standard" | "plus" | "rand" | "custom" (custom: `attacks`,
    # e.g. ("apgd-ce", "apgd-t")).
    c.autoattack = ml_collections.ConfigDict(
        dict(num_examples=-1, batch_size=256, version="standard", attacks=())
    )
    return c


def ddpm_config(dataset: str, real_fraction: float, variant: str = "") -> ml_collections.ConfigDict:
    """The DDPM setting (Tables 3, 4; configs/cifar10_ddpm.py documents it): WRN + DDPM data."""
    options = {v for v in variant.split(",") if v}
    unknown = options - {"beta3", "l2", "wrn-70-16"}
    if unknown:
        raise ConfigError(f"config variant {variant!r}: unknown options {sorted(unknown)}")
    c = base_config()
    c.dataset.name = dataset
    c.dataset.num_validation = 1024
    c.dataset.ddpm_path = ""  # required: the generated .npz
    c.dataset.real_fraction = real_fraction
    c.model.name = "wrn-70-16" if "wrn-70-16" in options else "wrn-28-10"
    c.model.activation = "silu"
    c.batch_size = 512
    c.eval_batch_size = 512
    c.num_epochs = 400
    c.optim.learning_rate = 0.2
    c.optim.schedule = "cyclic_cosine"
    c.optim.warmup_fraction = 0.025
    c.optim.warmup_div = 25.0
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.weight_decay_batchnorm = False
    c.ema.decay = 0.995
    c.ema.warmup_fraction = 0.025
    c.loss.type = "trades"
    c.loss.kind = "se"
    c.loss.beta = 3.0 if "beta3" in options else 4.0
    c.loss.clip_c = None
    c.loss.label_smoothing = 0.0
    c.attack.num_steps = 10
    c.attack.init = "normal"
    if "l2" in options:
        c.attack.norm, c.attack.eps, c.attack.step_size = "l2", 128 / 255, 16 / 255
    else:
        c.attack.norm, c.attack.eps, c.attack.step_size = "linf", 8 / 255, 2 / 255
    c.eval.objective = "cw"
    c.eval.num_steps = 40
    c.eval.step_size = c.attack.step_size
    c.test.objective = "ce"
    c.test.num_steps = 20
    c.test.step_size = c.attack.step_size
    c.best_by = "ema"
    c.eval_every_epochs = 5
    c.checkpoint_every_steps = 2000
    return c


def load_config_file(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(variant)`) of the Python config file at `path`, as
    `--config path[:variant]` would load it."""
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if variant is None else module.get_config(variant)


def eval_attack(config: ml_collections.ConfigDict, section: str) -> ml_collections.ConfigDict:
    """config.<section> (eval or test) completed with config.attack's eps and norm."""
    attack = ml_collections.ConfigDict(config[section].to_dict())
    attack.eps = config.attack.eps
    attack.norm = config.attack.norm
    return attack


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --- Validation: one check per field, then the relations between fields ----------------------
#
# field_checks() maps each dotted field to (predicate, requirement); validate() reports the first
# failing field as "config.<field>=<value> must be <requirement>". A field in no table is a
# defect (tests/test_bad_inputs.py walks every shipped config): add a check or list it in
# FREE_FORM. The model's own fields (model.width, model.depth, ...) are checked by _check_model.

AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
AUTOATTACK_NAMES = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
_MODEL_RESERVED = ("name", "activation", "conv_impl", "dtype")

Check = tuple[Callable[[Any], bool], str]


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v)


def _integer(lo: int, *, or_value: int | None = None) -> Check:
    text = f"an integer >= {lo}" + ("" if or_value is None else f" (or {or_value})")
    return (lambda v: _is_int(v) and (v >= lo or v == or_value)), text


def _real(lo: float, hi: float = math.inf, *, lo_open=False, hi_open=False, none=False) -> Check:
    def ok(v: Any) -> bool:
        if v is None:
            return none
        if not _is_real(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
    return ok, f"a finite number in {interval}" + (" or None" if none else "")


def _choice(options: Sequence[str]) -> Check:
    options = tuple(options)
    return (lambda v: isinstance(v, str) and v in options), f"one of {options}"


_BOOL: Check = (lambda v: isinstance(v, bool), "True or False")
_STRING: Check = (lambda v: isinstance(v, str), "a string")
_PROB: Check = _real(0.0, 1.0, hi_open=True)  # [0, 1)
_FRACTION: Check = _real(0.0, 1.0)  # [0, 1]


def _lr_boundaries_ok(v: Any) -> bool:
    return (
        isinstance(v, tuple | list)
        and all(_is_real(e) and e >= 0 for e in v)
        and list(v) == sorted(v)
    )


def _aa_attacks_ok(v: Any) -> bool:
    items = (v,) if isinstance(v, str) else v
    if not isinstance(items, tuple | list):
        return False
    names = [a.strip() for item in items for a in str(item).split(",") if a.strip()]
    return all(a in AUTOATTACK_NAMES for a in names)


def _pgd_checks(section: str, eval_section: bool) -> dict[str, Check]:
    checks = {
        f"{section}.num_steps": _integer(0),
        f"{section}.step_size": _real(0.0),
        f"{section}.init": _choice(attacks.INITS),
    }
    if section == "attack":
        checks["attack.norm"] = _choice(attacks.NORMS)
        checks["attack.eps"] = _real(0.0)
    if eval_section:
        checks[f"{section}.objective"] = _choice(attacks.EVAL_OBJECTIVES)
        checks[f"{section}.restarts"] = _integer(1)
    return checks


def field_checks() -> dict[str, Check]:
    """dotted field -> (predicate, requirement) for every field of base_config()."""
    from score_jax.models import ACTIVATIONS, CONV_IMPLS, MODEL_NAMES

    return {
        "seed": _integer(0),
        "batch_size": _integer(1),
        "eval_batch_size": _integer(1),
        "num_epochs": _real(0.0),
        "num_train_steps": _integer(1, or_value=-1),
        "log_every_steps": _integer(1),
        "eval_every_epochs": _integer(0),
        "checkpoint_every_steps": _integer(1),
        "keep_checkpoints": _integer(1),
        "best_by": _choice(("ema", "raw")),
        "resume_ignore_mismatch": _BOOL,
        "resume_fallback": _BOOL,
        "resume_extend": _BOOL,
        "sync_batch_stats": _BOOL,
        "progress_bar": _BOOL,
        "dataset.name": _choice(DATASET_NAMES),
        "dataset.data_dir": _STRING,
        "dataset.num_validation": _integer(0),
        "dataset.ddpm_path": _STRING,
        "dataset.real_fraction": _real(0.0, 1.0, lo_open=True),
        "augment.crop_padding": _integer(0),
        "augment.flip": _BOOL,
        "model.name": _choice(MODEL_NAMES),
        "model.activation": _choice(("", *ACTIVATIONS)),
        "model.conv_impl": _choice(CONV_IMPLS),
        "model.dtype": _choice(("float32", "bfloat16")),
        "loss.type": _choice(("trades", "pgd_at")),
        "loss.kind": _choice(losses.DIVERGENCES),
        "loss.beta": _real(0.0),
        "loss.clip_c": _real(0.0, 1.0, hi_open=True, none=True),
        "loss.clip_clean": _BOOL,
        "loss.label_smoothing": _PROB,
        **_pgd_checks("attack", eval_section=False),
        **_pgd_checks("eval", eval_section=True),
        **_pgd_checks("test", eval_section=True),
        "optim.learning_rate": _real(0.0, lo_open=True),
        "optim.momentum": _PROB,
        "optim.nesterov": _BOOL,
        "optim.weight_decay": _real(0.0),
        "optim.weight_decay_batchnorm": _BOOL,
        "optim.grad_clip_norm": _real(0.0, lo_open=True, none=True),
        "optim.schedule": _choice(optim.SCHEDULES),
        "optim.lr_boundaries_epochs": (
            _lr_boundaries_ok,
            "a non-decreasing sequence of finite numbers >= 0",
        ),
        "optim.lr_decay_factor": _real(0.0, lo_open=True),
        "optim.warmup_fraction": _FRACTION,
        "optim.warmup_div": _real(0.0, lo_open=True),
        "ema.decay": _PROB,
        "ema.warmup_fraction": _FRACTION,
        "autoattack.num_examples": _integer(1, or_value=-1),
        "autoattack.batch_size": _integer(1),
        "autoattack.version": _choice(AUTOATTACK_VERSIONS),
        "autoattack.attacks": (_aa_attacks_ok, f"a sequence of names of {AUTOATTACK_NAMES}"),
    }


# Fields that take any value (none today: even paths are type-checked).
FREE_FORM: tuple[str, ...] = ()


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """{dotted field: value} of every leaf of `config`."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(leaves(value, name + "."))
        else:
            out[name] = value
    return out


def is_checked(field: str, config: ml_collections.ConfigDict) -> bool:
    """Whether validate() checks `field` of `config` (or it is listed as FREE_FORM)."""
    from score_jax import models

    if field in field_checks() or field in FREE_FORM:
        return True
    section, _, name = field.partition(".")
    return section == "model" and name in models.model_fields(config.model.name)


def _check_model(config: ml_collections.ConfigDict) -> None:
    """config.model's own fields: each a field of the model, a positive int (or tuple of them)."""
    from score_jax import models

    fields = models.model_fields(config.model.name)
    for key, value in config.model.items():
        if key in _MODEL_RESERVED:
            continue
        _require(
            key in fields,
            f"config.model.{key} is not a field of model {config.model.name!r}; valid: {fields}",
        )
        values = value if isinstance(value, tuple | list) else (value,)
        _require(
            all(_is_int(v) and v >= 1 for v in values) and len(values) > 0,
            f"config.model.{key}={value!r} must be a positive integer (or a tuple of them)",
        )


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ConfigError with one line naming the first bad field; checks every field of the
    table, the model's fields, then the relations between fields."""
    values = leaves(config)
    for field, (ok, requirement) in field_checks().items():
        if field in values and not ok(values[field]):
            raise ConfigError(f"config.{field}={values[field]!r} must be {requirement}")
    _check_model(config)
    for section in ("attack", "eval", "test"):
        a = config[section]
        _require(
            a.step_size > 0 or a.num_steps == 0,
            f"config.{section}.step_size={a.step_size} must be > 0 (num_steps={a.num_steps})",
        )
    for field in ("batch_size", "eval_batch_size"):
        _require(
            config[field] % num_devices == 0,
            f"config.{field}={config[field]} must be a positive multiple of the device "
            f"count {num_devices}",
        )
    _require(
        config.num_epochs > 0 or config.num_train_steps > 0,
        "config.num_epochs or config.num_train_steps must be > 0",
    )
    # real_fraction < 1 needing config.dataset.ddpm_path is checked when the data loads (the
    # DDPM configs ship without the path, which each user sets).
    aa = config.get("autoattack")
    if aa is not None:
        custom = [a for a in ((aa.attacks,) if isinstance(aa.attacks, str) else aa.attacks) if a]
        _require(
            aa.version != "custom" or bool(custom),
            "config.autoattack.attacks must list attacks for config.autoattack.version='custom'",
        )
        _require(
            aa.version == "custom" or not custom,
            f"config.autoattack.attacks is only used with version='custom' (got {aa.version!r})",
        )
