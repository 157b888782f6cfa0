"""One 3x3 convolution, JAX implementations against PyTorch (where the train step's time goes).

    python -m benchmarks.conv --batch 64 --size 32 --channels 64 --json /tmp/conv.json

Times, per implementation (median of `--steps` calls after one untimed call):
  fwd        y = conv(x, w)
  fwd+bwd    value and gradient of sum(sin(conv(x, w))) w.r.t. x and w (the training loss's)
  fwd+x-grad value and gradient w.r.t. x only (one PGD iteration's), for JAX inside a
             `lax.fori_loop` of `--loop` iterations as the attack runs it, per iteration.
JAX: `score_jax.models.layers`' "xla" (native convolution), "im2col" (slices + one matrix
product) and "hybrid" (the native forward, im2col's gradients), compiled with the steps' own
`xla_options.compiler_options()`; PyTorch: `torch.nn.functional.conv2d` (oneDNN on CPU), same
threads.
"""

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.timing import time_calls
from score_jax import xla_options
from score_jax.models import layers

PAD = ((1, 1), (1, 1))
JAX_IMPLS = ("xla", "im2col", "hybrid")


def median_ms(fn: Callable[[], object], steps: int) -> float:
    """Median ms of `steps` calls of fn (which must block), after one untimed call."""
    return 1e3 * statistics.median(time_calls(fn, steps, 1))


def jax_times(impl: str, x: np.ndarray, w: np.ndarray, steps: int, loop: int) -> dict:
    conv = getattr(layers, f"conv_{impl}")
    x, w = jnp.asarray(x), jnp.asarray(w)

    def loss(x, w):
        return jnp.sum(jnp.sin(conv(x, w, (1, 1), PAD)))

    fwd = xla_options.jit(lambda x, w: conv(x, w, (1, 1), PAD))
    fwd_bwd = xla_options.jit(jax.value_and_grad(loss, (0, 1)))

    @xla_options.jit
    def attack(x, w):
        def body(_, d):
            return d + 1e-3 * jnp.sign(jax.grad(lambda d: loss(x + d, w))(d))

        return jax.lax.fori_loop(0, loop, body, jnp.zeros_like(x))

    return {
        "fwd_ms": median_ms(lambda: jax.block_until_ready(fwd(x, w)), steps),
        "fwd_bwd_ms": median_ms(lambda: jax.block_until_ready(fwd_bwd(x, w)), steps),
        "fwd_xgrad_ms": median_ms(lambda: jax.block_until_ready(attack(x, w)), steps) / loop,
    }


def torch_times(x: np.ndarray, w: np.ndarray, steps: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).requires_grad_(True)
    conv = torch.nn.functional.conv2d

    def fwd():
        with torch.no_grad():
            conv(xt, wt, padding=1)

    def fwd_bwd():
        torch.autograd.grad(torch.sin(conv(xt, wt, padding=1)).sum(), (xt, wt))

    def fwd_xgrad():
        torch.autograd.grad(torch.sin(conv(xt, wt, padding=1)).sum(), xt)

    return {
        "fwd_ms": median_ms(fwd, steps),
        "fwd_bwd_ms": median_ms(fwd_bwd, steps),
        "fwd_xgrad_ms": median_ms(fwd_xgrad, steps),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="height = width")
    p.add_argument("--channels", type=int, default=64, help="input = output channels")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--loop", type=int, default=4, help="attack iterations in the fori_loop")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    c = args.channels
    x = rng.normal(size=(args.batch, args.size, args.size, c)).astype(np.float32)
    w = (rng.normal(size=(3, 3, c, c)) * (2.0 / (9 * c)) ** 0.5).astype(np.float32)
    result = {
        **common.result_header("conv", args),
        "gflop_fwd": 2 * args.batch * args.size**2 * 9 * c * c / 1e9,
        "impls": {impl: jax_times(impl, x, w, args.steps, args.loop) for impl in JAX_IMPLS},
    }
    if not args.no_torch:
        result["impls"]["torch"] = torch_times(x, w, args.steps)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"| impl | fwd ms | fwd+bwd ms | fwd+x-grad ms ({result['gflop_fwd']:.2f} GFLOP fwd) |")
    print("|---|---|---|---|")
    for name, t in result["impls"].items():
        print(f"| {name} | {t['fwd_ms']:.1f} | {t['fwd_bwd_ms']:.1f} | {t['fwd_xgrad_ms']:.1f} |")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
