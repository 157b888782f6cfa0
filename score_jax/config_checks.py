"""Validation of a config: one check per field, the relations between fields, old names.

field_checks() maps each dotted field to (predicate, requirement); validate() reports the first
failing field as "config.<field>=<value> must be <requirement>", a renamed field with its new
name (RENAMED). explain_flag_error() turns a bad `--config...` flag into one line.
"""

import importlib.util
import inspect
import math
from typing import Any

import ml_collections
import numpy as np

from score_jax import attacks, evaluators, losses, optim, precision
from score_jax.checks import (
    BOOL,
    FRACTION,
    PROB,
    STRING,
    Check,
    choice,
    integer,
    is_int,
    is_real,
    real,
    require,
)
from score_jax.data import DATASET_NAMES, REAL_SAMPLINGS, VALIDATION_ORDERS
from score_jax.errors import ConfigError

# Old field -> its new one: refused with this hint in a config, a --config.<old>=... flag; a
# checkpoint's fingerprint written before the rename is read with the new names.
RENAMED = {
    "loss.type": "loss.method",
    "loss.kind": "loss.divergence",
    "autoattack.num_examples": "test.autoattack.num_examples",
    "autoattack.version": "test.autoattack.version",
    "autoattack.attacks": "test.autoattack.attacks",
    "autoattack.batch_size": "eval_batch_size",
}
# An old section -> what replaced it.
MERGED = {"autoattack": "test.autoattack (one AutoAttack spec, also read by --mode autoattack)"}


def renamed_hint(field: str) -> str | None:
    """The hint 'config.<old> was renamed: use <new>' for an old field (or an old section's)."""
    new = RENAMED.get(field) or MERGED.get(field.partition(".")[0])
    return None if new is None else f"config.{field} was renamed: use config.{new}"


# A field in no table is a defect (tests/test_bad_inputs.py walks every shipped config): add a
# check or list it in FREE_FORM. The model's own fields (model.width, ...) are _check_model's.

_MODEL_RESERVED = ("name", "activation", "conv_impl", "dtype", "init_scheme")


def _lr_boundaries_ok(v: Any) -> bool:
    return (
        isinstance(v, tuple | list)
        and all(is_real(e) and e >= 0 for e in v)
        and list(v) == sorted(v)
    )


def _attack_checks() -> dict[str, Check]:
    return {
        "attack.norm": choice(attacks.NORMS),
        "attack.eps": real(0.0),
        "attack.step_size": real(0.0),
        "attack.num_steps": integer(0),
        "attack.init": choice(attacks.INITS),
        "attack.batchnorm": choice(attacks.ATTACK_BATCHNORM),
        "attack.l2_rule": choice(attacks.L2_RULES),
    }


def evaluator_checks(kind: evaluators.Kind) -> dict[str, Check]:
    """field -> check of an evaluator of `kind` (config.eval.<name> / config.test.<name>)."""
    return {"kind": choice((kind.name,)), **kind.fields()}


