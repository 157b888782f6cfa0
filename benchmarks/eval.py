"""PGD evaluation throughput (JAX vs eager PyTorch) and the input pipeline's overhead.

    python -m benchmarks.eval --model wrn-16-4 --batch 64 --steps 3 --json /tmp/eval.json

1. PGD-20 evaluation: the library's evaluation path (`evaluate.run_evaluators` of the "clean"
   and "pgd" steps `evaluate.Evaluation.steps` builds: PGD-20 cross-entropy, uniform start,
   step 2/255 at Linf 8/255, `config.test.pgd` of configs/cifar10_ddpm.py) on one batch,
   compiled apart, median of `--steps` calls; against the same evaluation in eager PyTorch
   (benchmarks/torch_reference.py, subprocess, same weights and batch).
2. Input pipeline: train steps/s of the compiled train step (`Setup.compile_train_step`) fed
   the way `trainer.train_and_evaluate` feeds it, `shard_batch(TrainBatcher.batch(step))`
   each step with the metrics read one step late, against the same loop on one device-resident
   batch, and on real batches built and sharded before the loop ("prefetched"); the loops
   alternate `--rounds` times and the median per-step time of each is kept.
   `--data synthetic` is an in-memory CIFAR-shaped Dataset (`--num-train` random images),
   `--data digits` scikit-learn's digits. Also reported: the host time of
   `batch() + shard_batch()` alone. Target: overhead < 5%.
"""

import argparse
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from benchmarks import common
from benchmarks.timing import loadavg, peak_rss_mb, time_calls
from score_jax import data, evaluate, train
from score_jax.models import layers
from score_jax.setup import Setup


