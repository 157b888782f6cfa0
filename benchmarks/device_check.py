"""One prepared accelerator run: everything we want from a device, written to one directory.

    python -m benchmarks.device_check --json-dir benchmarks/results/<device>_<date>
    python -m benchmarks.device_check --tiny --json-dir /tmp/dc   # CPU, tiny shapes (tests)

Parts, in this order, each written to `<part>.json` as soon as it is done (a part that fails
writes `<part>.error.txt` with its traceback, and the others still run):

- `environment`: devices, driver (`nvidia-smi`), the versions of python, jax, jaxlib, flax,
  optax, orbax, torch (and its CUDA and cuDNN), XLA_FLAGS, the host.
- `paired`: `benchmarks.train_step --paired` rounds, WRN-28-10, batch 512, TRADES-SE with
  PGD-10, bfloat16: the JAX step with the default compile options, with each candidate XLA flag
  set (`XLA_CANDIDATES` for the backend), and without the divergence guard, against PyTorch
  eager NCHW, channels_last and torch.compile + channels_last, all in bfloat16 autocast; the
  MFU of the default step (XLA's FLOP count over the median step over the chip's peak,
  `PEAK_FLOPS` or `--peak-flops`) and the guard's per-step cost (`no_guard` against `default`).
- `smoke`: `score_jax.trainer.train_and_evaluate` on configs/cifar10_ddpm.py (WRN-28-10, batch
  512, bfloat16, TRADES-SE with PGD-10; synthetic CIFAR-shaped real and generated images, real
  fraction 0.3): 2 steps with a checkpoint, then the same workdir extended to 4 steps, which must
  resume from step 2 (validation and test PGD cut to 2 steps, no AutoAttack).
- `overheads`: the checksums' per-save and per-restore cost on this state
  (`benchmarks.overheads.measure_checksums`).
- `autoattack`: the JAX AutoAttack (standard) against pyautoattack on WRN-28-10 (random
  weights, images labelled by the model), `--aa-examples` (32) examples.

`summary.md` gathers the headline numbers. `--budget-s` (default 450: 8 minutes with margin)
bounds the whole: a part that would start with less than its estimated time left
(`PART_SECONDS`) is skipped, and the summary says so; `--parts` reruns the skipped ones. The
compiled programs are cached in `<json-dir>/xla_cache` during the run (the smoke run's second
session reuses its evaluation programs) and the cache is removed at the end. `--tiny` runs
every part at a tiny shape on any backend (small CNN, 8x8 images, batch 8, reduced attacks;
torch.compile with the aot_eager backend, since inductor's first compile takes 30-65 s on a
2-core CPU) to check the harness, not to measure.
"""

import os

# Before JAX starts: leave PyTorch the other half of the accelerator's memory (paired rounds run
# both in this process).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402
from unittest import mock  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common, overheads, paired  # noqa: E402
from benchmarks.profile import step_flops  # noqa: E402
from score_jax import checkpoint, data, train, xla_options  # noqa: E402

# Dense bfloat16 peak FLOP/s per chip, by `device_kind` prefix (datasheets).
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}
# Candidate XLA options per backend, each compiled and timed beside the default in the paired
# rounds; an option this XLA does not know is reported, not fatal.
XLA_CANDIDATES: dict[str, dict[str, dict[str, Any]]] = {
    "gpu": {
        "latency_hiding_scheduler": {"xla_gpu_enable_latency_hiding_scheduler": True},
        "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
    },
    "cpu": {"ynn_conv": {xla_options.YNN_FUSION_OPTION: paired.JAXLIB_YNN_FUSIONS}},
    "tpu": {},
}
# Seconds a part usually needs on one H200 (compilations included): it is skipped with less left.
# Estimated from the H200 runs of 2026-11-26 (compilation 24-33 s per WRN-28-10 train program),
# not yet measured for this script; the parts run in this order, the most wanted first.
PART_SECONDS = {"environment": 5, "paired": 250, "smoke": 130, "overheads": 30, "autoattack": 110}
PARTS = tuple(PART_SECONDS)


@dataclasses.dataclass(frozen=True)
class Shape:
    """The shapes and loads of a run: the real one, or --tiny's."""

    model: str
    batch: int
    devices: int  # the paired rounds' and the overheads' devices (0: all)
    image_size: int
    attack_steps: int
    rounds: int
    warmup: int
    saves: int
    torch_variants: str
    compile_backend: str
    aa_model: str
    aa_reduced: bool


