"""AutoAttack "standard": score_jax.autoattack against pyautoattack, same CPU, weights, examples.

Both run in this process, one after the other, on the same examples: the JAX suite
(`autoattack.evaluate`, data-parallel over the devices; timed once with compilation and once
compiled) and pyautoattack's `AutoAttack(version="standard")` on the PyTorch export
(`torch_bridge.convert.export_state_dict`), on `torch.get_num_threads()` threads. Rows:

  python -m benchmarks.autoattack --model small-cnn --json /tmp/aa_digits.json
  python -m benchmarks.autoattack --model wrn-16-4 --num-examples 16 --batch 16 \
      --json /tmp/aa_wrn16.json
  python -m benchmarks.autoattack --export runs/digits/export --json /tmp/aa_quick_start.json

small-cnn: configs/digits.py's shapes (width 32, hidden 128) trained `--train-steps` plain Adam
steps on the digits, its 360 test images, eps 0.1. WRN: random weights at CIFAR shapes
(32x32x3), uniform random images labelled by the model's own predictions (16 unless
`--num-examples`), eps 8/255. `--export DIR`: a trained model instead, as `--mode export` wrote it
(<workdir>/export: model.pt, model.json): PyTorch loads it with `export.load_exported`, JAX
imports the same state dict (`torch_bridge.released`), on its dataset's test split at its
training eps and norm (`--eps`, `--norm` override them).
`--n-iter`, `--n-queries`, `--n-targets` reduce both sides identically (harness tests only).
"""

import argparse
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import optax
import torch

from benchmarks.common import result_header, write
from benchmarks.timing import loadavg, peak_rss_mb
from score_jax import autoattack, config_lib, data, models, train
from score_jax.data import digits
from score_jax.errors import ScoreError
from score_jax.models import layers
from score_jax.models.random_weights import random_variables
from score_jax.torch_bridge import export, released
from score_jax.torch_bridge.convert import export_state_dict
from score_jax.torch_bridge.models import build_torch_model

NORMS = {"linf": "Linf", "l2": "L2"}


def _train_digits(model, ds, steps: int, seed: int = 0) -> dict:
    x = ds.train.images.astype(np.float32) / 255.0
    y = ds.train.labels.astype(np.int32)
    variables = model.init(jax.random.key(seed), x[:1], train=False)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, stats, opt_state, xb, yb):
        def loss(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

        (_, upd), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = opt.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(y), 64)
        params, stats, opt_state = step(params, stats, opt_state, x[idx], y[idx])
    return {"params": params, "batch_stats": stats}


def _from_export(args: argparse.Namespace):
    """(flax model, variables, torch model, split, eps) of an export directory."""
    meta = export.read_meta(args.export)
    tm = export.load_exported(args.export)  # checks model.pt against model.json's sha256
    name = meta["architecture"]
    kw = dict(meta["kwargs"], conv_impl=args.conv_impl)
    model = models.get_model(name, int(meta["num_classes"]), **kw)
    dataset_config = config_lib.base_config().dataset
    dataset_config.name, dataset_config.data_dir = meta["dataset"], args.data_dir
    split = data.get_dataset(dataset_config).test
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, *split.images.shape[1:])), train=False)
    )
    path = os.path.join(args.export, export.MODEL_FILE)
    variables = released.load_variables(path, name, template, model.mean, model.std)
    args.norm = args.norm or meta["norm"]
    eps = float(meta["epsilon"]) if args.eps is None else args.eps
    return model, variables, tm, split, eps


def _built(args: argparse.Namespace):
    """(flax model, variables, torch model, split, eps) of `--model`."""
    if args.model == "small-cnn":
        ds = digits.load()
        kw = dict(width=args.width, hidden=args.hidden, mean=ds.mean, std=ds.std)
        model = models.get_model("small-cnn", 10, conv_impl=args.conv_impl, **kw)
        variables = _train_digits(model, ds, args.train_steps)
        split = ds.test
        eps = 0.1 if args.eps is None else args.eps
    else:
        kw = {}
        model = models.get_model(args.model, 10, conv_impl=args.conv_impl)
        shape = (args.image_size, args.image_size, 3)
        shapes = jax.eval_shape(
            lambda: model.init(jax.random.key(0), np.zeros((1, *shape)), train=False)
        )
        variables = random_variables(shapes, seed=1)
        n = args.num_examples if args.num_examples > 0 else 16
        images = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
        logits = jax.jit(lambda v, z: model.apply(v, z, train=False))(variables, images / 255.0)
        split = data.Split(images, np.asarray(np.argmax(logits, -1), np.int32))
        eps = 8 / 255 if args.eps is None else args.eps
    tm = build_torch_model(args.model, 10, **kw)
    tm.load_state_dict(export_state_dict(args.model, variables), strict=True)
    args.norm = args.norm or "linf"
    return model, variables, tm.eval(), split, eps


