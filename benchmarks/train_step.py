"""Train-step throughput: the compiled JAX SCORE step against the same step in eager PyTorch.

    python -m benchmarks.train_step --model wrn-16-4 --batch 64 --steps 3 --loss trades-se \
        --conv-impl im2col --json /tmp/wrn16.json

The JAX step is training's own: `score_jax.setup.Setup` (model, schedules, optimizer, EMA
warm-up) on an injected synthetic CIFAR-shaped dataset and mesh, `Setup.compile_train_step`, the
config `common.make_config` (configs/cifar10_ddpm.py with the model, batch, loss, dtype and
convolution overridden). It runs on a device-resident batch (uint8 images, made by
`TrainBatcher.batch(0)` and `shard_batch` once). Compilation (`.lower().compile()`) is timed
apart; then the median of `--steps` steps, each ended by `block_until_ready`.

The PyTorch step (benchmarks/torch_reference.py) runs in a subprocess, with the same initial
weights (`export_state_dict`), batch, dtype and `torch.set_num_threads(os.cpu_count())`.

`flops_per_step` (benchmarks/profile.py `step_flops`) counts the whole step, the attack's loop
included; `xla_flops_raw` is the compiled program's own count on the device (loop body once; no
cuDNN calls). `--peak-flops` gives the MFU: flops_per_step / step time / (peak x devices).
`--breakdown` also times the step's parts in both frameworks, `--profile` traces one step in
both (benchmarks/profile.py), `--paired` times conv variants and PyTorch in turn
(benchmarks/paired.py).
"""

import argparse
import math
import statistics
import sys
import tempfile
import time
from typing import Any

import jax

from benchmarks import common
from benchmarks.common import CONV_CHOICES, LOSSES, result_header, write
from benchmarks.paired import markdown_paired, run_paired
from benchmarks.profile import add_estimates, jax_breakdown, profile_jax, step_flops
from benchmarks.timing import loadavg, peak_rss_mb, time_calls
from score_jax import train
from score_jax.models import layers
from score_jax.setup import Setup


def run_jax_train(
    setup: Setup, state, batch, steps: int, warmup: int, profile: bool = False
) -> dict:
    """Compiles (timed apart) and times the train step on the device-resident batch."""
    key = common.device_key(setup)
    fn = setup.compile_train_step()
    load_before = loadavg()
    t0 = time.perf_counter()
    lowered = fn.lower(state, batch, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    raw = common.flops_of(compiled.cost_analysis())
    flops, iteration = step_flops(setup, state, batch, key)
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], batch, key)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    cpu: list[float] = []
    times = time_calls(one, steps, warmup, cpu)
    median = statistics.median(times)
    extra = {"profile": profile_jax(one, compiled.as_text())} if profile else {}
    return {
        "framework": f"jax {jax.__version__} ({jax.default_backend()})",
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "step_s_all": times,
        "step_s_median": median,
        "step_cpu_s_all": cpu,
        "step_cpu_s_median": statistics.median(cpu),
        "images_per_s": setup.config.batch_size / median,
        "xla_flops_raw": raw,
        "attack_iteration_flops": iteration,
        "flops_per_step": flops,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        **extra,
        "_state": holder["state"],
    }


def markdown_row(result: dict) -> str:
    a, j, t = result["args"], result["jax"], result.get("torch")
    torch_ips = f"{t['images_per_s']:.2f}" if t else "-"
    ratio = f"{result['ratio_jax_over_torch']:.2f}" if t else "-"
    mfu = f"{100 * j['mfu']:.1f}%" if "mfu" in j else "-"
    header = (
        "| model | batch | loss | dtype | conv | JAX img/s | PyTorch img/s | JAX/PyTorch | "
        "compile s | GFLOP/step | GFLOP/s | MFU | JAX peak RSS MB | load |"
    )
    sep = "|" + "---|" * (header.count("|") - 1)
    row = (
        f"| {a['model']} | {a['batch']} | {a['loss']} | {a['dtype']} | {j['conv_impl']} | "
        f"{j['images_per_s']:.2f} | {torch_ips} | {ratio} | {j['compile_s']:.1f} | "
        f"{j['flops_per_step'] / 1e9:.1f} | {j['flop_per_s'] / 1e9:.1f} | "
        f"{mfu} | {j['peak_rss_mb']:.0f} | {'/'.join(f'{v:.1f}' for v in j['loadavg_before'])} |"
    )
    return "\n".join((header, sep, row))


