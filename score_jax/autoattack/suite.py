"""AutoAttack's "standard" version: APGD-CE, APGD-T, FAB-T, Square in sequence, data-parallel.

As pyautoattack's `AutoAttack.run_standard_evaluation`: every stage runs only on the examples still
robust after the previous ones, and the robust accuracy is reported after each stage. Between
stages, and between the target classes of APGD-T and FAB-T (as the reference's loop over targets),
a host step gathers the still-robust examples and splits them into equal chunks of at most
`batch_size`, padded to a multiple of batch_size / 8 (`chunk_size`): a stage compiles once per
chunk size, and keeps its size across targets while that pads less than a quarter. APGD and FAB
runs end once their chunk has no robust example left (`early_stop`: the same flags). Example i's
randomness comes from fold_in(fold_in(key, stage), i) with i its index in the split, and the model
runs in eval mode (no batch coupling): the result does not depend on the device count or the
batching, up to floating-point differences of the batched convolutions. Unlike the reference, a
stage with no example left is still listed (at the same accuracy).

    fns = make_stage_fns(model, eps=8/255, norm="linf", mesh=mesh)
    result = evaluate(model, variables, split, eps=8/255, norm="linf", batch_size=256,
                      mesh=mesh, key=parallel.base_key(0), stage_fns=fns)
"""

import functools
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from score_jax import data
from score_jax.autoattack import apgd, fab, square
from score_jax.errors import ConfigError
from score_jax.parallel import AXIS, data_parallel, shard_batch
from score_jax.precision import eval_model, with_precision

Array = jax.Array
LogitsFn = Callable[[Array], Array]

ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
TARGETED = ("apgd-t", "fab-t")  # run one target class per call, re-gathered in between
DEFAULT_TARGETS = 9
VERSIONS = {"standard": ATTACKS}
NORMS = ("linf", "l2")
# AutoAttack "standard" (pyautoattack's set_version("standard")): these counts, one restart.
STANDARD_COUNTS = {"apgd_iters": 100, "fab_iters": 100, "targets": 9, "square_queries": 5000}


def reported_version(version: str, counts: dict[str, int]) -> str:
    """The version a result is reported under: "standard" only with STANDARD_COUNTS; version
    "standard" with other counts is "reduced"; "custom" stays "custom"."""
    if version == "standard" and any(counts[k] != v for k, v in STANDARD_COUNTS.items()):
        return "reduced"
    return version


def run_attack(
    name: str,
    logits_fn: LogitsFn,
    x: Array,
    labels: Array,
    key: Array,
    *,
    eps: float,
    norm: str,
    mask: Array | None = None,
    **options,
) -> tuple[Array, Array]:
    """One stage by name with AutoAttack's standard settings, overridden by `options`
    (e.g. n_iter, n_queries); returns (x_adv, robust)."""
    if name == "apgd-ce":
        return apgd.apgd_ce(logits_fn, x, labels, key, eps=eps, norm=norm, mask=mask, **options)
    if name == "apgd-t":
        return apgd.apgd_targeted(
            logits_fn, x, labels, key, eps=eps, norm=norm, mask=mask, **options
        )
    if name == "fab-t":
        return fab.fab_targeted(logits_fn, x, labels, eps=eps, norm=norm, mask=mask, **options)
    if name == "square":
        return square.square_attack(
            logits_fn, x, labels, key, eps=eps, norm=norm, mask=mask, **options
        )
    raise ConfigError(f"unknown autoattack attack {name!r}; valid: {ATTACKS}")


