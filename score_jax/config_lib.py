"""The base configuration every `configs/*.py` starts from, and its validation.

Configs are data: each `configs/<name>.py` defines `get_config()` returning this ConfigDict with
the paper's values filled in. Every field is overridable as `--config.a.b=value`.
"""

import importlib.util
import inspect
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from score_jax import attacks, losses, optim
from score_jax.data import DATASET_NAMES, VALIDATION_ORDERS
from score_jax.errors import ConfigError

CIFAR10_EPS = 8 / 255


def pgd_evaluator(
    attack: ml_collections.ConfigDict,
    *,
    objective: str,
    num_steps: int,
    step_size: float,
    restarts: int = 1,
    init: str = "uniform",
) -> ml_collections.ConfigDict:
    """A "pgd" evaluator (attacks.EVAL_OBJECTIVES objective) whose eps and norm are references
    to `attack`'s (config.attack): they follow `--config.attack.eps=...` until set themselves."""
    return ml_collections.ConfigDict(
        dict(
            kind="pgd",
            objective=objective,
            num_steps=num_steps,
            step_size=step_size,
            restarts=restarts,
            init=init,
            eps=attack.get_ref("eps").identity(),
            norm=attack.get_ref("norm").identity(),
        )
    )


def autoattack_evaluator(
    attack: ml_collections.ConfigDict,
    *,
    version: str = "standard",
    attacks: tuple[str, ...] = (),
    num_examples: int = -1,
    params: str = "best_by",
) -> ml_collections.ConfigDict:
    """An "autoattack" evaluator: the JAX AutoAttack (score_jax.autoattack) at config.attack's eps
    and norm (references, as pgd_evaluator's). version "standard" (APGD-CE, APGD-T, FAB-T,
    Square) or "custom" (`attacks`); the iteration counts are AutoAttack's standard ones;
    `num_examples`: the first n examples (-1: all); `params`: "best_by" evaluates only
    config.best_by's parameters (AutoAttack is the costly evaluator), "all" both."""
    return ml_collections.ConfigDict(
        dict(
            kind="autoattack",
            version=version,
            attacks=tuple(attacks),
            num_examples=num_examples,
            params=params,
            apgd_iters=100,
            fab_iters=100,
            targets=9,
            square_queries=5000,
            eps=attack.get_ref("eps").identity(),
            norm=attack.get_ref("norm").identity(),
        )
    )


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
    # A released PyTorch checkpoint (.pt / .pth; torch_bridge.released) to start from (new runs)
    # or to evaluate (--mode eval on a workdir without checkpoints); "": none.
    c.init_from = ""
    c.resume_extend = False  # resume with another num_train_steps / num_epochs (new schedule)
    c.resume_fallback = False  # a corrupt newest checkpoint: resume from the previous one
    c.sync_batch_stats = True  # BatchNorm statistics over the global batch (False: per device)
    c.progress_bar = True

    # data_dir (CIFAR): cifar-10-python.tar.gz / cifar-100-python.tar.gz, the extracted folder,
    # a directory holding either, or a TFDS data directory. validation_order: which order the
    # first num_validation training images are held out in: "file" (the archive's, torchvision's,
    # as the reference), "tfds" (TFDS's record order) or "auto" (file for archives, else tfds).
    c.dataset = ml_collections.ConfigDict(
        dict(
            name="cifar10",
            data_dir="",
            num_validation=1024,
            validation_order="auto",
            ddpm_path="",
            real_fraction=1.0,
            epoch_size=0,  # examples per epoch (steps = ceil(epoch_size / batch)); 0: train split
        )
    )
    # rotation_degrees: random rotation U(-d, d) after crop and flip (RandomRotation(d)); 0: off.
    c.augment = ml_collections.ConfigDict(dict(crop_padding=4, flip=True, rotation_degrees=0.0))
    c.model = ml_collections.ConfigDict(
        # activation "" = the model's default (SiLU for WRNs, ReLU otherwise).
        # init_scheme "torch": PyTorch's default initialisation (the basic setting's reference).
        dict(
            name="preact-resnet-18",
            activation="",
            conv_impl="auto",
            dtype="float32",
            init_scheme="default",
        )
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
        dict(
            norm="linf",
            eps=CIFAR10_EPS,
            step_size=2 / 255,
            num_steps=10,
            init="normal",
            # BatchNorm in the attack's passes: "batch_frozen" | "eval" | "batch_update".
            batchnorm="batch_frozen",
            # L2 step: "ball_then_box" | "box_then_ball" (the reference's trades_loss_LSE).
            l2_rule="ball_then_box",
        )
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
            # one_cycle: final lr = lr / warmup_div / final_div_factor (PyTorch OneCycleLR).
            final_div_factor=1e4,
            # "step" | "epoch": the schedules advance per step or once per epoch (PyTorch).
            schedule_unit="step",
            # one_cycle: momentum max_momentum -> base_momentum (lr peak) -> max_momentum.
            cycle_momentum=False,
            base_momentum=0.85,
            max_momentum=0.95,
        )
    )
    c.ema = ml_collections.ConfigDict(dict(decay=0.995, warmup_fraction=0.025))
    # Evaluators, each a named sub-ConfigDict with a `kind` of score_jax.evaluate.EVALUATORS; a
    # "pgd" one's eps and norm follow config.attack unless set. config.eval: on the validation
    # split every eval_every_epochs epochs; the best checkpoint has the highest min over
    # `select_by` of config.best_by's accuracies, a new best needing > the best so far
    # (select_ties "strict") or >= ("later"). config.test: on the test split after training and
    # in --mode eval. The clean accuracy is always computed ("clean" in select_by).
    c.eval = ml_collections.ConfigDict()
    c.eval.pgd = pgd_evaluator(c.attack, objective="ce", num_steps=10, step_size=2 / 255)
    c.eval.select_by = ("pgd",)
    c.eval.select_ties = "strict"
    c.test = ml_collections.ConfigDict()
    c.test.pgd = pgd_evaluator(c.attack, objective="ce", num_steps=20, step_size=2 / 255)
    c.test.autoattack = autoattack_evaluator(c.attack)  # JAX, standard, config.best_by's params
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
    c.dataset.epoch_size = 50000  # the reference counts all 50000 images (validation included)
    c.model.name = "wrn-70-16" if "wrn-70-16" in options else "wrn-28-10"
    c.model.activation = "silu"
    c.batch_size = 512
    c.eval_batch_size = 512
    c.num_epochs = 400
    c.optim.learning_rate = 0.2
    c.optim.schedule = "one_cycle"  # OneCycleLR(max_lr=lr, pct_start=0.025, total_steps=epochs)
    c.optim.schedule_unit = "epoch"  # stepped once per epoch, as the reference
    c.optim.warmup_fraction = 0.025
    c.optim.warmup_div = 25.0
    c.optim.final_div_factor = 1e4
    c.optim.cycle_momentum = True  # 0.95 -> 0.85 -> 0.95 (OneCycleLR's default)
    c.optim.base_momentum = 0.85
    c.optim.max_momentum = 0.95
    c.optim.momentum = 0.9  # unused while cycle_momentum
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
    c.attack.batchnorm = "batch_frozen"  # train mode, running averages not tracked (trades.py)
    if "l2" in options:
        # trades_loss_LSE's L2 loop: 0.001 N(0,1) start, lr 2 eps / steps, box then renorm.
        c.attack.norm, c.attack.eps = "l2", 128 / 255
        c.attack.step_size = 2 * c.attack.eps / c.attack.num_steps
        c.attack.init, c.attack.l2_rule = "normal", "box_then_ball"
    else:
        # x + U(-eps, eps) clamped to [0, 1], then sign steps of 2/255.
        c.attack.norm, c.attack.eps, c.attack.step_size = "linf", 8 / 255, 2 / 255
        c.attack.init = "uniform"
    # Evaluation keeps its steps of 2/255 (16/255 for L2); the training L2 step is 2 eps / steps.
    eval_step = 16 / 255 if "l2" in options else 2 / 255
    # The reference's validation: PGD-40 on its CW loss, uniform start, of the EMA, every
    # epoch, a new best on >=.
    del c.eval.pgd
    c.eval.pgd_cw = pgd_evaluator(
        c.attack, objective="cw_clamped", num_steps=40, step_size=eval_step
    )
    c.eval.select_by = ("pgd_cw",)
    c.eval.select_ties = "later"
    c.test.pgd.num_steps = 20
    c.test.pgd.step_size = eval_step
    c.best_by = "ema"
    c.eval_every_epochs = 1
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
_MODEL_RESERVED = ("name", "activation", "conv_impl", "dtype", "init_scheme")

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