REAL = Shape(
    model="wrn-28-10",
    batch=512,
    devices=0,
    image_size=32,
    attack_steps=10,
    rounds=5,
    warmup=1,
    saves=3,
    torch_variants="eager,channels_last,compile+channels_last",
    compile_backend="inductor",
    aa_model="wrn-28-10",
    aa_reduced=False,
)
TINY = Shape(
    model="small-cnn",
    batch=8,
    devices=1,  # the steps of tests/test_benchmarks.py's paired and overheads runs: compiled once
    image_size=8,
    attack_steps=1,
    rounds=1,
    warmup=0,
    saves=1,
    torch_variants="eager,channels_last,compile+channels_last",
    compile_backend="aot_eager",
    aa_model="small-cnn",
    aa_reduced=True,
)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """The device, driver and versions this run measured with."""
    import torch

    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        **common.machine_info(),
        "platform": platform.platform(),
        "versions": {
            p: _version(p)
            for p in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
            + ("flax", "optax", "orbax-checkpoint", "numpy", "torch", "pyautoattack")
        },
        "torch_cuda": torch.version.cuda,
        "torch_cudnn": torch.backends.cudnn.version()
        if torch.backends.cudnn.is_available()
        else None,
        "torch_cuda_available": torch.cuda.is_available(),
        "env": {
            k: os.environ.get(k, "")
            for k in (
                "XLA_FLAGS",
                "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "JAX_PLATFORMS",
                "LIBTPU_INIT_ARGS",
            )
        },
    }
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
        proc = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True)
        env["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()
    else:
        env["nvidia_smi"] = "nvidia-smi not found (no NVIDIA driver on this machine)"
    return env


def _smoke_config(shape: Shape, num_train_steps: int):
    c = common.load_config("cifar10_ddpm")
    c.model.dtype = "bfloat16"
    if shape is TINY:
        c.model.update(name="small-cnn", activation="", conv_impl="xla", width=4, hidden=8)
    c.batch_size = c.eval_batch_size = shape.batch
    c.attack.num_steps = shape.attack_steps
    c.num_train_steps = num_train_steps
    c.checkpoint_every_steps = 2
    c.eval_every_epochs = 0
    c.log_every_steps = 1
    c.progress_bar = False
    del c.test.autoattack
    eval_steps = 1 if shape is TINY else 2
    c.test.pgd.num_steps = eval_steps
    for spec in c.eval.values():
        if isinstance(spec, type(c.eval)) and "num_steps" in spec:
            spec.num_steps = eval_steps
    return c


def _synthetic_ddpm_dataset(shape: Shape) -> data.Dataset:
    """CIFAR-shaped random images (real and generated) with random labels."""
    ds = common.synthetic_dataset(shape.image_size, 4 * shape.batch)
    rng = np.random.default_rng(1)
    generated = data.Split(
        rng.integers(0, 256, (4 * shape.batch, *ds.image_shape), dtype=np.uint8),
        rng.integers(0, 10, 4 * shape.batch, dtype=np.int32),
    )
    return dataclasses.replace(ds, generated=generated)


def _checkpoint_steps(workdir: str) -> list[int]:
    ckpt = checkpoint.Checkpointer(workdir)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def smoke(shape: Shape, out_dir: str) -> dict[str, Any]:
    """2 steps and a checkpoint, then the workdir extended to 4 steps (must resume at 2)."""
    from score_jax import setup as setup_module
    from score_jax import trainer

    workdir = os.path.join(out_dir, "smoke_workdir")
    shutil.rmtree(workdir, ignore_errors=True)  # a new run, not a resume of an earlier check
    dataset = _synthetic_ddpm_dataset(shape)
    result: dict[str, Any] = {"workdir": workdir}
    with mock.patch.object(setup_module, "load_data", lambda config: dataset):
        for name, steps in (("first", 2), ("resumed", 4)):
            config = _smoke_config(shape, steps)
            config.resume_extend = name == "resumed"
            before = _checkpoint_steps(workdir) if name == "resumed" else []
            t0 = time.perf_counter()
            results = trainer.train_and_evaluate(config, workdir)
            result[name] = {
                "wall_s": time.perf_counter() - t0,
                "steps_before": before,
                "results": results,
            }
    steps_after = _checkpoint_steps(workdir)
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    logged = sorted({m["step"] for m in metrics if "train/loss" in m})
    result["checkpoint_steps"] = steps_after
    result["logged_train_steps"] = logged
    result["resumed_from_step_2"] = result["resumed"]["steps_before"] == [2] and logged == [
        1,
        2,
        3,
        4,
    ]
    result["config"] = {
        "model": config.model.to_dict(),
        "batch_size": config.batch_size,
        "attack_steps": config.attack.num_steps,
    }
    for sub in ("checkpoints", "best"):  # the checkpoints are large; the logs stay
        shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)
    return result