def resolve_attacks(version: str, attacks, where: str = "autoattack") -> tuple[str, ...]:
    """The attack list of `version` ("standard"), or `attacks` for version "custom": the one
    rule of the version and attacks fields (config validation, the suite, --mode autoattack);
    ConfigError naming `where`.<field> (e.g. where = "config.test.autoattack")."""
    attacks = tuple(attacks or ())
    if version == "custom":
        if not attacks:
            raise ConfigError(f"{where}.attacks must list attacks for {where}.version='custom'")
        bad = [a for a in attacks if a not in ATTACKS]
        if bad:
            raise ConfigError(f"{where}.attacks has unknown {bad}; valid: {ATTACKS}")
        return attacks
    if version not in VERSIONS:
        raise ConfigError(f"{where}.version={version!r}; valid: standard, custom")
    if attacks:
        raise ConfigError(
            f"{where}.attacks={attacks!r} is only used with version='custom' (got {version!r})"
        )
    return VERSIONS[version]


# ||x_adv - x|| <= eps * (1 + BALL_RTOL) + BALL_ATOL: float32 rounding of x_adv - x (an ulp of a
# pixel near 1 is 1.2e-7) and of the L2 sum.
BALL_RTOL = 1e-6
BALL_ATOL = 2.5e-7


def perturbation_size(x_adv: Array, x: Array, norm: str) -> Array:
    """Per example ||x_adv - x||_inf (norm "linf") or ||x_adv - x||_2 ("l2")."""
    delta = (x_adv - x).reshape(x.shape[0], -1)
    if norm == "linf":
        return jnp.max(jnp.abs(delta), axis=1)
    return jnp.sqrt(jnp.sum(jnp.square(delta), axis=1))


def verify_breaks(
    logits_fn: LogitsFn,
    x: Array,
    x_adv: Array,
    labels: Array,
    robust: Array,
    mask: Array,
    *,
    eps: float,
    norm: str,
) -> tuple[Array, Array]:
    """(robust, bad): an example is broken only if argmax f(x_adv) != y, ||x_adv - x|| <= eps
    (BALL_RTOL / BALL_ATOL) and x_adv in [0, 1], f re-evaluated on the returned points; `bad`
    marks the examples the attack flagged broken (robust False) that fail this: a bug."""
    valid = (
        (jnp.argmax(logits_fn(x_adv), axis=-1) != labels)
        & (perturbation_size(x_adv, x, norm) <= eps * (1 + BALL_RTOL) + BALL_ATOL)
        & jnp.all((x_adv >= 0.0) & (x_adv <= 1.0), axis=tuple(range(1, x.ndim)))
    )
    live = mask > 0
    return live & ~valid, live & ~robust & ~valid


def _stage_step(variables, batch, target_index=None, *, model, name, eps, norm, options):
    x = batch["image"].astype(jnp.float32) / 255.0
    if target_index is not None:
        options = {**options, "target_index": target_index}
    if name != "square":  # a run ends once its chunk has no robust example left
        options = {"early_stop": True, **options}

    def logits_fn(inputs):
        return model.apply(variables, inputs, train=False)

    keys = jax.random.wrap_key_data(batch["key"])
    x_adv, robust = run_attack(
        name, logits_fn, x, batch["label"], keys, eps=eps, norm=norm, mask=batch["mask"], **options
    )
    return verify_breaks(
        logits_fn, x, x_adv, batch["label"], robust, batch["mask"], eps=eps, norm=norm
    )


def _clean_step(variables, batch, *, model):
    x = batch["image"].astype(jnp.float32) / 255.0
    logits = model.apply(variables, x, train=False)
    correct = (jnp.argmax(logits, axis=-1) == batch["label"]) & (batch["mask"] > 0)
    return correct, jnp.zeros_like(correct)