def _attack_checks() -> dict[str, Check]:
    from score_jax import train

    return {
        "attack.norm": _choice(attacks.NORMS),
        "attack.eps": _real(0.0),
        "attack.step_size": _real(0.0),
        "attack.num_steps": _integer(0),
        "attack.init": _choice(attacks.INITS),
        "attack.batchnorm": _choice(train.ATTACK_BATCHNORM),
        "attack.l2_rule": _choice(attacks.L2_RULES),
    }


def evaluator_checks(kind: str) -> dict[str, Check]:
    """field -> check of an evaluator of `kind` (config.eval.<name> / config.test.<name>)."""
    from score_jax import autoattack

    common = {"kind": _choice((kind,)), "eps": _real(0.0), "norm": _choice(attacks.NORMS)}
    if kind == "pgd":
        return common | {
            "objective": _choice(attacks.EVAL_OBJECTIVES),
            "num_steps": _integer(0),
            "step_size": _real(0.0),
            "restarts": _integer(1),
            "init": _choice(attacks.INITS),
        }
    if kind == "autoattack":
        return common | {
            "eps": _real(0.0, lo_open=True),
            "version": _choice(("standard", "custom")),
            "attacks": (
                lambda v: isinstance(v, tuple | list) and all(a in autoattack.ATTACKS for a in v),
                f"a tuple of names of {autoattack.ATTACKS}",
            ),
            "num_examples": _integer(1, or_value=-1),
            "params": _choice(("best_by", "all")),
            "apgd_iters": _integer(1),
            "fab_iters": _integer(1),
            "targets": _integer(1),
            "square_queries": _integer(1),
        }
    return {}


