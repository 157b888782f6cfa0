"""The base configuration every `configs/*.py` starts from, and its validation.

Configs are data: each `configs/<name>.py` defines `get_config()` returning this ConfigDict with
the paper's values filled in. Every field is overridable as `--config.a.b=value`.
"""

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from score_jax import attacks, losses, optim
from score_jax.data import DATASET_NAMES, VALIDATION_ORDERS

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
        raise ValueError(f"config variant {variant!r}: unknown options {sorted(unknown)}")
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
        raise ValueError(message)


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ValueError with one line naming the first bad field."""
    from score_jax import models, train
    from score_jax.models import MODEL_NAMES

    lc, ac = config.loss, config.attack
    _require(
        config.dataset.name in DATASET_NAMES,
        f"config.dataset.name={config.dataset.name!r} is unknown; valid: {DATASET_NAMES}",
    )
    _require(
        config.model.name in MODEL_NAMES,
        f"config.model.name={config.model.name!r} is unknown; valid: {MODEL_NAMES}",
    )
    _require(
        config.batch_size > 0 and config.batch_size % num_devices == 0,
        f"config.batch_size={config.batch_size} must be a positive multiple of the device "
        f"count {num_devices}",
    )
    _require(
        config.eval_batch_size > 0 and config.eval_batch_size % num_devices == 0,
        f"config.eval_batch_size={config.eval_batch_size} must be a positive multiple of the "
        f"device count {num_devices}",
    )
    _require(
        config.num_epochs > 0 or config.num_train_steps > 0,
        "config.num_epochs or config.num_train_steps must be > 0",
    )
    _require(
        lc.type in ("trades", "pgd_at"),
        f"config.loss.type={lc.type!r}; valid: 'trades', 'pgd_at'",
    )
    _require(
        lc.kind in losses.DIVERGENCES,
        f"config.loss.kind={lc.kind!r}; valid: {losses.DIVERGENCES}",
    )
    _require(lc.beta >= 0, f"config.loss.beta={lc.beta} must be >= 0")
    _require(
        lc.clip_c is None or 0 <= lc.clip_c < 1,
        f"config.loss.clip_c={lc.clip_c} must lie in [0, 1) (or be None)",
    )
    _require(
        0 <= lc.label_smoothing < 1,
        f"config.loss.label_smoothing={lc.label_smoothing} must lie in [0, 1)",
    )
    _require(ac.num_steps >= 0, f"config.attack.num_steps={ac.num_steps} must be >= 0")
    _require(
        ac.step_size > 0 or ac.num_steps == 0,
        f"config.attack.step_size={ac.step_size} must be > 0",
    )
    _require(ac.init in attacks.INITS, f"config.attack.init={ac.init!r}; valid: {attacks.INITS}")
    _require(ac.eps >= 0, f"config.attack.eps={ac.eps} must be >= 0")
    _require(
        ac.batchnorm in train.ATTACK_BATCHNORM,
        f"config.attack.batchnorm={ac.batchnorm!r}; valid: {train.ATTACK_BATCHNORM}",
    )
    _require(
        ac.l2_rule in attacks.L2_RULES,
        f"config.attack.l2_rule={ac.l2_rule!r}; valid: {attacks.L2_RULES}",
    )
    _require(ac.norm in attacks.NORMS, f"config.attack.norm={ac.norm!r}; valid: {attacks.NORMS}")
    _require(
        config.optim.schedule in optim.SCHEDULES,
        f"config.optim.schedule={config.optim.schedule!r}; valid: {optim.SCHEDULES}",
    )
    _require(
        config.optim.learning_rate > 0,
        f"config.optim.learning_rate={config.optim.learning_rate} must be > 0",
    )
    _require(
        config.optim.schedule_unit in optim.SCHEDULE_UNITS,
        f"config.optim.schedule_unit={config.optim.schedule_unit!r}; valid: {optim.SCHEDULE_UNITS}",
    )
    _require(
        config.optim.final_div_factor > 0,
        f"config.optim.final_div_factor={config.optim.final_div_factor} must be > 0",
    )
    _require(
        not config.optim.cycle_momentum or config.optim.schedule == "one_cycle",
        "config.optim.cycle_momentum needs config.optim.schedule='one_cycle'",
    )
    _require(
        0 <= config.optim.base_momentum <= config.optim.max_momentum < 1,
        f"config.optim.base_momentum={config.optim.base_momentum} and max_momentum="
        f"{config.optim.max_momentum} must satisfy 0 <= base <= max < 1",
    )
    _require(0 <= config.ema.decay < 1, f"config.ema.decay={config.ema.decay} must lie in [0, 1)")
    _require(
        config.dataset.validation_order in VALIDATION_ORDERS,
        f"config.dataset.validation_order={config.dataset.validation_order!r}; valid: "
        f"{VALIDATION_ORDERS}",
    )
    _require(
        0.0 < config.dataset.real_fraction <= 1.0,
        f"config.dataset.real_fraction={config.dataset.real_fraction} must lie in (0, 1]",
    )
    _require(
        0 <= config.augment.rotation_degrees <= 180,
        f"config.augment.rotation_degrees={config.augment.rotation_degrees} must lie in [0, 180]",
    )
    _require(
        config.dataset.epoch_size >= 0,
        f"config.dataset.epoch_size={config.dataset.epoch_size} must be >= 0",
    )
    _require(
        config.best_by in ("ema", "raw"), f"config.best_by={config.best_by!r}; valid: ema, raw"
    )
    _require(
        config.checkpoint_every_steps > 0,
        f"config.checkpoint_every_steps={config.checkpoint_every_steps} must be > 0",
    )
    _require(
        config.model.init_scheme in models.INIT_SCHEMES,
        f"config.model.init_scheme={config.model.init_scheme!r}; valid: {models.INIT_SCHEMES}",
    )
    _require(
        config.model.dtype in ("float32", "bfloat16"),
        f"config.model.dtype={config.model.dtype!r}; valid: float32, bfloat16",
    )
    _validate_evaluators(config)


def _validate_evaluators(config: ml_collections.ConfigDict) -> None:
    """config.eval / config.test: each evaluator's fields, select_by and select_ties."""
    from score_jax import evaluate

    for section in ("eval", "test"):
        for name, e in evaluate.evaluator_specs(config[section]).items():
            f = f"config.{section}.{name}"
            kinds = ", ".join(evaluate.KINDS)
            _require(e.get("kind") in evaluate.KINDS, f"{f}.kind={e.get('kind')!r}; valid: {kinds}")
            if e.kind == "autoattack":
                _validate_autoattack(f, e)
            if e.kind == "pgd":
                _require(e.num_steps >= 0, f"{f}.num_steps={e.num_steps} must be >= 0")
                _require(
                    e.step_size > 0 or e.num_steps == 0, f"{f}.step_size={e.step_size} must be > 0"
                )
                _require(e.init in attacks.INITS, f"{f}.init={e.init!r}; valid: {attacks.INITS}")
                _require(
                    e.objective in attacks.EVAL_OBJECTIVES,
                    f"{f}.objective={e.objective!r}; valid: {attacks.EVAL_OBJECTIVES}",
                )
                _require(e.restarts >= 1, f"{f}.restarts={e.restarts} must be >= 1")
                _require(e.eps >= 0, f"{f}.eps={e.eps} must be >= 0")
                _require(e.norm in attacks.NORMS, f"{f}.norm={e.norm!r}; valid: {attacks.NORMS}")
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
    ties = config.eval.get("select_ties")
    _require(
        ties in evaluate.SELECT_TIES,
        f"config.eval.select_ties={ties!r}; valid: {evaluate.SELECT_TIES}",
    )