def make_stage_fns(
    model: nn.Module,
    *,
    eps: float,
    norm: str = "linf",
    mesh: Mesh,
    version: str = "standard",
    attacks=None,
    options: dict[str, dict] | None = None,
    precision: str = "float32",
) -> dict[str, Callable]:
    """{"clean": fn, attack: fn, ...}: jit(shard_map(...)) of each stage, mapping (variables,
    batch with image/label/mask/key) to per-example (robust, bad) flags (`verify_breaks`); the
    TARGETED stages take a third argument, the index of the target class to run, and carry
    `n_targets`. `precision`: precision.EVAL_PRECISIONS ("float32": the model's float32 copy at
    the highest matmul precision). Reuse them across calls of `evaluate` so that nothing
    recompiles."""
    if norm not in NORMS:
        raise ConfigError(f"autoattack norm must be one of {NORMS}, got {norm!r}")
    if eps <= 0:
        raise ConfigError(f"autoattack eps must be > 0, got {eps}")
    names = resolve_attacks(version, attacks)
    options = options or {}
    bad = [k for k in options if k not in names]
    if bad:
        raise ConfigError(f"autoattack options for attacks not run: {bad}")

    model = eval_model(model, precision)

    def wrap(fn, targeted=False):
        in_specs = (P(), P(AXIS), P()) if targeted else (P(), P(AXIS))
        fn = with_precision(fn, precision)
        return data_parallel(fn, mesh, in_specs, (P(AXIS), P(AXIS)))

    fns = {"clean": wrap(functools.partial(_clean_step, model=model))}
    for name in names:
        step = functools.partial(
            _stage_step,
            model=model,
            name=name,
            eps=eps,
            norm=norm,
            options=dict(options.get(name, {})),
        )
        fns[name] = wrap(step, targeted=name in TARGETED)
        fns[name].attack = name
        if name in TARGETED:
            fns[name].n_targets = options.get(name, {}).get("n_target_classes", DEFAULT_TARGETS)
    return fns


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def chunk_size(n: int, batch_size: int, devices: int, current: int | None = None) -> int:
    """Rows per padded chunk for n examples: n split into ceil(n / batch_size) equal chunks,
    rounded up to a multiple of g = devices * ceil(batch_size / (8 devices)). `current` (the
    size this stage already compiled) is kept while the padding stays under a quarter."""
    g = devices * _ceil_div(batch_size, 8 * devices)
    size = min(_ceil_div(_ceil_div(n, _ceil_div(n, batch_size)), g) * g, batch_size)
    if current is not None and current >= size and n >= 0.75 * _ceil_div(n, current) * current:
        return current
    return size


def _example_keys(key: np.ndarray, stage: int, index: np.ndarray) -> np.ndarray:
    base = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(key)), stage)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.asarray(index))
    return np.asarray(jax.random.key_data(keys))


def _run_on(fn, variables, split, index, size, mesh, key, stage, *args) -> np.ndarray:
    """Robust flags of fn(variables, batch, *args) on split[index], in chunks of `size` rows
    (the last one padded). A flagged break that `verify_breaks` rejects raises (a bug of the
    attack, named by `fn.attack`)."""
    out = np.zeros((len(index),), bool)
    for start in range(0, len(index), size):
        idx = index[start : start + size]
        pad = size - len(idx)
        batch = {
            "image": np.concatenate(
                [split.images[idx], np.zeros((pad, *split.images.shape[1:]), np.uint8)]
            ),
            "label": np.concatenate([split.labels[idx], np.zeros((pad,), np.int32)]).astype(
                np.int32
            ),
            "mask": np.concatenate([np.ones((len(idx),)), np.zeros((pad,))]).astype(np.float32),
            "key": _example_keys(key, stage, np.concatenate([idx, np.zeros((pad,), idx.dtype)])),
        }
        flags, bad = fn(variables, _local(batch, mesh), *args)
        bad = _global_flags(bad)[: len(idx)]
        if bad.any():
            raise RuntimeError(
                f"AutoAttack {getattr(fn, 'attack', '?')}: {int(bad.sum())} examples (split "
                f"indices {idx[bad][:8].tolist()}) flagged broken are not: the model classifies "
                "the returned point correctly, or it lies outside the eps ball or [0, 1]"
            )
        out[start : start + len(idx)] = _global_flags(flags)[: len(idx)]
    return out