def run(args: argparse.Namespace) -> dict:
    setup = common.train_setup(args)
    config = setup.config
    state = setup.initial_state()
    host_batch = setup.batcher.batch(0)
    batch = train.shard_batch(host_batch, setup.mesh)
    result: dict[str, Any] = {
        **result_header("train_step", args),
        "config": {
            "loss": config.loss.to_dict(),
            "attack": config.attack.to_dict(),
            "optim": config.optim.to_dict(),
            "ema": config.ema.to_dict(),
            "augment": config.augment.to_dict(),
        },
    }
    with tempfile.TemporaryDirectory() as workdir:
        spec = common.torch_spec(
            setup, "train", args.steps, args.warmup, args.breakdown, args.torch_channels_last
        )
        spec["profile"] = args.profile
        # The initial weights go to the reference; the JAX steps donate `state`.
        torch_state = None if args.no_torch else jax.device_get(state)
        j = run_jax_train(setup, state, batch, args.steps, args.warmup, args.profile)
        state = j.pop("_state")
        j["conv_impl"] = layers.resolve_conv_impl(args.conv_impl)
        j["flop_per_s"] = j["flops_per_step"] / j["step_s_median"]
        if args.peak_flops > 0:  # model FLOPs utilisation against the chip's peak
            j["mfu"] = j["flop_per_s"] / (args.peak_flops * setup.mesh.size)
        trades = config.loss.method == "trades"
        if args.breakdown:
            b = jax_breakdown(setup, state, host_batch, args.steps, args.warmup)
            j["breakdown"] = add_estimates(b, j["step_s_median"], config.attack.num_steps, trades)
        j["peak_rss_mb"] = peak_rss_mb()
        j["device_peak_mb"] = common.device_peak_mb()
        result["jax"] = j
        result["torch"] = None
        print(f"JAX: {j['images_per_s']:.2f} img/s, compile {j['compile_s']:.1f} s", flush=True)
        if not args.no_torch:
            try:
                t = common.run_torch(spec, torch_state, host_batch, workdir)
            except RuntimeError as e:  # keep the JAX measurement; main() reports the failure
                result["torch_error"] = str(e)
                return result
            if "breakdown" in t:
                t["breakdown"] = add_estimates(
                    t["breakdown"], t["step_s_median"], config.attack.num_steps, trades
                )
            result["torch"] = t
            result["ratio_jax_over_torch"] = j["images_per_s"] / t["images_per_s"]
            # Images per CPU-second (all threads): steadier than wall time on a shared machine.
            result["cpu_ratio_jax_over_torch"] = t["step_cpu_s_median"] / j["step_cpu_s_median"]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn-16-4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    parser.add_argument("--loss", default="trades-se", choices=LOSSES)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--conv-impl",
        default="auto",
        choices=CONV_CHOICES,
        help="the models' convolution (config.model.conv_impl; auto: hybrid on CPU)",
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps in training")
    parser.add_argument("--devices", type=int, default=0, help="first N devices (0: all)")
    parser.add_argument("--breakdown", action="store_true", help="also time the step's parts")
    parser.add_argument("--profile", action="store_true", help="op-level profile of one step")
    parser.add_argument(
        "--paired",
        default="",
        help="comma list of conv variants (e.g. im2col,xla,hybrid+ynn-conv; benchmarks/paired.py): "
        "time them and PyTorch in turn, "
        "one step each per round, PyTorch in this process (ignores --conv-impl, --breakdown, "
        "--profile)",
    )
    parser.add_argument(
        "--torch-variants",
        default="eager",
        help="with --paired: comma list of PyTorch setups, each a '+'-joined set of eager, "
        "channels_last, compile, bf16, fp32 (e.g. eager,channels_last,compile+channels_last)",
    )
    parser.add_argument(
        "--torch-compile-backend",
        default="inductor",
        help="torch.compile backend of the compile variants (aot_eager: no code generation)",
    )
    parser.add_argument(
        "--peak-flops", type=float, default=0.0, help="the device's peak FLOP/s: adds jax.mfu"
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument(
        "--torch-channels-last",
        action="store_true",
        help="PyTorch side in the channels_last (NHWC) layout instead of the reference's NCHW",
    )
    parser.add_argument("--json", required=True, help="where to write the results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.paired:
        result = run_paired(args)
        write(result, args.json)
        print(markdown_paired(result))
        return result
    result = run(args)
    write(result, args.json)
    print(markdown_row(result))
    if "torch_error" in result:
        sys.exit(
            f"PyTorch reference failed (JAX results written to {args.json}):\n"
            + result["torch_error"]
        )
    if math.isfinite(result.get("ratio_jax_over_torch", math.nan)):
        print(f"JAX/PyTorch images/s: {result['ratio_jax_over_torch']:.2f}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
