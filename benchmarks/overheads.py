"""The per-step cost of the divergence guard and the per-save cost of the checkpoint checksums,
each measured side by side: with and without, alternating within the same rounds.

    python -m benchmarks.overheads --model wrn-16-4 --batch 64 --steps 5 --saves 5 \
        --json /tmp/overheads.json

Guard: training's train step (`Setup.compile_train_step`) compiled twice, with the divergence
guard (`train.train_step`: the loss, the gradient and the whole updated state checked finite,
the state kept or discarded by one select) and without it (`divergence_guard=False`); each round
times one step of each, the order alternating. `overhead_pct` is the median over rounds of
(with / without - 1), `overhead_ms` the median of the differences.

Checksums: `checkpoint.Checkpointer.save` (CRC-32 of every state leaf on the host, then orbax's
save) against the same orbax save without the checksums in the meta, both in `--workdir`
(default a temporary local directory; a gs:// path measures a bucket). Per save: the blocking
part (until `save` returns: the host copy and the checksums; orbax writes in the background on
one process) and the total (until `wait_until_finished`); `checksum_s` is `checkpoint.checksums`
alone. Restores likewise: `Checkpointer.restore` (verifies the checksums) against orbax's
restore alone.
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import common
from benchmarks.common import CONV_CHOICES, LOSSES
from benchmarks.timing import loadavg, time_calls
from score_jax import checkpoint, train
from score_jax.setup import Setup

GUARD = ("with_guard", "without_guard")
CHECKSUMS = ("with_checksums", "without_checksums")


def _copy(state: Any) -> Any:
    """A separate copy of the (replicated) device state: each compiled step donates its own."""
    return jax.tree.map(lambda x: x.copy(), state)


def _paired(rounds: int, calls: dict[str, Callable[[], dict[str, float]]]) -> dict[str, Any]:
    """Runs `calls` (each returning named times in s) in turn for `rounds` rounds, the order
    alternating; {name: {time name: [per round]}} and the per-round load averages."""
    names = list(calls)
    out: dict[str, Any] = {n: {} for n in names}
    loads = []
    for i in range(rounds):
        loads.append(loadavg())
        for name in names if i % 2 == 0 else names[::-1]:
            for k, t in calls[name]().items():
                out[name].setdefault(k, []).append(t)
    return {"times": out, "loadavg": loads}


def _compare(times: dict[str, dict[str, list[float]]], with_: str, without: str, key: str) -> dict:
    a, b = times[with_][key], times[without][key]
    return {
        f"{with_}_{key}_median": statistics.median(a),
        f"{without}_{key}_median": statistics.median(b),
        "overhead_ms": 1e3 * statistics.median(x - y for x, y in zip(a, b, strict=True)),
        "overhead_pct": 100 * statistics.median(x / y - 1 for x, y in zip(a, b, strict=True)),
    }


def measure_guard(setup: Setup, state: Any, batch: Any, steps: int, warmup: int) -> dict:
    """The train step with and without the divergence guard, `steps` paired rounds."""
    key = common.device_key(setup)
    out: dict[str, Any] = {}
    calls = {}
    for name, guard in zip(GUARD, (True, False), strict=True):
        holder = {"state": _copy(state)}
        t0 = time.perf_counter()
        step = setup.compile_train_step(divergence_guard=guard)
        compiled = step.lower(holder["state"], batch, key).compile()
        out[f"{name}_compile_s"] = time.perf_counter() - t0

        def one(compiled=compiled, holder=holder) -> dict[str, float]:
            t0 = time.perf_counter()
            holder["state"], metrics = compiled(holder["state"], batch, key)
            jax.block_until_ready((holder["state"], metrics))
            return {"step_s": time.perf_counter() - t0}

        time_calls(one, 0, warmup)
        calls[name] = one
    paired = _paired(steps, calls)
    out.update(paired)
    out.update(_compare(paired["times"], *GUARD, "step_s"))
    return out


def measure_checksums(state: Any, saves: int, workdir: str) -> dict:
    """Saves and restores of `state` with and without the checksums, `saves` paired rounds."""
    host = jax.device_get(state)
    state_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(host))
    ckpt = checkpoint.Checkpointer(workdir, keep=2)
    meta = {"benchmark": "overheads"}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    steps = iter(range(1, 10**9))
    saved: dict[str, int] = {}

    def save(name: str) -> dict[str, float]:
        step = next(steps)
        t0 = time.perf_counter()
        if name == "with_checksums":
            ckpt.save(step, state, meta)
        else:
            ckpt.last.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
            )
        t1 = time.perf_counter()
        ckpt.wait()
        t2 = time.perf_counter()
        saved[name] = step
        t3 = time.perf_counter()
        if name == "with_checksums":
            restored, _ = ckpt.restore(state, step)  # verifies the checksums
        else:
            restored = ckpt.last.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )["state"]
        jax.block_until_ready(restored)
        t4 = time.perf_counter()
        return {"save_blocking_s": t1 - t0, "save_total_s": t2 - t0, "restore_s": t4 - t3}

    try:
        save("with_checksums")  # orbax's first save sets up its thread pools: untimed
        paired = _paired(saves, {name: lambda name=name: save(name) for name in CHECKSUMS})
    finally:
        ckpt.close()
    times = paired["times"]
    checksum_s = time_calls(lambda: checkpoint.checksums(state), saves, 1)
    return {
        "state_bytes": state_bytes,
        "workdir": workdir,
        "checksum_s_all": checksum_s,
        "checksum_s_median": statistics.median(checksum_s),
        "checksum_gb_per_s": state_bytes / statistics.median(checksum_s) / 1e9,
        **paired,
        "save_blocking": _compare(times, *CHECKSUMS, "save_blocking_s"),
        "save_total": _compare(times, *CHECKSUMS, "save_total_s"),
        "restore": _compare(times, *CHECKSUMS, "restore_s"),
    }


def run(args: argparse.Namespace) -> dict:
    setup = common.train_setup(args)
    state = setup.initial_state()
    result: dict[str, Any] = common.result_header("overheads", args)
    result["num_params"] = int(sum(np.size(x) for x in jax.tree.leaves(state.params)))
    what = [w for w in args.what.split(",") if w]
    unknown = sorted(set(what) - {"guard", "checksums"})
    if unknown:
        raise ValueError(f"--what: unknown {unknown}; valid: guard, checksums")
    if "checksums" in what:
        if args.workdir:
            result["checksums"] = measure_checksums(state, args.saves, args.workdir)
        else:
            with tempfile.TemporaryDirectory() as workdir:
                result["checksums"] = measure_checksums(state, args.saves, workdir)
    if "guard" in what:
        batch = train.shard_batch(setup.batcher.batch(0), setup.mesh)
        result["guard"] = measure_guard(setup, state, batch, args.steps, args.warmup)
    return result


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "| model | batch | dtype | what | with | without | overhead | overhead % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    head = f"| {a['model']} | {a['batch']} | {a['dtype']} |"
    if "guard" in result:
        g = result["guard"]
        lines.append(
            f"{head} divergence guard, s/step | {g['with_guard_step_s_median']:.4g} | "
            f"{g['without_guard_step_s_median']:.4g} | {g['overhead_ms']:.2f} ms | "
            f"{g['overhead_pct']:.2f} |"
        )
    if "checksums" in result:
        c = result["checksums"]
        for part in ("save_blocking", "save_total", "restore"):
            d = c[part]
            lines.append(
                f"{head} checksums, {part.replace('_', ' ')} s | "
                f"{d[f'with_checksums_{part}_s_median']:.4g} | "
                f"{d[f'without_checksums_{part}_s_median']:.4g} | {d['overhead_ms']:.2f} ms | "
                f"{d['overhead_pct']:.2f} |"
            )
        lines.append(
            f"\nstate: {c['state_bytes'] / 1e6:.1f} MB; `checkpoint.checksums` alone "
            f"{1e3 * c['checksum_s_median']:.1f} ms ({c['checksum_gb_per_s']:.2f} GB/s)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wrn-16-4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loss", default="trades-se", choices=LOSSES)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--conv-impl", default="auto", choices=CONV_CHOICES)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps in training")
    parser.add_argument("--devices", type=int, default=0, help="first N devices (0: all)")
    parser.add_argument("--steps", type=int, default=5, help="paired rounds of train steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant")
    parser.add_argument("--saves", type=int, default=5, help="paired rounds of saves")
    parser.add_argument("--what", default="guard,checksums", help="comma list: guard, checksums")
    parser.add_argument("--workdir", default="", help="where to save (default: a temp dir)")
    parser.add_argument("--json", required=True, help="where to write the results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    common.write(result, args.json)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