def _local(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Array]:
    """The global batch on the mesh; each process passes its contiguous rows (every process
    holds the whole batch here)."""
    count, index = jax.process_count(), jax.process_index()
    rows = len(batch["label"]) // count
    return shard_batch({k: v[index * rows : (index + 1) * rows] for k, v in batch.items()}, mesh)


def _global_flags(robust: Array) -> np.ndarray:
    """All rows of a batch-sharded result on every process."""
    if jax.process_count() == 1:
        return np.asarray(robust)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(robust, tiled=True))


def evaluate(
    model: nn.Module,
    variables: dict,
    split: data.Split,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    batch_size: int,
    mesh: Mesh,
    key: np.ndarray,
    attacks=None,
    num_examples: int = -1,
    options: dict[str, dict] | None = None,
    stage_fns: dict[str, Callable] | None = None,
    precision: str = "float32",
) -> dict:
    """AutoAttack robust accuracy of `variables` on the first `num_examples` of `split` (-1: all).

    Returns {"clean_accuracy", "robust_accuracy", "stages": [{"attack", "robust_accuracy",
    "seconds"}, ...], "num_examples"}. Multi-process runs: every process holds the whole split
    and passes its rows of each global batch; the robust flags are gathered on every host.
    `key` is raw PRNG key data (`parallel.base_key`). `stage_fns` (from `make_stage_fns`, whose
    eps, norm, options and precision are then the ones that run) skips compiling again. Every
    stage counts an example as broken only once `verify_breaks` confirms it on the returned
    point (a flagged break it rejects raises RuntimeError naming the attack).
    """
    names = resolve_attacks(version, attacks)
    devices = mesh.devices.size
    if batch_size <= 0 or batch_size % devices:
        raise ConfigError(
            f"autoattack batch_size={batch_size} must be a positive multiple of {devices}"
        )
    if num_examples == 0 or num_examples < -1:
        raise ConfigError(f"autoattack num_examples={num_examples}: -1 (all) or > 0")
    if stage_fns is None:
        stage_fns = make_stage_fns(
            model,
            eps=eps,
            norm=norm,
            mesh=mesh,
            version=version,
            attacks=attacks,
            options=options,
            precision=precision,
        )
    missing = [k for k in ("clean", *names) if k not in stage_fns]
    if missing:
        raise ConfigError(f"autoattack stage_fns lacks {missing}")
    n = len(split) if num_examples == -1 else min(num_examples, len(split))
    if n == 0:
        raise ConfigError("autoattack: the split has no examples")

    sizes: dict[int, int] = {}  # stage -> its chunk size so far

    def run(fn, stage, *args):
        alive = index[robust]
        if len(alive):
            size = chunk_size(len(alive), batch_size, devices, sizes.get(stage))
            sizes[stage] = size
            robust[alive] = _run_on(fn, variables, split, alive, size, mesh, key, stage, *args)

    index = np.arange(n)
    robust = np.ones((n,), bool)
    run(stage_fns["clean"], 0)
    clean = float(robust.mean())
    stages = []
    for s, name in enumerate(names, start=1):
        t0 = time.perf_counter()
        if name in TARGETED:
            for t in range(stage_fns[name].n_targets):
                run(stage_fns[name], s, jnp.int32(t))
        else:
            run(stage_fns[name], s)
        stages.append(
            {
                "attack": name,
                "robust_accuracy": float(robust.sum()) / n,
                "seconds": time.perf_counter() - t0,
            }
        )
        logging.info(
            "AutoAttack %s: robust accuracy %.2f%% of %d (%.1f s, chunks of %s)",
            name,
            100 * stages[-1]["robust_accuracy"],
            n,
            stages[-1]["seconds"],
            sizes.get(s, "-"),
        )
    return {
        "clean_accuracy": clean,
        "robust_accuracy": stages[-1]["robust_accuracy"] if stages else clean,
        "stages": stages,
        "num_examples": n,
    }