def setup(args: argparse.Namespace):
    """(flax model, variables, torch model, split, eps): `--export`'s or `--model`'s."""
    model, variables, tm, split, eps = (_from_export if args.export else _built)(args)
    if args.num_examples > 0:
        split = data.Split(split.images[: args.num_examples], split.labels[: args.num_examples])
    return model, variables, tm, split, eps


def _options(args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if args.n_iter:
        for name in ("apgd-ce", "apgd-t", "fab-t"):
            out.setdefault(name, {})["n_iter"] = args.n_iter
    if args.n_targets:
        for name in ("apgd-t", "fab-t"):
            out.setdefault(name, {})["n_target_classes"] = args.n_targets
    if args.n_queries:
        out["square"] = {"n_queries": args.n_queries}
    return out


def run_jax(args, model, variables, split, eps) -> dict[str, Any]:
    mesh = train.make_mesh(jax.devices()[: args.devices] if args.devices else None)
    options = _options(args)
    fns = autoattack.make_stage_fns(model, eps=eps, norm=args.norm, mesh=mesh, options=options)
    kw = dict(eps=eps, norm=args.norm, batch_size=args.batch, mesh=mesh, options=options)
    kw["key"], kw["stage_fns"] = train.base_key(0), fns
    load_before = loadavg()
    t0 = time.perf_counter()
    autoattack.evaluate(model, variables, split, **kw)  # compiles every stage and bucket
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = autoattack.evaluate(model, variables, split, **kw)
    seconds = time.perf_counter() - t0
    return {
        "devices": int(mesh.devices.size),
        "first_call_s_incl_compile": first_s,
        "seconds": seconds,
        "clean_accuracy": result["clean_accuracy"],
        "robust_accuracy": result["robust_accuracy"],
        "stages": result["stages"],
        "num_examples": result["num_examples"],
        "peak_rss_mb": peak_rss_mb(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


class _Log(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_torch(args, tm, split, eps) -> dict[str, Any]:
    from pyautoattack.autoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.fab_pt import FABAttack_PT
    from pyautoattack.square import SquareAttack

    # On the GPU when JAX runs there too (the same device for both sides), else the CPU.
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    tm = tm.to(device)
    x = torch.from_numpy(np.ascontiguousarray(split.images.transpose(0, 3, 1, 2)) / 255.0)
    x, y = x.float().to(device), torch.from_numpy(split.labels.astype(np.int64)).to(device)
    adversary = AutoAttack(
        tm, norm=NORMS[args.norm], eps=eps, version="standard", seed=0, device=device
    )
    if args.n_iter or args.n_targets or args.n_queries:  # reduced settings (harness tests)
        kw = dict(eps=eps, norm=NORMS[args.norm], device=device, seed=0)
        n_iter, n_targets = args.n_iter or 100, args.n_targets or 9
        adversary.apgd = APGDAttack(tm, n_restarts=1, n_iter=n_iter, **kw)
        adversary.apgd_targeted = APGDAttack_targeted(
            tm, n_restarts=1, n_iter=n_iter, n_target_classes=n_targets, **kw
        )
        adversary.fab = FABAttack_PT(
            tm, n_restarts=1, n_iter=n_iter, n_target_classes=n_targets, **kw
        )
        adversary.square = SquareAttack(
            tm, p_init=0.8, n_queries=args.n_queries or 5000, resc_schedule=False, **kw
        )
    handler = _Log()
    logger = logging.getLogger("auto-attack")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    load_before = loadavg()
    t0 = time.perf_counter()
    try:
        adversary.run_standard_evaluation(x, y, batch_size=args.torch_batch)
    finally:
        logger.removeHandler(handler)
    seconds = time.perf_counter() - t0
    stages, clean, previous = [], None, 0.0
    for line in handler.lines:
        words = line.split()
        if line.startswith("initial accuracy:"):
            clean = float(words[2].rstrip("%")) / 100.0
        if line.startswith("robust accuracy after "):
            total = float(words[-2])  # "(total time T s)": cumulative
            stages.append(
                {
                    "attack": words[3].rstrip(":").lower(),
                    "robust_accuracy": float(words[4].rstrip("%")) / 100.0,
                    "seconds": total - previous,
                }
            )
            previous = total
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "clean_accuracy": clean,
        "robust_accuracy": stages[-1]["robust_accuracy"] if stages else clean,
        "stages": stages,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


def markdown_rows(result: dict) -> str:
    j, t = result["jax"], result["torch"]
    stages = " / ".join(f"{s['robust_accuracy']:.3f}" for s in j["stages"])
    lines = [
        "| model | examples | eps | JAX s (compiled) | JAX s (1st, with compile) | PyTorch s | "
        "speed-up | robust acc. per stage JAX | PyTorch | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = " / ".join(f"{s['robust_accuracy']:.3f}" for s in t["stages"]) if t else "-"
    speed = f"{t['seconds'] / j['seconds']:.2f}" if t else "-"
    lines.append(
        f"| {result['model']} | {j['num_examples']} | {result['eps']:.4f} | {j['seconds']:.2f} | "
        f"{j['first_call_s_incl_compile']:.1f} | {t['seconds'] if t else float('nan'):.1f} | "
        f"{speed} | {stages} | {ref} | "
        f"{'/'.join(f'{v:.1f}' for v in j['loadavg_before'])} |"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    model, variables, tm, split, eps = setup(args)
    result: dict[str, Any] = {
        **result_header(
            "autoattack", args, versions={"torch": torch.__version__, "jax": jax.__version__}
        ),
        "eps": eps,
        "model": f"{args.export} ({model.__class__.__name__})" if args.export else args.model,
    }
    result["jax"] = run_jax(args, model, variables, split, eps)
    result["torch"] = None
    if not args.no_torch:
        result["torch"] = run_torch(args, tm, split, eps)
        result["speedup_jax_over_torch"] = result["torch"]["seconds"] / result["jax"]["seconds"]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-cnn", choices=models.MODEL_NAMES)
    parser.add_argument("--num-examples", type=int, default=-1, help="-1: the whole split")
    parser.add_argument("--batch", type=int, default=360, help="JAX batch (devices divide it)")
    parser.add_argument("--torch-batch", type=int, default=500)
    parser.add_argument("--eps", type=float, default=None, help="default 0.1 digits, 8/255 WRN")
    parser.add_argument("--norm", default=None, choices=tuple(NORMS), help="default linf")
    parser.add_argument("--width", type=int, default=32, help="small-cnn (configs/digits.py)")
    parser.add_argument("--hidden", type=int, default=128, help="small-cnn (configs/digits.py)")
    parser.add_argument("--train-steps", type=int, default=300, help="small-cnn Adam steps")
    parser.add_argument("--image-size", type=int, default=32, help="WRN input side")
    parser.add_argument("--conv-impl", default="auto", choices=layers.CONV_IMPLS)
    parser.add_argument("--export", default="", help="<workdir>/export of a trained model")
    parser.add_argument("--data-dir", default="", help="--export's dataset files (CIFAR)")
    parser.add_argument("--devices", type=int, default=0, help="first N devices (0: all)")
    parser.add_argument("--n-iter", type=int, default=0, help="reduce APGD/FAB iterations")
    parser.add_argument("--n-targets", type=int, default=0, help="reduce target classes")
    parser.add_argument("--n-queries", type=int, default=0, help="reduce Square's queries")
    parser.add_argument("--no-torch", action="store_true", help="skip pyautoattack")
    parser.add_argument("--json", required=True, help="where to write the results")
    args = parser.parse_args(argv)
    if args.num_examples == 0 or args.num_examples < -1:
        parser.error(f"--num-examples={args.num_examples}: -1 (all) or > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        result = run(args)
    except ScoreError as e:  # a bad --export: one line
        sys.exit(f"benchmarks.autoattack: error: {e}")
    write(result, args.json)
    print(markdown_rows(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