def _validate_autoattack(f: str, e: ml_collections.ConfigDict) -> None:
    """An "autoattack" evaluator's fields (f: its dotted name)."""
    from score_jax import autoattack

    versions = ("standard", "custom")
    _require(e.version in versions, f"{f}.version={e.version!r}; valid: {versions}")
    bad = [a for a in e.attacks if a not in autoattack.ATTACKS]
    _require(not bad, f"{f}.attacks has unknown {bad}; valid: {autoattack.ATTACKS}")
    _require(
        (e.version == "custom") == bool(e.attacks),
        f"{f}.attacks={tuple(e.attacks)!r}: a non-empty list with version='custom' only",
    )
    _require(e.num_examples == -1 or e.num_examples > 0, f"{f}.num_examples: -1 (all) or > 0")
    _require(e.params in ("best_by", "all"), f"{f}.params={e.params!r}; valid: best_by, all")
    for k in ("apgd_iters", "fab_iters", "targets", "square_queries"):
        _require(isinstance(e[k], int) and e[k] >= 1, f"{f}.{k}={e[k]!r} must be an int >= 1")
    _require(e.targets <= 9, f"{f}.targets={e.targets} must be <= 9 (classes - 1 at most)")
    _require(e.eps > 0, f"{f}.eps={e.eps} must be > 0")
    _require(e.norm in attacks.NORMS, f"{f}.norm={e.norm!r}; valid: {attacks.NORMS}")