def field_checks() -> dict[str, Check]:
    """dotted field -> (predicate, requirement) for every field of base_config()."""
    from score_jax.models import ACTIVATIONS, CONV_IMPLS, INIT_SCHEMES, MODEL_NAMES

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
        "init_from": _STRING,
        "sync_batch_stats": _BOOL,
        "progress_bar": _BOOL,
        "dataset.name": _choice(DATASET_NAMES),
        "dataset.data_dir": _STRING,
        "dataset.num_validation": _integer(0),
        "dataset.ddpm_path": _STRING,
        "dataset.real_fraction": _real(0.0, 1.0, lo_open=True),
        "dataset.validation_order": _choice(VALIDATION_ORDERS),
        "dataset.epoch_size": _integer(0),
        "augment.crop_padding": _integer(0),
        "augment.flip": _BOOL,
        "augment.rotation_degrees": _real(0.0, 180.0),
        "model.name": _choice(MODEL_NAMES),
        "model.activation": _choice(("", *ACTIVATIONS)),
        "model.conv_impl": _choice(CONV_IMPLS),
        "model.dtype": _choice(("float32", "bfloat16")),
        "model.init_scheme": _choice(INIT_SCHEMES),
        "loss.type": _choice(("trades", "pgd_at")),
        "loss.kind": _choice(losses.DIVERGENCES),
        "loss.beta": _real(0.0),
        "loss.clip_c": _real(0.0, 1.0, hi_open=True, none=True),
        "loss.clip_clean": _BOOL,
        "loss.label_smoothing": _PROB,
        **_attack_checks(),
        "eval.select_by": (
            lambda v: (
                isinstance(v, tuple | list) and len(v) > 0 and all(isinstance(n, str) for n in v)
            ),
            "a non-empty tuple of config.eval evaluator names",
        ),
        "eval.select_ties": _choice(("strict", "later")),
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
        "optim.final_div_factor": _real(0.0, lo_open=True),
        "optim.schedule_unit": _choice(optim.SCHEDULE_UNITS),
        "optim.cycle_momentum": _BOOL,
        "optim.base_momentum": _PROB,
        "optim.max_momentum": _PROB,
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
    from score_jax import evaluate, models

    if field in field_checks() or field in FREE_FORM:
        return True
    section, _, name = field.partition(".")
    if section == "model":
        return name in models.model_fields(config.model.name)
    if section in ("eval", "test"):
        evaluator, _, key = name.partition(".")
        spec = evaluate.evaluator_specs(config[section]).get(evaluator)
        return spec is not None and key in evaluator_checks(spec.get("kind", ""))
    return False


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
    _require(
        config.attack.step_size > 0 or config.attack.num_steps == 0,
        f"config.attack.step_size={config.attack.step_size} must be > 0 "
        f"(num_steps={config.attack.num_steps})",
    )
    _check_evaluators(config)
    o = config.optim
    _require(
        not o.cycle_momentum or o.schedule == "one_cycle",
        "config.optim.cycle_momentum needs config.optim.schedule='one_cycle'",
    )
    _require(
        o.base_momentum <= o.max_momentum,
        f"config.optim.base_momentum={o.base_momentum} must be <= config.optim.max_momentum="
        f"{o.max_momentum}",
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


def _check_evaluators(config: ml_collections.ConfigDict) -> None:
    """config.eval / config.test: each evaluator's fields by its kind, then select_by."""
    from score_jax import evaluate

    for section in ("eval", "test"):
        for key, value in config[section].items():
            if not isinstance(value, ml_collections.ConfigDict):
                _require(
                    section == "eval" and key in ("select_by", "select_ties"),
                    f"config.{section}.{key} is neither an evaluator nor a setting of "
                    f"config.{section}",
                )
        for name, e in evaluate.evaluator_specs(config[section]).items():
            f = f"config.{section}.{name}"
            kind = e.get("kind")
            _require(kind in evaluate.KINDS, f"{f}.kind={kind!r}; valid: {evaluate.KINDS}")
            checks = evaluator_checks(kind)
            for k, v in e.items():
                _require(k in checks, f"{f}.{k} is not a field of a {kind!r} evaluator")
                ok, requirement = checks[k]
                _require(ok(v), f"{f}.{k}={v!r} must be {requirement}")
            missing = [k for k in checks if k not in e]
            _require(not missing, f"{f} lacks {missing}")
            if kind == "pgd":
                _require(
                    e.step_size > 0 or e.num_steps == 0,
                    f"{f}.step_size={e.step_size} must be > 0 (num_steps={e.num_steps})",
                )
            if kind == "autoattack":
                _require(
                    (e.version == "custom") == bool(e.attacks),
                    f"{f}.attacks={tuple(e.attacks)!r}: a non-empty tuple with version='custom' "
                    "only",
                )
                _require(e.targets <= 9, f"{f}.targets={e.targets} must be <= 9 (AutoAttack's)")
    names = (*evaluate.evaluator_specs(config.eval), evaluate.CLEAN)
    select_by = config.eval.get("select_by")  # None in a config.json written before evaluators
    _require(
        isinstance(select_by, tuple | list) and len(select_by) > 0,
        f"config.eval.select_by={select_by!r} must be a non-empty tuple of config.eval evaluators",
    )
    unknown = [n for n in select_by if n not in names]
    _require(
        not unknown, f"config.eval.select_by names unknown evaluators {unknown}; valid: {names}"
    )


# --- One line for a bad --config flag (main.parse_flags) -------------------------------------


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.removeprefix("--config=")
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def explain_flag_error(argv: list[str], error: Exception) -> str:
    """One line for a flag error: a variant the config file does not take, an override of a
    field the config does not have, else the error's last line (not an embedded traceback)."""
    spec = _config_arg(argv)
    if spec:
        path, _, variant = spec.partition(":")
        try:
            module_spec = importlib.util.spec_from_file_location("_score_config", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            takes_variant = bool(inspect.signature(module.get_config).parameters)
        except Exception:  # noqa: BLE001 - reported below as the original error
            module = None
        if module is not None:
            if variant and not takes_variant:
                return f"--config {spec}: {path} has no variants (got {variant!r})"
            try:
                config = module.get_config(variant) if variant else module.get_config()
            except Exception as e:  # noqa: BLE001 - a bad variant: the config file's own message
                return f"--config {spec}: {' '.join(str(e).split())}"
            fields = leaves(config)
            sections = {f.split(".")[0] for f in fields}
            for arg in argv:
                name = arg.removeprefix("--config.").split("=")[0]
                if arg.startswith("--config.") and name not in fields:
                    section = name.split(".")[0]
                    unknown = f"field {name!r}" if section in sections else f"section {section!r}"
                    return f"{arg}: config.{name} is not a field of {path} (unknown {unknown})"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
