"""The base configuration every `configs/*.py` starts from, the paper's settings and loading.

Configs are data: each `configs/<name>.py` defines `get_config()` (or `get_config(variant)`) that
states only what it changes in base_config(). A variant is a comma list of options parsed by
parse_variant(). Every field is overridable as `--config.a.b=value`; config_checks validates.
"""

import importlib.util
import os
from collections.abc import Collection
from typing import Any

import ml_collections
from ml_collections import config_dict

from score_jax import losses
from score_jax.config_checks import validate  # noqa: F401 - config_lib.validate, as callers use
from score_jax.errors import ConfigError
from score_jax.evaluators import autoattack, pgd
from score_jax.losses import LOSS_METHODS

CIFAR10_EPS = 8 / 255
# The rows of the paper's Tables 1 and 2: "<method>-<divergence>", e.g. "pgd_at-kl" (Madry).
LOSS_ROWS = tuple(f"{m}-{d}" for m in LOSS_METHODS for d in losses.DIVERGENCES)


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
    # The running statistics start from the first step's batch (PyTorch BatchNorm momentum 1 for
    # step 0, then the model's: the DDPM reference's watrain.py); False: the usual update.
    c.bn_first_batch_stats = False
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
            # "stream" (every image once before any twice) | "per_epoch" (a fresh permutation
            # each epoch, of which the first steps x real-per-batch: the DDPM reference's).
            real_sampling="stream",
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
            method="trades",  # "trades" | "pgd_at" (losses.LOSS_METHODS)
            divergence="se",  # a divergence of score_jax.losses.DIVERGENCES
            beta=6.0,
            clip_c=config_dict.placeholder(float),  # None: no clipping
            clip_clean=True,
            label_smoothing=0.0,
            # TRADES: the loss's passes, in the order they update the running averages:
            # "clean_first" (the DDPM reference's) | "adv_first" (without_DDPM/train_cifar.py's).
            trades_pass_order="clean_first",
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
    # Evaluators, each a named sub-ConfigDict with a `kind` of score_jax.evaluators.KINDS; a
    # "pgd" one's eps and norm follow config.attack unless set. config.eval: on the validation
    # split every eval_every_epochs epochs; the best checkpoint has the highest min over
    # `select_by` of config.best_by's accuracies, a new best needing > the best so far
    # (select_ties "strict") or >= ("later"). config.test: on the test split after training and
    # in --mode eval. The clean accuracy is always computed ("clean" in select_by).
    # Every evaluator (validation and test) runs at eval_precision: "float32" (a float32 copy of
    # the model, float32 parameters, highest matmul/convolution precision, whatever model.dtype
    # trained) or "model" (as trained: model.dtype, the backend's default matmul precision).
    c.eval_precision = "float32"
    c.eval = ml_collections.ConfigDict()
    c.eval.pgd = pgd.spec(c.attack, objective="ce", num_steps=10, step_size=2 / 255)
    c.eval.select_by = ("pgd",)
    c.eval.select_ties = "strict"
    c.test = ml_collections.ConfigDict()
    c.test.pgd = pgd.spec(c.attack, objective="ce", num_steps=20, step_size=2 / 255)
    # The JAX AutoAttack on the test split; `--mode autoattack` reads the same spec (its version,
    # attacks, num_examples, eps and norm) for the pyautoattack cross-check.
    c.test.autoattack = autoattack.spec(c.attack)  # standard, config.best_by's params
    return c


def paper_loss(method: str, divergence: str, clip: bool = False) -> dict[str, Any]:
    """The basic setting's rules of Tables 1 and 2 (the reference's without_DDPM/train_cifar.py),
    as flattened config fields: initial lr 0.1 for KL, 0.05 otherwise; loss clipping at c = 0.4
    (PGD-AT) / 0.3 (TRADES) when `clip`, else none; the attack starts from U(-eps, eps) for
    PGD-AT, 0.001 N(0, 1) for TRADES. Apply with `config.update_from_flattened_dict(...)`."""
    if method not in LOSS_METHODS or divergence not in losses.DIVERGENCES:
        raise ConfigError(f"loss {method!r}-{divergence!r}: expected one of {LOSS_ROWS}")
    return {
        "loss.method": method,
        "loss.divergence": divergence,
        "loss.clip_c": (0.4 if method == "pgd_at" else 0.3) if clip else None,
        "optim.learning_rate": 0.1 if divergence == "kl" else 0.05,
        "attack.init": "uniform" if method == "pgd_at" else "normal",
    }


def parse_variant(
    variant: str,
    options: Collection[str],
    *,
    heads: Collection[str] = (),
    spelling: str = "",
) -> tuple[str, frozenset[str]]:
    """`[<head>,]<option>,<option>...` -> (head, options): the one variant syntax of every config
    file, a comma list (names keep their own dashes: `wrn-70-16`, `trades-se`). With `heads`, the
    first item must be one of them (`spelling` describes the syntax in the error). The old
    dash-joined spelling (`trades-se-clip-l2`) is refused naming the new (`trades-se,clip,l2`)."""
    items = [v.strip() for v in variant.split(",") if v.strip()]
    head = items.pop(0) if heads and items else ""
    unknown = [v for v in items if v not in options]
    bad_head = bool(heads) and head not in heads
    if not unknown and not bad_head:
        return head, frozenset(items)
    respelled = _respell(variant, (*heads, *options))
    if respelled and respelled != variant:
        parse_variant(respelled, options, heads=heads, spelling=spelling)  # raises if no better
        raise ConfigError(f"config variant {variant!r}: options are comma-separated: {respelled!r}")
    if bad_head:
        raise ConfigError(f"config variant {variant!r}: expected {spelling or sorted(heads)}")
    raise ConfigError(f"config variant {variant!r}: unknown options {sorted(unknown)}")


def _respell(variant: str, names: Collection[str]) -> str | None:
    """`variant` with each dash-joined run of known names split by commas; None if none fits."""
    out = []
    for item in (v for v in variant.split(",") if v):
        parts, i = item.split("-"), 0
        while i < len(parts):
            j = next((j for j in range(len(parts), i, -1) if "-".join(parts[i:j]) in names), None)
            if j is None:
                return None
            out.append("-".join(parts[i:j]))
            i = j
    return ",".join(out)


def load_config_module(path: str):
    """The Python config file at `path` as a module (a config building on another one)."""
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(variant)`) of the Python config file at `path`, as
    `--config path[:variant]` would load it."""
    module = load_config_module(path)
    return module.get_config() if variant is None else module.get_config(variant)