def field_checks() -> dict[str, Check]:
    """dotted field -> (predicate, requirement) for every field of base_config()."""
    from score_jax.models import ACTIVATIONS, CONV_IMPLS, INIT_SCHEMES, MODEL_NAMES

    return {
        "seed": (
            lambda v: is_int(v) and 0 <= v <= MAX_SEED,
            f"an integer in [0, {MAX_SEED}] (JAX keys take 32 bits without jax_enable_x64: a "
            "larger seed collides with a smaller one or overflows; the evaluation key is seed + 1)",
        ),
        "batch_size": integer(1),
        "eval_batch_size": integer(1),
        "num_epochs": real(0.0),
        "num_train_steps": integer(1, or_value=-1),
        "log_every_steps": integer(1),
        "eval_every_epochs": integer(0),
        "checkpoint_every_steps": integer(1),
        "keep_checkpoints": integer(1),
        "best_by": choice(("ema", "raw")),
        "resume_ignore_mismatch": BOOL,
        "resume_fallback": BOOL,
        "resume_extend": BOOL,
        "init_from": STRING,
        "sync_batch_stats": BOOL,
        "bn_first_batch_stats": BOOL,
        "progress_bar": BOOL,
        "eval_precision": choice(precision.EVAL_PRECISIONS),
        "dataset.name": choice(DATASET_NAMES),
        "dataset.data_dir": STRING,
        "dataset.num_validation": integer(0),
        "dataset.ddpm_path": STRING,
        "dataset.real_fraction": real(0.0, 1.0, lo_open=True),
        "dataset.validation_order": choice(VALIDATION_ORDERS),
        "dataset.epoch_size": integer(0),
        "dataset.real_sampling": choice(REAL_SAMPLINGS),
        "augment.crop_padding": integer(0),
        "augment.flip": BOOL,
        "augment.rotation_degrees": real(0.0, 180.0),
        "model.name": choice(MODEL_NAMES),
        "model.activation": choice(("", *ACTIVATIONS)),
        "model.conv_impl": choice(CONV_IMPLS),
        "model.dtype": choice(("float32", "bfloat16")),
        "model.init_scheme": choice(INIT_SCHEMES),
        "loss.method": choice(losses.LOSS_METHODS),
        "loss.divergence": choice(losses.DIVERGENCES),
        "loss.beta": real(0.0),
        "loss.clip_c": real(0.0, 1.0, hi_open=True, none=True),
        "loss.clip_clean": BOOL,
        "loss.label_smoothing": PROB,
        "loss.trades_pass_order": choice(losses.TRADES_PASS_ORDERS),
        **_attack_checks(),
        "eval.select_by": (
            lambda v: (
                isinstance(v, tuple | list) and len(v) > 0 and all(isinstance(n, str) for n in v)
            ),
            "a non-empty tuple of config.eval evaluator names",
        ),
        "eval.select_ties": choice(("strict", "later")),
        "optim.learning_rate": real(0.0, lo_open=True),
        "optim.momentum": PROB,
        "optim.nesterov": BOOL,
        "optim.weight_decay": real(0.0),
        "optim.weight_decay_batchnorm": BOOL,
        "optim.grad_clip_norm": real(0.0, lo_open=True, none=True),
        "optim.schedule": choice(optim.SCHEDULES),
        "optim.lr_boundaries_epochs": (
            _lr_boundaries_ok,
            "a non-decreasing sequence of finite numbers >= 0",
        ),
        "optim.lr_decay_factor": real(0.0, lo_open=True),
        "optim.warmup_fraction": FRACTION,
        "optim.warmup_div": real(0.0, lo_open=True),
        "optim.final_div_factor": real(0.0, lo_open=True),
        "optim.schedule_unit": choice(optim.SCHEDULE_UNITS),
        "optim.cycle_momentum": BOOL,
        "optim.base_momentum": PROB,
        "optim.max_momentum": PROB,
        "ema.decay": PROB,
        "ema.warmup_fraction": FRACTION,
    }


MAX_SEED = 2**32 - 2  # seed and seed + 1 (the evaluation key) fit a 32-bit JAX key

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
    if section == "model":
        return name in models.model_fields(config.model.name)
    if section in ("eval", "test"):
        evaluator, _, key = name.partition(".")
        spec = evaluators.specs(config[section]).get(evaluator)
        kind = None if spec is None else evaluators.KINDS.get(spec.get("kind"))
        return kind is not None and key in evaluator_checks(kind)
    return False


def _check_model(config: ml_collections.ConfigDict) -> None:
    """config.model's own fields: each a field of the model, a positive int (or tuple of them)."""
    from score_jax import models

    fields = models.model_fields(config.model.name)
    for key, value in config.model.items():
        if key in _MODEL_RESERVED:
            continue
        require(
            key in fields,
            f"config.model.{key} is not a field of model {config.model.name!r}; valid: {fields}",
        )
        values = value if isinstance(value, tuple | list) else (value,)
        require(
            all(is_int(v) and v >= 1 for v in values) and len(values) > 0,
            f"config.model.{key}={value!r} must be a positive integer (or a tuple of them)",
        )


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ConfigError with one line naming the first bad field; checks every field of the
    table, the model's fields, then the relations between fields."""
    values = leaves(config)
    hints = [h for h in map(renamed_hint, (*values, *config)) if h]
    require(not hints, hints[0] if hints else "")
    for field, (ok, requirement) in field_checks().items():
        if field in values and not ok(values[field]):
            raise ConfigError(f"config.{field}={values[field]!r} must be {requirement}")
    _check_model(config)
    require(
        config.attack.step_size > 0 or config.attack.num_steps == 0,
        f"config.attack.step_size={config.attack.step_size} must be > 0 "
        f"(num_steps={config.attack.num_steps})",
    )
    _check_evaluators(config)
    _check_against_the_dataset(config)
    o = config.optim
    require(
        not o.cycle_momentum or o.schedule == "one_cycle",
        "config.optim.cycle_momentum needs config.optim.schedule='one_cycle'",
    )
    require(
        o.base_momentum <= o.max_momentum,
        f"config.optim.base_momentum={o.base_momentum} must be <= config.optim.max_momentum="
        f"{o.max_momentum}",
    )
    for field in ("batch_size", "eval_batch_size"):
        require(
            config[field] % num_devices == 0,
            f"config.{field}={config[field]} must be a positive multiple of the device "
            f"count {num_devices}",
        )
    require(
        config.num_epochs > 0 or config.num_train_steps > 0,
        "config.num_epochs or config.num_train_steps must be > 0",
    )
    # real_fraction < 1 needing config.dataset.ddpm_path is checked when the data loads (the
    # DDPM configs ship without the path, which each user sets).