def eval_batch(dataset: data.Dataset, batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    """One full evaluation batch (mask all ones) drawn from the train split."""
    idx = np.random.default_rng(seed).integers(0, len(dataset.train), batch)
    return {
        "image": dataset.train.images[idx],
        "label": dataset.train.labels[idx],
        "mask": np.ones((batch,), np.float32),
    }


def run_jax_eval(setup: Setup, state, host_batch: dict, steps: int, warmup: int) -> dict:
    """The library's evaluation path of config.test.pgd: the steps `evaluate.Evaluation.steps`
    builds ("clean" and "pgd", `evaluate.compile_steps`), lowered and compiled apart (timed, and
    their FLOPs), then `evaluate.run_evaluators` on the batch as a split (its one host-to-device
    copy and final read included), median of `steps` calls after `warmup` (at least one: jit's
    own first call)."""
    spec = setup.config.test.pgd
    steps_fns = evaluate.Evaluation(setup.config, setup.model, setup.mesh).steps({"pgd": spec})
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    split = data.Split(host_batch["image"], host_batch["label"])
    batch = train.shard_batch(host_batch, setup.mesh)
    key = np.asarray(jax.random.key_data(jax.random.key(setup.config.seed + 1)))
    device_key = common.device_key(setup)
    load_before = loadavg()
    t0 = time.perf_counter()
    lowered = [fn.lower(variables, batch, device_key) for fn in steps_fns.values()]
    t1 = time.perf_counter()
    compiled = [low.compile() for low in lowered]
    t2 = time.perf_counter()
    raw = sum(common.flops_of(c.cost_analysis()) for c in compiled)
    cpu: list[float] = []
    times = time_calls(
        lambda: evaluate.run_evaluators(steps_fns, variables, split, len(split), setup.mesh, key),
        steps,
        max(warmup, 1),
        cpu,
    )
    median = statistics.median(times)
    return {
        "framework": f"jax {jax.__version__} ({jax.default_backend()})",
        "attack": spec.to_dict(),
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "step_s_all": times,
        "step_s_median": median,
        "step_cpu_s_all": cpu,
        "step_cpu_s_median": statistics.median(cpu),
        "images_per_s": len(host_batch["label"]) / median,
        "xla_flops_raw": raw,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


def pipeline_overhead(setup: Setup, state, steps: int, rounds: int) -> dict:
    """Per-step seconds of the trainer's loop with the real data path vs a resident batch, and
    with the real batches built and sharded ahead (outside the timed loop): real - prefetched is
    the cost of building batches in the loop, prefetched - resident that of new arrays."""
    step_fn = setup.compile_train_step()  # as the trainer calls it (host key, sharded batch)
    mesh, batcher, key = setup.mesh, setup.batcher, setup.key
    resident = train.shard_batch(batcher.batch(0), mesh)
    holder = {"state": state, "step": 0}

    def loop(mode: str) -> float:
        start = holder["step"]
        ahead = []
        if mode == "prefetched":
            ahead = [train.shard_batch(batcher.batch(start + k), mesh) for k in range(steps)]
        pending = None
        t0 = time.perf_counter()
        for k in range(steps):
            i = start + k
            if mode == "real":
                batch = train.shard_batch(batcher.batch(i), mesh)
            else:
                batch = ahead[k] if ahead else resident
            holder["state"], metrics = step_fn(holder["state"], batch, key)
            if pending is not None:
                jax.device_get(pending)  # the trainer reads the previous step's metrics
            pending = metrics
        jax.device_get(pending)
        jax.block_until_ready(holder["state"])
        holder["step"] = start + steps
        return (time.perf_counter() - t0) / steps

    load_before = loadavg()
    t0 = time.perf_counter()
    loop("resident")  # compiles, and warms every path
    compile_s = time.perf_counter() - t0
    loop("real")
    times: dict[str, list[float]] = {"resident": [], "real": [], "prefetched": []}
    for _ in range(rounds):
        for mode, values in times.items():
            values.append(loop(mode))
    host = time_calls(
        lambda: jax.block_until_ready(train.shard_batch(batcher.batch(holder["step"]), mesh)),
        max(steps, 20),
        1,
    )
    res, real, ahead = (statistics.median(times[m]) for m in ("resident", "real", "prefetched"))
    host_ms = 1e3 * statistics.median(host)
    return {
        "data": setup.dataset.name,
        "num_train": len(setup.dataset.train),
        "steps_per_round": steps,
        "rounds": rounds,
        "first_loop_s_incl_compile": compile_s,
        "resident_step_s_all": times["resident"],
        "real_step_s_all": times["real"],
        "prefetched_step_s_all": times["prefetched"],
        "resident_steps_per_s": 1.0 / res,
        "real_steps_per_s": 1.0 / real,
        "prefetched_steps_per_s": 1.0 / ahead,
        "overhead_pct": 100.0 * (real - res) / res,
        "prefetched_overhead_pct": 100.0 * (ahead - res) / res,
        "host_batch_ms": host_ms,
        "host_batch_pct_of_step": 100.0 * host_ms / (1e3 * res),
        "target_pct": 5.0,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }


def markdown_rows(result: dict) -> str:
    a, j, t, p = result["args"], result["jax"], result.get("torch"), result.get("pipeline")
    lines = [
        "| model | batch | PGD | dtype | conv | JAX img/s | PyTorch img/s | JAX/PyTorch | "
        "compile s | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {a['model']} | {a['batch']} | {a['attack_steps']} | {a['dtype']} | {j['conv_impl']} | "
        f"{j['images_per_s']:.2f} | {t['images_per_s']:.2f} | "
        f"{result['ratio_jax_over_torch']:.2f} | {j['compile_s']:.1f} | "
        f"{'/'.join(f'{v:.1f}' for v in j['loadavg_before'])} |"
        if t
        else f"| {a['model']} | {a['batch']} | {a['attack_steps']} | {a['dtype']} | "
        f"{j['conv_impl']} | {j['images_per_s']:.2f} | - | - | {j['compile_s']:.1f} | "
        f"{'/'.join(f'{v:.1f}' for v in j['loadavg_before'])} |",
    ]
    if p:
        lines += [
            "",
            "| data | resident steps/s | real-path steps/s | overhead % | prefetched overhead % "
            "| host batch ms | host % of step |",
            "|---|---|---|---|---|---|---|",
            f"| {p['data']} (N={p['num_train']}) | {p['resident_steps_per_s']:.3f} | "
            f"{p['real_steps_per_s']:.3f} | {p['overhead_pct']:+.1f} | "
            f"{p['prefetched_overhead_pct']:+.1f} | {p['host_batch_ms']:.2f} | "
            f"{p['host_batch_pct_of_step']:.2f} |",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    config = common.make_config(
        args.model,
        args.batch,
        args.loss,
        dtype=args.dtype,
        conv_impl=args.conv_impl,
        attack_steps=args.train_attack_steps,
        eval_steps=args.attack_steps,
    )
    if args.data == "digits":
        config.dataset.name = "digits"
        config.dataset.num_validation = 180  # digits' fixed split (checked by validate)
        config.augment.flip = False
        dataset = data.get_dataset(config.dataset)
    else:
        dataset = common.synthetic_dataset(args.image_size, args.num_train)
    setup = common.bench_setup(config, dataset, args.devices)
    state = setup.initial_state()
    host_batch = eval_batch(dataset, args.batch)
    result: dict[str, Any] = common.result_header("eval", args)
    j = run_jax_eval(setup, state, host_batch, args.steps, args.warmup)
    j["conv_impl"] = layers.resolve_conv_impl(args.conv_impl)
    j["peak_rss_mb"] = peak_rss_mb()
    result["jax"] = j
    result["torch"] = None
    if not args.no_torch:
        with tempfile.TemporaryDirectory() as workdir:
            spec = common.torch_spec(setup, "eval", args.steps, args.warmup, False)
            t = common.run_torch(spec, jax.device_get(state), host_batch, workdir)
        result["torch"] = t
        result["ratio_jax_over_torch"] = j["images_per_s"] / t["images_per_s"]
        result["cpu_ratio_jax_over_torch"] = t["step_cpu_s_median"] / j["step_cpu_s_median"]
    result["pipeline"] = None
    if args.pipeline_steps > 0:
        result["pipeline"] = pipeline_overhead(setup, state, args.pipeline_steps, args.rounds)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn-16-4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed evaluation calls (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--attack-steps", type=int, default=20, help="PGD steps in evaluation")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--conv-impl", default="auto", choices=common.CONV_CHOICES)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--devices", type=int, default=0, help="first N devices (0: all)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "digits"))
    parser.add_argument("--num-train", type=int, default=50000, help="synthetic train images")
    parser.add_argument(
        "--pipeline-steps", type=int, default=5, help="train steps per loop (0: skip)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two loops")
    parser.add_argument(
        "--loss", default="trades-se", choices=common.LOSSES, help="pipeline's step"
    )
    parser.add_argument(
        "--train-attack-steps", type=int, default=10, help="PGD steps of the pipeline's step"
    )
    parser.add_argument("--json", required=True, help="where to write the results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    common.write(result, args.json)
    print(markdown_rows(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
