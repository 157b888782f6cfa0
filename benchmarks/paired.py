"""`benchmarks.train_step --paired`: JAX conv variants and PyTorch timed in turn, one step each.

    python -m benchmarks.train_step --model wrn-16-4 --paired im2col,xla --json /tmp/paired.json

The compiled JAX step of each conv variant (`Setup.compile_train_step`) and the PyTorch step
(benchmarks/torch_reference.py, in this process) are called in turn, one step each per round:
every round sees the same machine load, so the per-round ratios stay meaningful on a shared
machine where the load drifts. A variant `<conv>+ynn-conv` compiles with jaxlib's default
YNNPACK fusions, convolutions included (`JAXLIB_YNN_FUSIONS`), instead of the steps' own
`xla_options.compiler_options()`.

`--torch-variants` (default `eager`) names the PyTorch setups timed in the same rounds, each a
`+`-joined set of `eager` (the reference: NCHW, no compilation), `channels_last` (NHWC memory
layout), `compile` (`torch.compile` of the model, backend `--torch-compile-backend`), `bf16` /
`fp32` (autocast to bfloat16 or none, overriding `--dtype`):

    python -m benchmarks.train_step --model wrn-28-10 --batch 512 --dtype bfloat16 --paired xla \
        --torch-variants eager,channels_last,compile,compile+channels_last --json paired.json

`eager` is named `torch` in the JSON, every other one `torch:<variant>`; `ratio_jax_over_torch`
is against the first, `ratio_jax_over_torch_variants` against each. A compiled variant's first
call (its compilation, every mode's graphs) is timed apart (`first_call_s`), before the rounds.
"""

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from benchmarks import common
from benchmarks.timing import loadavg, peak_rss_mb, time_calls
from score_jax import train, xla_options

YNN_CONV = "+ynn-conv"
# jaxlib 0.10.2's default list (the same compiled program as no option at all).
JAXLIB_YNN_FUSIONS = xla_options.CPU_YNN_FUSIONS + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
TORCH_TOKENS = ("eager", "channels_last", "compile", "bf16", "fp32")


def torch_variant(variant: str, base: dict, backend: str) -> dict:
    """The reference's spec for one `--torch-variants` entry (see the module docstring)."""
    tokens = variant.split("+")
    unknown = sorted(set(tokens) - set(TORCH_TOKENS))
    if unknown or not tokens or ("bf16" in tokens and "fp32" in tokens):
        raise ValueError(
            f"--torch-variants: bad variant {variant!r}; a '+'-joined set of {TORCH_TOKENS} "
            "(not both bf16 and fp32)"
        )
    spec = dict(base, channels_last="channels_last" in tokens, compile="compile" in tokens)
    spec["compile_backend"] = backend
    if "bf16" in tokens:
        spec["dtype"] = "bfloat16"
    elif "fp32" in tokens:
        spec["dtype"] = "float32"
    return spec


def torch_name(variant: str) -> str:
    return "torch" if variant == "eager" else f"torch:{variant}"


@dataclasses.dataclass(frozen=True)
class JaxVariant:
    """One JAX step of the rounds: its convolution, compile options (None: the steps' own,
    `xla_options.compiler_options()`) and whether it has the divergence guard."""

    conv_impl: str
    compiler_options: dict[str, Any] | None = None
    divergence_guard: bool = True


def parse_jax_variants(paired: str) -> dict[str, JaxVariant]:
    """`--paired`'s comma list: `<conv>` or `<conv>+ynn-conv` (see the module docstring)."""
    variants = [v for v in paired.split(",") if v]
    unknown = {v for v in variants if v.removesuffix(YNN_CONV) not in common.CONV_CHOICES}
    if unknown:
        raise ValueError(
            f"--paired: unknown conv variants {sorted(unknown)}; valid {common.CONV_CHOICES}, "
            f"each optionally with {YNN_CONV!r}"
        )
    ynn = {xla_options.YNN_FUSION_OPTION: JAXLIB_YNN_FUSIONS}
    return {
        v: JaxVariant(v.removesuffix(YNN_CONV), ynn if YNN_CONV in v else None) for v in variants
    }