def _bench_args(shape: Shape, **extra: Any) -> argparse.Namespace:
    return argparse.Namespace(
        model=shape.model,
        batch=shape.batch,
        loss="trades-se",
        dtype="bfloat16",
        image_size=shape.image_size,
        attack_steps=shape.attack_steps,
        devices=shape.devices,
        steps=shape.rounds,
        warmup=shape.warmup,
        no_torch=False,
        torch_variants=shape.torch_variants,
        torch_compile_backend=shape.compile_backend,
        paired="",
        **extra,
    )


def peak_flops(device_kind: str, override: float) -> float | None:
    if override > 0:
        return override
    return next((v for k, v in PEAK_FLOPS.items() if device_kind.startswith(k)), None)


def paired_rounds(shape: Shape, peak_override: float, keep: dict) -> dict[str, Any]:
    """The paired rounds (see the module docstring), the MFU and the guard's cost."""
    backend = jax.default_backend()
    conv = "xla" if shape is TINY else "auto"
    variants = {"default": paired.JaxVariant(conv)}
    for name, options in XLA_CANDIDATES.get(backend, {}).items():
        variants[f"xla:{name}"] = paired.JaxVariant(conv, options)
    variants["no_guard"] = paired.JaxVariant(conv, divergence_guard=False)
    args = _bench_args(shape)
    result = paired.run_paired(args, variants, keep)
    result["markdown"] = paired.markdown_paired(result)
    steps = result["variants"]
    default_s = steps["default"]["step_s_median"]
    setup, state = keep["setup"], keep["state"]
    batch = train.shard_batch(setup.batcher.batch(0), setup.mesh)
    flops, _ = step_flops(setup, state, batch, common.device_key(setup))
    result["flops_per_step"] = flops
    result["flop_per_s"] = flops / default_s
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind, peak_override)
    result["peak_flops"] = peak
    if peak is None:
        result["mfu"] = None
        result["mfu_note"] = f"no peak FLOP/s known for {kind!r}: pass --peak-flops"
    else:
        result["mfu"] = flops / default_s / (peak * setup.mesh.size)
    rounds = result["rounds"]
    result["guard"] = {
        "with_s_median": default_s,
        "without_s_median": steps["no_guard"]["step_s_median"],
        "overhead_pct": 100 * float(np.median([r["default"] / r["no_guard"] - 1 for r in rounds])),
        "overhead_ms": 1e3 * float(np.median([r["default"] - r["no_guard"] for r in rounds])),
    }
    return result


