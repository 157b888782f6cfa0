"""One 3x3 convolution, JAX implementations against PyTorch (where the train step's time goes).

    python -m benchmarks.conv --batch 64 --size 32 --channels 64 --json /tmp/conv.json

Times, per implementation (median of `--steps` calls after one untimed call):
  fwd        y = conv(x, w)
  fwd+bwd    value and gradient of sum(sin(conv(x, w))) w.r.t. x and w (the training loss's)
  fwd+x-grad value and gradient w.r.t. x only (one PGD iteration's), for JAX inside a
             `lax.fori_loop` of `--loop` iterations as the attack runs it, per iteration.
`--layers wrn-16-4` instead times, for each convolution shape of WRN-16-4 (batch `--batch`),
the forward, the kernel gradient and the input gradient alone (one jitted vjp each).
JAX: `score_jax.models.layers`' "xla" (native convolution), "im2col" (slices + one matrix
product) and "hybrid" (the native forward, each gradient native or im2col's), compiled with the
steps' own `xla_options.compiler_options()`; PyTorch: `torch.nn.functional.conv2d` (oneDNN on
CPU), same threads.
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
# (height = width, in channels, out channels, kernel, stride) of each WRN-16-4 convolution;
# padding 1 for 3x3, 0 for 1x1.
WRN_16_4_LAYERS = (
    (32, 3, 16, 3, 1),
    (32, 16, 64, 3, 1),
    (32, 64, 64, 3, 1),
    (32, 16, 64, 1, 1),
    (32, 64, 128, 3, 2),
    (16, 128, 128, 3, 1),
    (32, 64, 128, 1, 2),
    (16, 128, 256, 3, 2),
    (8, 256, 256, 3, 1),
    (16, 128, 256, 1, 2),
)


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


def layer_times(impl: str, layer: tuple, batch: int, steps: int) -> dict:
    """ms of the forward, the kernel gradient and the input gradient of one WRN layer shape."""
    size, cin, cout, k, stride = layer
    conv = getattr(layers, f"conv_{impl}")
    pad, strides = ((k // 2, k // 2),) * 2, (stride, stride)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * (2.0 / (k * k * cin)) ** 0.5, jnp.float32)
    fwd = xla_options.jit(lambda x, w: conv(x, w, strides, pad))
    g = jnp.ones(jax.eval_shape(fwd, x, w).shape, jnp.float32)

    def grad(arg):
        return xla_options.jit(
            lambda x, w, g: jax.vjp(lambda a, b: conv(a, b, strides, pad), x, w)[1](g)[arg]
        )

    dw, dx = grad(1), grad(0)
    return {
        "fwd_ms": median_ms(lambda: jax.block_until_ready(fwd(x, w)), steps),
        "kernel_grad_ms": median_ms(lambda: jax.block_until_ready(dw(x, w, g)), steps),
        "input_grad_ms": median_ms(lambda: jax.block_until_ready(dx(x, w, g)), steps),
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
    p.add_argument("--layers", choices=["wrn-16-4"], help="time each layer shape's gradients")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    if args.layers:
        return main_layers(args)
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


def main_layers(args: argparse.Namespace) -> dict:
    rows = [
        {
            "layer": dict(zip(("size", "cin", "cout", "kernel", "stride"), layer, strict=True)),
            **{impl: layer_times(impl, layer, args.batch, args.steps) for impl in JAX_IMPLS},
        }
        for layer in WRN_16_4_LAYERS
    ]
    result = {**common.result_header("conv_layers", args), "layers": rows}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    parts = ("fwd_ms", "kernel_grad_ms", "input_grad_ms")
    print("| layer | " + " | ".join(f"{p} {i}" for p in parts for i in JAX_IMPLS) + " |")
    print("|---|" + "---|" * (len(parts) * len(JAX_IMPLS)))
    for row in rows:
        size, cin, cout, k, stride = row["layer"].values()
        cells = " | ".join(f"{row[i][p]:.1f}" for p in parts for i in JAX_IMPLS)
        print(f"| {size}px {cin}->{cout} {k}x{k} s{stride} | {cells} |")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