def run_paired(
    args: argparse.Namespace,
    jax_variants: dict[str, JaxVariant] | None = None,
    keep: dict[str, Any] | None = None,
) -> dict:
    """Times each JAX variant (default: `--paired`'s) and each PyTorch setup, `args.steps`
    rounds (see the module docstring). A variant whose compile options the backend rejects is
    reported (its "error") and left out of the rounds. `keep`, if given, receives the first
    variant's "setup" and its initial "state" (host copy)."""
    import torch

    from benchmarks import torch_reference
    from score_jax.torch_bridge.convert import export_state_dict

    if jax_variants is None:
        jax_variants = parse_jax_variants(args.paired)
    dataset = common.synthetic_dataset(args.image_size, max(4 * args.batch, 256))
    runners: dict[str, Callable[[], object]] = {}
    out: dict[str, Any] = {}
    setups: dict[str, tuple[Any, Any]] = {}
    setup = initial = None
    for v, spec in jax_variants.items():
        if spec.conv_impl not in setups:
            config = common.make_config(
                args.model, args.batch, args.loss, dtype=args.dtype, conv_impl=spec.conv_impl,
                attack_steps=args.attack_steps,
            )  # fmt: skip
            s = common.bench_setup(config, dataset, args.devices)
            setups[spec.conv_impl] = (s, s.initial_state())
        setup, base_state = setups[spec.conv_impl]
        state = jax.tree.map(lambda x: x.copy(), base_state)  # each variant donates its own
        batch = train.shard_batch(setup.batcher.batch(0), setup.mesh)
        key = common.device_key(setup)
        if initial is None:
            initial = jax.device_get(state)
            if keep is not None:
                keep.update(setup=setup, state=initial)
        options = spec.compiler_options
        out[v] = {
            "conv_impl": spec.conv_impl,
            "compiler_options": options or xla_options.compiler_options(),
            "divergence_guard": spec.divergence_guard,
            "step_s_all": [],
        }
        t0 = time.perf_counter()
        lowered = setup.compile_train_step(spec.divergence_guard).lower(state, batch, key)
        try:
            compiled = lowered.compile(compiler_options=options)
        except (jax.errors.JaxRuntimeError, ValueError, TypeError) as e:
            if options is None:
                raise
            out[v]["error"] = " ".join(str(e).split())[:300]
            continue
        out[v]["compile_s"] = time.perf_counter() - t0
        holder = {"state": state}

        def one(compiled=compiled, holder=holder, batch=batch, key=key):
            holder["state"], metrics = compiled(holder["state"], batch, key)
            jax.block_until_ready((holder["state"], metrics))

        runners[v] = one
    variants = [v for v in jax_variants if v in runners]
    if not variants:
        raise ValueError(f"no JAX variant compiled: {out}")
    torch_variants = [] if args.no_torch else [v for v in args.torch_variants.split(",") if v]
    if torch_variants:
        torch.set_num_threads(os.cpu_count() or 1)
        base = common.torch_spec(setup, "train", args.steps, args.warmup, False)
        variables = {"params": initial.params, "batch_stats": initial.batch_stats}
        state_dict = export_state_dict(base["model_name"], variables)
        host = setup.batcher.batch(0)
        for tv in torch_variants:
            spec = torch_variant(tv, base, args.torch_compile_backend)
            ref, images, labels = torch_reference.build(
                spec, state_dict, host["image"], host["label"]
            )

            def step(ref=ref, images=images, labels=labels):
                ref.train_step(images, labels)
                ref.sync()

            name = torch_name(tv)
            runners[name] = step
            out[name] = {"framework": torch_reference.framework(spec), "step_s_all": []}
            if spec["compile"]:
                out[name]["first_call_s"] = time_calls(step, 1, 0)[0]
    for fn in runners.values():
        time_calls(fn, 0, args.warmup)
    rounds = []
    for _ in range(args.steps):
        row: dict[str, Any] = {"loadavg": loadavg()}
        for name, fn in runners.items():
            t = time_calls(fn, 1, 0)[0]
            out[name]["step_s_all"].append(t)
            row[name] = t
        rounds.append(row)
    for d in out.values():
        if d["step_s_all"]:
            d["step_s_median"] = statistics.median(d["step_s_all"])
            d["images_per_s"] = args.batch / d["step_s_median"]
    result: dict[str, Any] = {
        **common.result_header("train_step_paired", args),
        "variants": out,
        "rounds": rounds,
        "peak_rss_mb_process": peak_rss_mb(),
    }
    if torch_variants:
        per_setup = {
            torch_name(tv): {
                v: statistics.median(r[torch_name(tv)] / r[v] for r in rounds) for v in variants
            }
            for tv in torch_variants
        }
        result["ratio_jax_over_torch"] = per_setup[torch_name(torch_variants[0])]
        result["ratio_jax_over_torch_variants"] = per_setup
    first = variants[0]
    result[f"speedup_vs_{first}"] = {
        v: statistics.median(r[first] / r[v] for r in rounds) for v in variants
    }
    return result


def markdown_paired(result: dict) -> str:
    a = result["args"]
    lines = [
        "| model | batch | loss | variant | s/step (median) | img/s | JAX/PyTorch (median of "
        "per-round ratios) | load (first round) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratios = result.get("ratio_jax_over_torch", {})
    load = "/".join(f"{v:.1f}" for v in result["rounds"][0]["loadavg"])
    for name, d in result["variants"].items():
        if "error" in d:
            lines.append(f"| {a['model']} | {a['batch']} | {a['loss']} | {name} | rejected: "
                         f"{d['error'][:120]} | - | - | {load} |")  # fmt: skip
            continue
        ratio = f"{ratios[name]:.2f}" if name in ratios else "-"
        lines.append(
            f"| {a['model']} | {a['batch']} | {a['loss']} | {name} | {d['step_s_median']:.3g} | "
            f"{d['images_per_s']:.2f} | {ratio} | {load} |"
        )
    per_setup = result.get("ratio_jax_over_torch_variants", {})
    if len(per_setup) > 1:
        jax_variants = list(next(iter(per_setup.values())))
        lines += ["", "| JAX / PyTorch setup | " + " | ".join(per_setup) + " |"]
        lines.append("|---|" + "---|" * len(per_setup))
        for v in jax_variants:
            cells = " | ".join(f"{r[v]:.2f}" for r in per_setup.values())
            lines.append(f"| {v} | {cells} |")
    return "\n".join(lines)