def checksum_costs(shape: Shape, out_dir: str, keep: dict) -> dict[str, Any]:
    state = keep.get("state")
    if state is None:  # the paired part did not run: the same state, built here
        args = _bench_args(shape)
        config = common.make_config(args.model, args.batch, args.loss, dtype=args.dtype)
        setup = common.bench_setup(config, common.synthetic_dataset(shape.image_size, 256))
        state = setup.initial_state()
    workdir = os.path.join(out_dir, "overheads_workdir")
    try:
        return overheads.measure_checksums(state, shape.saves, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def autoattack_check(shape: Shape, examples: int) -> dict[str, Any]:
    from benchmarks import autoattack as aa_bench

    argv = ["--model", shape.aa_model, "--num-examples", str(examples), "--json", os.devnull]
    argv += ["--batch", str(examples), "--torch-batch", str(examples)]
    if shape.aa_reduced:
        argv += ["--width", "4", "--hidden", "8", "--train-steps", "1", "--conv-impl", "xla"]
        argv += ["--n-iter", "2", "--n-targets", "2", "--n-queries", "5"]
    result = aa_bench.run(aa_bench.parse_args(argv))
    result["markdown"] = aa_bench.markdown_rows(result)
    return result


def _write(out_dir: str, name: str, value: Any) -> None:
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(value, f, indent=2, default=float)


def summary(results: dict[str, Any], status: dict[str, str], shape: Shape) -> str:
    lines = [f"# device check ({'tiny' if shape is TINY else 'real shapes'})", ""]
    env = results.get("environment", {})
    if env:
        lines += [f"- device: {env.get('device_kind')} x {len(env.get('devices', []))}, "
                  f"backend {env.get('backend')}; {env.get('nvidia_smi')}",
                  f"- versions: {env.get('versions')}", f"- date: {env.get('date')}"]  # fmt: skip
    lines += ["", "| part | status |", "|---|---|"]
    lines += [f"| {part} | {s} |" for part, s in status.items()]
    if "smoke" in results:
        s = results["smoke"]
        lines += ["", f"smoke: first run {s['first']['wall_s']:.1f} s, resumed run "
                  f"{s['resumed']['wall_s']:.1f} s, resumed from step 2: "
                  f"{s['resumed_from_step_2']}"]  # fmt: skip
    if "paired" in results:
        p = results["paired"]
        lines += ["", p["markdown"], ""]
        mfu = p["mfu"]
        lines.append(f"MFU (default step): {'-' if mfu is None else f'{100 * mfu:.1f}%'}"
                     f" ({p['flop_per_s'] / 1e12:.2f} TFLOP/s by XLA's count)")  # fmt: skip
        g = p["guard"]
        lines.append(f"divergence guard: {g['overhead_ms']:.2f} ms/step ({g['overhead_pct']:.2f}%)")
        speedups = ", ".join(f"{k} {v:.3f}" for k, v in p["speedup_vs_default"].items())
        lines.append(
            f"speed-up over default (XLA flag sets; no_guard: the guard's cost): {speedups}"
        )
    if "overheads" in results:
        c = results["overheads"]
        for part in ("save_blocking", "save_total", "restore"):
            d = c[part]
            lines.append(f"checksums, {part}: {d['overhead_ms']:.1f} ms ({d['overhead_pct']:.1f}%)")
    if "autoattack" in results:
        lines += ["", results["autoattack"]["markdown"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-dir", required=True, help="where to write the results")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (tests, CPU)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock bound (s)")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="override PEAK_FLOPS")
    parser.add_argument("--aa-examples", type=int, default=32, help="AutoAttack examples")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; valid {PARTS}")
    shape = TINY if args.tiny else REAL
    os.makedirs(args.json_dir, exist_ok=True)
    cache = None
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = os.path.join(args.json_dir, "xla_cache")
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    start = time.perf_counter()
    keep: dict[str, Any] = {}
    runs: dict[str, Callable[[], Any]] = {
        "environment": environment,
        "paired": lambda: paired_rounds(shape, args.peak_flops, keep),
        "smoke": lambda: smoke(shape, args.json_dir),
        "overheads": lambda: checksum_costs(shape, args.json_dir, keep),
        "autoattack": lambda: autoattack_check(shape, 8 if args.tiny else args.aa_examples),
    }
    results: dict[str, Any] = {}
    status: dict[str, str] = {}
    for part in PARTS:
        if part not in parts:
            status[part] = "not requested (--parts)"
            continue
        left = args.budget_s - (time.perf_counter() - start)
        if not args.tiny and left < PART_SECONDS[part]:
            status[part] = (
                f"skipped: {left:.0f} s of --budget-s left, it usually takes {PART_SECONDS[part]} s"
            )
            continue
        t0 = time.perf_counter()
        print(f"device_check: {part} ...", flush=True)
        try:
            results[part] = runs[part]()
        except Exception:
            with open(os.path.join(args.json_dir, f"{part}.error.txt"), "w") as f:
                f.write(traceback.format_exc())
            last = traceback.format_exc().strip().splitlines()[-1]
            status[part] = f"FAILED after {time.perf_counter() - t0:.0f} s: {last[:200]}"
            print(f"device_check: {part} failed: {last}", flush=True)
            continue
        results[part]["part_wall_s"] = time.perf_counter() - t0
        _write(args.json_dir, part, results[part])
        status[part] = f"done in {results[part]['part_wall_s']:.1f} s"
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    total = time.perf_counter() - start
    status["total"] = f"{total:.1f} s"
    text = summary(results, status, shape)
    with open(os.path.join(args.json_dir, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    failed = [p for p, s in status.items() if s.startswith("FAILED")]
    if failed:
        sys.exit(f"device_check: parts failed: {', '.join(failed)} (see {args.json_dir})")
    return {"results": results, "status": status}


if __name__ == "__main__":
    main(sys.argv[1:])
