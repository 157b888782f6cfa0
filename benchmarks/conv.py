"""One 3x3 convolution, JAX implementations against PyTorch (where the train step's time goes).

    python -m benchmarks.conv --batch 64 --size 32 --channels 64 --json /tmp/conv.json

Times, per implementation (median of `--steps` calls after one untimed call):
  fwd        y = conv(x, w)
  fwd+bwd    value and gradient of sum(sin(conv(x, w))) w.r.t. x and w (the training loss's)
  fwd+x-grad value and gradient w.r.t. x only (one PGD iteration's), for JAX inside a
             `lax.fori_loop` of `--loop` iterations as the attack runs it, per iteration.
`--layers wrn-16-4` / `--layers small-cnn` instead times, for each convolution shape of that
model (batch `--batch`), the forward, the kernel gradient and the input gradient alone (one
jitted vjp each; `--layer-loop N`: the forward and input gradient per iteration of a `fori_loop`
of N, as the attacks run them; PyTorch: `conv2d` and `torch.nn.grad`'s two gradients, one call
each, as its attacks run them), with the forward's GFLOP/s, next to the GFLOP/s of one 2048 x 2048
float32 matrix product on each side (a reference rate, not a peak: oneDNN's convolutions can
exceed it; `matmul_gflops`).
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
# The same for configs/digits.py's small CNN (8x8x1 digits, width 32).
SMALL_CNN_LAYERS = ((8, 1, 32, 3, 1), (8, 32, 64, 3, 2), (4, 64, 64, 3, 1))
LAYERS = {"wrn-16-4": WRN_16_4_LAYERS, "small-cnn": SMALL_CNN_LAYERS}


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


def _layer_arrays(layer: tuple, batch: int) -> tuple[np.ndarray, np.ndarray]:
    size, cin, cout, k, _ = layer
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, cin)).astype(np.float32)
    w = (rng.normal(size=(k, k, cin, cout)) * (2.0 / (k * k * cin)) ** 0.5).astype(np.float32)
    return x, w


def layer_gflop(layer: tuple, batch: int) -> float:
    """GFLOP of one layer's forward: 2 * batch * output pixels * k * k * cin * cout."""
    size, cin, cout, k, stride = layer
    out = -(-size // stride)  # output side: ceil(size / stride) at padding k // 2
    return 2 * batch * out * out * k * k * cin * cout / 1e9


def matmul_gflops(steps: int, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of an n x n float32 matrix product, JAX (and PyTorch where installed)."""
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    gflop = 2 * n**3 / 1e9
    dot = xla_options.jit(jnp.dot)
    aj = jnp.asarray(a)
    out = {"jax": gflop / median_ms(lambda: jax.block_until_ready(dot(aj, aj)), steps) * 1e3}
    try:
        import torch
    except ImportError:
        return out
    at = torch.from_numpy(a)
    out["torch"] = gflop / median_ms(lambda: at @ at, steps) * 1e3
    return out


def layer_times(impl: str, layer: tuple, batch: int, steps: int, loop: int = 1) -> dict:
    """ms of the forward, the kernel gradient and the input gradient of one layer shape: one
    jitted call each, or (`loop` > 1) the forward and the input gradient per iteration of a
    `lax.fori_loop` of `loop` of them, as the attacks run them (each iteration's input depends
    on the previous result). The kernel gradient is always one call, as a train step takes it
    (inside a loop XLA:CPU ran the native one ~100x slower: 300-430 ms against 3-4 ms)."""
    _, _, _, k, stride = layer
    conv = getattr(layers, f"conv_{impl}")
    pad, strides = ((k // 2, k // 2),) * 2, (stride, stride)
    x, w = (jnp.asarray(a) for a in _layer_arrays(layer, batch))
    g = jnp.ones(jax.eval_shape(lambda x, w: conv(x, w, strides, pad), x, w).shape, jnp.float32)

    def part(name: str) -> Callable:
        def once(x, w, g):
            if name == "fwd":
                return conv(x, w, strides, pad)
            return jax.vjp(lambda a, b: conv(a, b, strides, pad), x, w)[1](g)[name == "dw"]

        if loop == 1 or name == "dw":
            return xla_options.jit(once)

        def looped(x, w, g):
            def body(_, c):
                return c + 1e-9 * jnp.sum(once(x + c, w, g + c))

            return jax.lax.fori_loop(0, loop, body, jnp.float32(0.0))

        return xla_options.jit(looped)

    out = {}
    for key, name in (("fwd_ms", "fwd"), ("kernel_grad_ms", "dw"), ("input_grad_ms", "dx")):
        fn = part(name)
        per = 1 if name == "dw" else loop
        out[key] = median_ms(lambda fn=fn: jax.block_until_ready(fn(x, w, g)), steps) / per
    return out


def torch_layer_times(layer: tuple, batch: int, steps: int) -> dict:
    """`layer_times` of PyTorch: conv2d, torch.nn.grad.conv2d_weight / conv2d_input."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    _, _, _, k, stride = layer
    x, w = _layer_arrays(layer, batch)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
    kw = dict(stride=stride, padding=k // 2)
    with torch.no_grad():
        g = torch.ones_like(torch.nn.functional.conv2d(xt, wt, **kw))
        return {
            "fwd_ms": median_ms(lambda: torch.nn.functional.conv2d(xt, wt, **kw), steps),
            "kernel_grad_ms": median_ms(
                lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, g, **kw), steps
            ),
            "input_grad_ms": median_ms(
                lambda: torch.nn.grad.conv2d_input(xt.shape, wt, g, **kw), steps
            ),
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
    p.add_argument("--layers", choices=tuple(LAYERS), help="time each layer shape's gradients")
    p.add_argument("--layer-loop", type=int, default=1, help="--layers: fori_loop iterations")
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
    impls = JAX_IMPLS if args.no_torch else (*JAX_IMPLS, "torch")

    def times(impl: str, layer: tuple) -> dict:
        if impl == "torch":
            return torch_layer_times(layer, args.batch, args.steps)
        return layer_times(impl, layer, args.batch, args.steps, args.layer_loop)

    rows = []
    for layer in LAYERS[args.layers]:
        row = {"layer": dict(zip(("size", "cin", "cout", "kernel", "stride"), layer, strict=True))}
        row["gflop_fwd"] = layer_gflop(layer, args.batch)
        for impl in impls:
            row[impl] = times(impl, layer)
            row[impl]["fwd_gflops"] = row["gflop_fwd"] / row[impl]["fwd_ms"] * 1e3
        rows.append(row)
    result = {
        **common.result_header("conv_layers", args),
        "matmul_gflops": matmul_gflops(args.steps),
        "layers": rows,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    parts = ("fwd_ms", "kernel_grad_ms", "input_grad_ms")
    peak = ", ".join(f"{k} {v:.0f}" for k, v in result["matmul_gflops"].items())
    print(f"2048^2 float32 matmul GFLOP/s: {peak}")
    print("| layer | " + " | ".join(f"{p} {i}" for p in parts for i in impls) + " | fwd GFLOP/s |")
    print("|---|" + "---|" * (len(parts) * len(impls) + 1))
    for row in rows:
        size, cin, cout, k, stride = row["layer"].values()
        cells = " | ".join(f"{row[i][p]:.2f}" for p in parts for i in impls)
        rates = " / ".join(f"{row[i]['fwd_gflops']:.0f}" for i in impls)
        print(f"| {size}px {cin}->{cout} {k}x{k} s{stride} | {cells} | {rates} |")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