def _check_against_the_dataset(config: ml_collections.ConfigDict) -> None:
    """The radii (config.attack's, each evaluator's with an eps and a norm) against the image
    box (images are in [0, 1]: a Linf radius of 1, an L2 radius of sqrt(H * W * C), already
    reaches every image), num_validation and batch_size against the splits (from the dataset's
    constants: nothing is read)."""
    from score_jax import data

    info = data.dataset_info(config.dataset)
    dim = int(np.prod(info.image_shape))
    radii = [("config.attack", config.attack)]
    for section in ("eval", "test"):
        specs = evaluators.specs(config[section]).items()
        radii += [
            (f"config.{section}.{name}", e) for name, e in specs if "eps" in e and "norm" in e
        ]
    for f, e in radii:
        limit, why = (1.0, "1") if e.norm == "linf" else (math.sqrt(dim), f"sqrt({dim})")
        require(
            e.eps <= limit,
            f"{f}.eps={e.eps!r} must be <= {why} for norm {e.norm!r}: images are in [0, 1], so "
            "a larger radius reaches every image (eps is on the [0, 1] scale: 8/255, not 8)",
        )
    if config.dataset.name == "digits":
        from score_jax.data import digits

        num_validation = config.dataset.get("num_validation", digits.NUM_VALIDATION)
        require(
            num_validation == digits.NUM_VALIDATION,
            f"config.dataset.num_validation={num_validation!r}: digits has a fixed "
            f"split ({info.num_train} train / {digits.NUM_VALIDATION} validation / "
            f"{digits.NUM_TEST} test); set {digits.NUM_VALIDATION}",
        )
    fraction = config.dataset.get("real_fraction", 1.0)
    num_real = config.batch_size if fraction == 1.0 else int(round(config.batch_size * fraction))
    require(
        num_real <= info.num_train,
        f"config.batch_size={config.batch_size} takes {num_real} real images per step, more than "
        f"the {info.num_train} of the {info.name} training split (every step would repeat "
        f"images); use at most {info.num_train}",
    )


def _check_evaluators(config: ml_collections.ConfigDict) -> None:
    """config.eval / config.test: each evaluator's fields and relations by its kind
    (evaluators.KINDS), then select_by."""
    for section in ("eval", "test"):
        for key, value in config[section].items():
            if not isinstance(value, ml_collections.ConfigDict):
                require(
                    section == "eval" and key in ("select_by", "select_ties"),
                    f"config.{section}.{key} is neither an evaluator nor a setting of "
                    f"config.{section}",
                )
        for name, e in evaluators.specs(config[section]).items():
            f = f"config.{section}.{name}"
            kind = evaluators.KINDS.get(e.get("kind"))
            valid = tuple(evaluators.KINDS)
            require(kind is not None, f"{f}.kind={e.get('kind')!r}; valid: {valid}")
            checks = evaluator_checks(kind)
            for k, v in e.items():
                require(k in checks, f"{f}.{k} is not a field of a {kind.name!r} evaluator")
                ok, requirement = checks[k]
                require(ok(v), f"{f}.{k}={v!r} must be {requirement}")
            missing = [k for k in checks if k not in e]
            require(not missing, f"{f} lacks {missing}")
            kind.check(f, e)
    names = (*evaluators.specs(config.eval), evaluators.clean.NAME)
    select_by = config.eval.get("select_by")  # None in a config.json written before evaluators
    require(
        isinstance(select_by, tuple | list) and len(select_by) > 0,
        f"config.eval.select_by={select_by!r} must be a non-empty tuple of config.eval evaluators",
    )
    unknown = [n for n in select_by if n not in names]
    require(
        not unknown, f"config.eval.select_by names unknown evaluators {unknown}; valid: {names}"
    )


# --- One line for a bad --config flag (main.parse_flags) -------------------------------------


def config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.removeprefix("--config=")
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def explain_flag_error(argv: list[str], error: Exception) -> str:
    """One line for a flag error: a variant the config file does not take, an override of a
    field the config does not have, else the error's last line (not an embedded traceback)."""
    spec = config_arg(argv)
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
                    hint = renamed_hint(name)
                    if hint:
                        return f"{arg}: {hint}"
                    section = name.split(".")[0]
                    unknown = f"field {name!r}" if section in sections else f"section {section!r}"
                    return f"{arg}: config.{name} is not a field of {path} (unknown {unknown})"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
