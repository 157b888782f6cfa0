"""Train-step throughput: the compiled JAX SCORE step against the same step in eager PyTorch.

    python -m benchmarks.train_step --model wrn-16-4 --batch 64 --steps 3 --loss trades-se \
        --conv-impl im2col --json /tmp/wrn16.json

The JAX step is built exactly as training builds it (`score_jax.trainer.build_model`,
`optim.make_schedule` / `make_optimizer`, `train.create_train_state`, `train.compile_train_step`)
from configs/cifar10_ddpm.py (SGD Nesterov 0.9, weight decay 5e-4 not on BatchNorm, EMA 0.995,
PGD-10 with step 2/255 at Linf 8/255, TRADES-SE), with the model, batch, loss, dtype and
convolution overridden; `--loss trades-kl` sets the KL divergence, `--loss pgd-at` takes the loss
and attack of configs/cifar10_basic.py:pgd_at-kl (Madry: cross-entropy, uniform start, the attack
in eval mode). It runs on a device-resident synthetic CIFAR-shaped batch (uint8 images, made by
`TrainBatcher.batch(0)` and `shard_batch` once). Compilation (`.lower().compile()`) is timed
apart; then the median of `--steps` steps, each ended by `block_until_ready`.

The PyTorch step (benchmarks/torch_reference.py) runs in a subprocess, with the same initial
weights (`export_state_dict`), batch, dtype and `torch.set_num_threads(os.cpu_count())`.

FLOPs (`step_flops`): XLA's cost analysis of the step lowered for one CPU device, whatever the
device it runs on (on GPU the compiled convolutions are cuDNN custom calls, which the analysis
does not count). It counts the body of a while loop once, whatever its trip count, so
`flops_per_step` adds the attack's other num_steps - 1 iterations (one iteration = the count
minus that of the step lowered with num_steps 0). `xla_flops_raw` is the compiled program's own
count on the device (loop body once; no cuDNN calls). `--peak-flops` gives the MFU:
flops_per_step / step time / (peak x devices).

`--breakdown` also times the step's parts in both frameworks (forward pass in train and eval
mode, one attack iteration, loss forward + backward, optimizer + EMA update); `--profile` traces
one step in both (`jax.profiler` / `torch.profiler`) and sums the time of each executed XLA
instruction (thunk) by kind (convolution, dot, reduce, data movement, elementwise) and by layer
and direction (from the instruction's `op_name` metadata: batchnorm / conv / activation,
forward / backward), and the time of each aten op likewise. Both are to see where the time goes.
"""

import argparse
import collections
import dataclasses
import datetime
import glob
import gzip
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.timing import loadavg, peak_rss_mb, time_calls
from score_jax import config_lib, data, models, optim, train, trainer
from score_jax.models import layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("trades-se", "trades-kl", "pgd-at")


CONV_CHOICES = layers.CONV_IMPLS


# --- shared helpers (benchmarks/eval.py uses them too) ---------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
    }


def device_peak_mb() -> float | None:
    """Peak accelerator memory of this process, MiB (None where the backend keeps no stats,
    as on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def flops_of(cost: Any) -> float:
    """The "flops" entry of a cost analysis (a dict, or a list of one dict in older jax)."""
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def load_config(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
    path = os.path.join(REPO, "configs", name + ".py")
    return config_lib.load_config_file(path, variant)


def make_config(
    model: str,
    batch: int,
    loss: str,
    *,
    dtype: str = "float32",
    conv_impl: str = "auto",
    attack_steps: int = 10,
    eval_steps: int = 20,
) -> ml_collections.ConfigDict:
    """configs/cifar10_ddpm.py with the benchmark's overrides (see the module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {loss!r}")
    c = load_config("cifar10_ddpm")
    if loss == "trades-kl":
        c.loss.divergence = "kl"
    elif loss == "pgd-at":
        basic = load_config("cifar10_basic", "pgd_at-kl")
        c.loss = basic.loss
        c.attack.init = basic.attack.init
    c.model.name = model
    c.model.activation = ""  # the model's default: SiLU for the WRNs, ReLU otherwise
    c.model.conv_impl = conv_impl
    c.model.dtype = dtype
    c.batch_size = batch
    c.eval_batch_size = batch
    c.attack.num_steps = attack_steps
    c.test.pgd.num_steps = eval_steps
    c.dataset.real_fraction = 1.0  # synthetic data only (no generated .npz)
    c.num_train_steps = 1000  # only sets the schedule's shape
    c.progress_bar = False
    return c


def synthetic_dataset(image_size: int, num_train: int, seed: int = 0) -> data.Dataset:
    """A CIFAR-10-shaped in-memory Dataset of random uint8 images and labels."""
    rng = np.random.default_rng(seed)
    shape = (image_size, image_size, 3)

    def split(n: int) -> data.Split:
        return data.Split(
            rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            rng.integers(0, 10, (n,), dtype=np.int32),
        )

    return data.Dataset(
        name="cifar10",
        num_classes=10,
        image_shape=shape,
        mean=layers.CIFAR10_MEAN,
        std=layers.CIFAR10_STD,
        train=split(num_train),
        validation=split(16),
        test=split(16),
    )


@dataclasses.dataclass
class Bench:
    """What `trainer.Setup` builds, from a config and an in-memory dataset."""

    config: ml_collections.ConfigDict
    dataset: data.Dataset
    mesh: Any
    model: Any
    batcher: data.TrainBatcher
    schedule: Any
    tx: Any
    ema_warmup_steps: int
    key: np.ndarray

    @classmethod
    def build(
        cls, config: ml_collections.ConfigDict, dataset: data.Dataset, devices: int = 0
    ) -> "Bench":
        """`devices` > 0: a mesh over the first `devices` devices (default all, as training)."""
        mesh = train.make_mesh(jax.devices()[:devices] if devices > 0 else None)
        config_lib.validate(config, num_devices=mesh.size)
        batcher = data.TrainBatcher(
            dataset, config.batch_size, config.seed, config.dataset.real_fraction
        )
        steps = trainer.total_steps(config, batcher.steps_per_epoch)
        schedule = optim.make_schedule(config.optim, batcher.steps_per_epoch, steps)
        return cls(
            config=config,
            dataset=dataset,
            mesh=mesh,
            model=trainer.build_model(config, dataset),
            batcher=batcher,
            schedule=schedule,
            tx=optim.make_optimizer(config.optim, schedule),
            ema_warmup_steps=int(round(config.ema.warmup_fraction * steps)),
            key=train.base_key(config.seed),
        )

    def initial_state(self) -> train.TrainState:
        state = train.create_train_state(
            self.model, self.tx, self.dataset.image_shape, self.config.seed
        )
        return train.replicate(state, self.mesh)

    def step_fn(self):
        return train.compile_train_step(
            self.model, self.config, self.schedule, self.ema_warmup_steps, self.mesh
        )

    def device_key(self) -> jax.Array:
        return jax.device_put(self.key, NamedSharding(self.mesh, P()))


def torch_model_kwargs(config: ml_collections.ConfigDict, dataset: data.Dataset) -> dict:
    """build_torch_model's keyword arguments for the configured model (as trainer.build_model)."""
    model = models.from_config(config.model, dataset.num_classes, dataset.mean, dataset.std)
    return models.architecture_kwargs(config.model.name, model)


def run_torch(spec: dict, state: train.TrainState | None, batch: dict, workdir: str) -> dict:
    """Runs benchmarks.torch_reference in a subprocess on `batch` from `state`'s weights."""
    spec = dict(spec)
    spec["batch"] = os.path.join(workdir, "batch.npz")
    np.savez(spec["batch"], image=batch["image"], label=batch["label"])
    spec["state_dict"] = None
    if state is not None:
        import torch

        from score_jax.torch_bridge.convert import export_state_dict

        variables = {"params": state.params, "batch_stats": state.batch_stats}
        spec["state_dict"] = os.path.join(workdir, "state_dict.pt")
        torch.save(export_state_dict(spec["model_name"], variables), spec["state_dict"])
    spec_path, out_path = os.path.join(workdir, "spec.json"), os.path.join(workdir, "torch.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--spec", spec_path]
    proc = subprocess.run(
        [*cmd, "--out", out_path], cwd=REPO, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"torch reference failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(out_path) as f:
        return json.load(f)


def torch_spec(
    bench: Bench,
    mode: str,
    steps: int,
    warmup: int,
    breakdown: bool,
    channels_last: bool = False,
) -> dict:
    c = bench.config
    attack = c.test.pgd if mode == "eval" else c.attack
    spec = {
        "mode": mode,
        "model_name": c.model.name,
        "num_classes": bench.dataset.num_classes,
        "model_kwargs": torch_model_kwargs(c, bench.dataset),
        "steps": steps,
        "warmup": warmup,
        "dtype": c.model.dtype,
        "threads": os.cpu_count(),
        "device": "cuda" if jax.default_backend() == "gpu" else "cpu",
        "seed": c.seed,
        "breakdown": breakdown,
        "channels_last": channels_last,
        "attack": attack.to_dict(),
    }
    if mode == "train":
        spec["loss"] = {"type": c.loss.method, "kind": c.loss.divergence, "beta": c.loss.beta}
        spec["optim"] = {
            k: c.optim[k]
            for k in ("learning_rate", "momentum", "nesterov", "weight_decay")
            + ("weight_decay_batchnorm",)
        }
        spec["ema"] = {"decay": c.ema.decay, "warmup_steps": bench.ema_warmup_steps}
        spec["augment"] = c.augment.to_dict()
    return spec


# --- FLOPs and the breakdown -----------------------------------------------------------------


def step_flops(bench: Bench, state, batch, key) -> tuple[float, float]:
    """(FLOPs of one train step, of one attack iteration) for the whole global batch.

    Counted by XLA's cost analysis on the step lowered for one CPU device, before backend
    optimisation, whatever the device it runs on: the count is the program's, and on GPU the
    compiled program's convolutions are cuDNN custom calls, which the analysis does not count.
    The lowered count has the attack loop's body once; one iteration = that count minus the
    count of the same step lowered with num_steps = 0, and the step = count + (num_steps - 1)
    iterations. NaN where the CPU backend is not loaded (JAX_PLATFORMS without "cpu")."""
    try:
        mesh = train.make_mesh(jax.devices("cpu")[:1])
    except RuntimeError:
        return math.nan, math.nan
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(train.AXIS))

    def abstract(tree, sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
        )

    args = (abstract(state, replicated), abstract(batch, split), abstract(key, replicated))

    def lowered_flops(num_steps: int) -> float:
        cfg = bench.config.copy_and_resolve_references()
        cfg.attack.num_steps = num_steps
        step = train.compile_train_step(
            bench.model, cfg, bench.schedule, bench.ema_warmup_steps, mesh
        )
        return flops_of(step.lower(*args).cost_analysis())

    num_steps = bench.config.attack.num_steps
    counted = lowered_flops(num_steps)
    iteration = counted - lowered_flops(0) if num_steps else 0.0
    return counted + max(num_steps - 1, 0) * iteration, iteration


def jax_breakdown(bench: Bench, state, host_batch: dict, steps: int, warmup: int) -> dict:
    """Median ms of the step's parts, each jitted alone on one device from the library's own
    pieces (`train.apply_train`, `adversarial_examples`, `make_loss_fn`, `update`): the
    forward pass in train and eval mode, the whole attack, the loss's value and gradient, and
    the optimizer + EMA update."""
    c, model = bench.config, bench.model
    state = jax.device_put(jax.device_get(state), bench.mesh.devices.flat[0])
    x = jnp.asarray(host_batch["image"], jnp.float32) / 255.0
    labels = jnp.asarray(host_batch["label"])
    keys = jax.random.split(jax.random.key(0), x.shape[0])
    forward = jax.jit(lambda st, x: train.apply_train(model, st.params, st.batch_stats, x)[0])
    forward_eval = jax.jit(
        lambda st, x: model.apply({"params": st.params, "batch_stats": st.batch_stats}, x, False)
    )
    attack = jax.jit(lambda st, x: train.adversarial_examples(model, c, st, x, labels, keys)[0])

    @jax.jit
    def loss_grad(st, x_adv):
        loss_fn = train.make_loss_fn(model, c, st.batch_stats, x, x_adv, labels)
        return jax.value_and_grad(loss_fn, has_aux=True)(st.params)

    @jax.jit
    def update(st, grads):
        return train.update(st, grads, st.batch_stats, c.ema.decay, bench.ema_warmup_steps)

    x_adv = attack(state, x)
    grads = jax.tree.map(jnp.zeros_like, state.params)
    parts = {
        "forward_ms": lambda: forward(state, x),
        "forward_eval_mode_ms": lambda: forward_eval(state, x),
        "attack_total_ms": lambda: attack(state, x),
        "loss_grad_ms": lambda: loss_grad(state, x_adv),
        "update_ema_ms": lambda: update(state, grads),
    }
    out = {}
    for name, fn in parts.items():
        # At least one untimed call: the first one compiles.
        times = time_calls(lambda fn=fn: jax.block_until_ready(fn()), steps, max(warmup, 1))
        out[name] = 1e3 * statistics.median(times)
    return out


def add_estimates(breakdown: dict, step_s: float, num_steps: int, trades: bool) -> dict:
    """Completes the attack's numbers (total = clean forward for TRADES + num_steps iterations;
    JAX measures the total, PyTorch one iteration) and the rest of the step."""
    b = dict(breakdown)
    clean = b["forward_ms"] if trades else 0.0
    if "attack_total_ms" in b:
        b["attack_iteration_ms"] = (b["attack_total_ms"] - clean) / max(num_steps, 1)
    else:
        b["attack_total_ms"] = clean + num_steps * b["attack_iteration_ms"]
    b["step_ms"] = 1e3 * step_s
    b["other_ms"] = b["step_ms"] - b["attack_total_ms"] - b["loss_grad_ms"] - b["update_ema_ms"]
    return b


# --- op-level profile -----------------------------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|[^\s(]+)\s+([a-z][\w\-]*)\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MOVES = {
    "bitcast", "broadcast", "concatenate", "constant", "convert", "copy", "dynamic-slice",
    "dynamic-update-slice", "gather", "get-tuple-element", "iota", "pad", "parameter",
    "reshape", "reverse", "scatter", "slice", "transpose", "tuple",
}  # fmt: skip


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str | None, str]]:
    """Instruction name -> (kind, op_name) from compiled HLO text. kind: "convolution" / "dot" /
    "reduce" (whatever the instruction or its fused computation contains first, in that order),
    "data movement" (only copies, slices, pads, concatenates...), "elementwise", or None for
    control flow (while / conditional, whose bodies are traced as their own instructions)."""
    computations: dict[str, list[str]] = collections.defaultdict(list)
    instructions: dict[str, tuple[str, list[str], str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m and current is not None:
            name, opcode = m.groups()
            op_name = _OP_NAME.search(line)
            instructions[name] = (opcode, _CALLS.findall(line), op_name.group(1) if op_name else "")
            computations[current].append(name)
        elif " = " not in line and (h := _HEADER.match(line)):
            current = h.group(1)

    def opcodes(computation: str, seen: set[str]) -> set[str]:
        out = set()
        for n in computations.get(computation, ()):
            opcode, calls, _ = instructions[n]
            out.add(opcode)
            for c in calls:
                if c not in seen:
                    seen.add(c)
                    out |= opcodes(c, seen)
        return out

    table = {}
    for name, (opcode, calls, op_name) in instructions.items():
        ops = {opcode}
        for c in calls:
            ops |= opcodes(c, {c})
        if opcode in ("while", "conditional", "call"):
            kind = None
        elif "convolution" in ops:
            kind = "convolution"
        elif "dot" in ops:
            kind = "dot"
        elif "reduce" in ops or "reduce-window" in ops:
            kind = "reduce"
        elif ops - {"fusion"} <= _MOVES:
            kind = "data movement"
        else:
            kind = "elementwise"
        table[name] = (kind, op_name)
    return table


def layer_of(op_name: str) -> str:
    """ "<layer> <direction>" of an op_name: batchnorm / conv / activation / other, forward /
    backward (under a `transpose(` of the autodiff)."""
    low = op_name.lower()
    direction = "backward" if "transpose(" in low else "forward"
    if "batchnorm" in low or "/bn" in low:
        layer = "batchnorm"
    elif "conv" in low or "shortcut" in low:
        layer = "conv"
    elif ".act" in low or "relu" in low or "silu" in low or "logistic" in low:
        layer = "activation"
    else:
        layer = "other"
    return f"{layer} {direction}"


def _shares(totals: dict[str, float]) -> dict[str, dict[str, float]]:
    total = sum(totals.values()) or 1.0
    ordered = sorted(totals.items(), key=lambda kv: -kv[1])
    return {k: {"ms": round(v, 3), "pct": round(100 * v / total, 2)} for k, v in ordered}


def profile_jax(call: Callable[[], object], hlo_text: str, top: int = 12) -> dict:
    """Traces one call and sums the traced instructions' durations (ms, summed over threads)."""
    table = hlo_instructions(hlo_text)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(paths[0]) as f:
            events = json.load(f)["traceEvents"]
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_layer: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        entry = table.get(e.get("name")) if e.get("ph") == "X" else None
        if entry is None or entry[0] is None:
            continue
        ms = e.get("dur", 0) / 1e3
        by_kind[entry[0]] += ms
        by_layer[layer_of(entry[1])] += ms
        by_op[e["name"]] += ms
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "traced_step_ms": 1e3 * wall,
        "op_ms_total": sum(by_op.values()),
        "by_kind": _shares(by_kind),
        "by_layer": _shares(by_layer),
        "top_ops": [
            {"name": n, "ms": round(v, 3), "kind": table[n][0], "op_name": table[n][1]}
            for n, v in ops
        ],
    }


# --- the benchmark ---------------------------------------------------------------------------


def run_jax_train(
    bench: Bench, state, batch, steps: int, warmup: int, profile: bool = False
) -> dict:
    """Compiles (timed apart) and times the train step on the device-resident batch."""
    key = bench.device_key()
    fn = bench.step_fn()
    load_before = loadavg()
    t0 = time.perf_counter()
    lowered = fn.lower(state, batch, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    raw = flops_of(compiled.cost_analysis())
    flops, iteration = step_flops(bench, state, batch, key)
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
        "images_per_s": bench.config.batch_size / median,
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


def run_paired(args: argparse.Namespace) -> dict:
    """Compiled JAX steps of each --paired conv variant and the PyTorch step (in this process),
    called in turn, one step each per round: every round sees the same machine load, so the
    per-round ratios stay meaningful on a shared machine where the load drifts."""
    import torch

    from benchmarks import torch_reference
    from score_jax.torch_bridge.convert import export_state_dict
    from score_jax.torch_bridge.models import build_torch_model

    variants = [v for v in args.paired.split(",") if v]
    unknown = set(variants) - set(CONV_CHOICES)
    if unknown:
        raise ValueError(f"--paired: unknown conv variants {sorted(unknown)}; valid {CONV_CHOICES}")
    dataset = synthetic_dataset(args.image_size, max(4 * args.batch, 256))
    runners: dict[str, Callable[[], object]] = {}
    out: dict[str, Any] = {}
    bench = None
    for v in variants:
        config = make_config(
            args.model, args.batch, args.loss, dtype=args.dtype, conv_impl=v,
            attack_steps=args.attack_steps,
        )  # fmt: skip
        bench = Bench.build(config, dataset, args.devices)
        state = bench.initial_state()
        batch = train.shard_batch(bench.batcher.batch(0), bench.mesh)
        key = bench.device_key()
        t0 = time.perf_counter()
        compiled = bench.step_fn().lower(state, batch, key).compile()
        out[v] = {"compile_s": time.perf_counter() - t0, "step_s_all": []}
        if not runners:
            initial = jax.device_get(state)
        holder = {"state": state}

        def one(compiled=compiled, holder=holder, batch=batch, key=key):
            holder["state"], metrics = compiled(holder["state"], batch, key)
            jax.block_until_ready((holder["state"], metrics))

        runners[v] = one
    if not args.no_torch:
        torch.set_num_threads(os.cpu_count() or 1)
        spec = torch_spec(bench, "train", args.steps, args.warmup, False)
        model = build_torch_model(spec["model_name"], spec["num_classes"], **spec["model_kwargs"])
        variables = {"params": initial.params, "batch_stats": initial.batch_stats}
        model.load_state_dict(export_state_dict(spec["model_name"], variables), strict=True)
        ref = torch_reference.Reference(model, spec)
        host = bench.batcher.batch(0)
        images = torch.from_numpy(np.ascontiguousarray(host["image"].transpose(0, 3, 1, 2)))
        labels = torch.from_numpy(host["label"].astype(np.int64))
        runners["torch"] = lambda: ref.train_step(images, labels)
        out["torch"] = {"step_s_all": []}
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
        d["step_s_median"] = statistics.median(d["step_s_all"])
        d["images_per_s"] = args.batch / d["step_s_median"]
    result: dict[str, Any] = {
        "benchmark": "train_step_paired",
        "date": datetime.date.today().isoformat(),
        "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": vars(args),
        "variants": out,
        "rounds": rounds,
        "peak_rss_mb_process": peak_rss_mb(),
    }
    if not args.no_torch:
        result["ratio_jax_over_torch"] = {
            v: statistics.median(r["torch"] / r[v] for r in rounds) for v in variants
        }
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
        ratio = f"{ratios[name]:.2f}" if name in ratios else "-"
        lines.append(
            f"| {a['model']} | {a['batch']} | {a['loss']} | {name} | {d['step_s_median']:.1f} | "
            f"{d['images_per_s']:.2f} | {ratio} | {load} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    config = make_config(
        args.model,
        args.batch,
        args.loss,
        dtype=args.dtype,
        conv_impl=args.conv_impl,
        attack_steps=args.attack_steps,
    )
    dataset = synthetic_dataset(args.image_size, max(4 * args.batch, 256))
    bench = Bench.build(config, dataset, args.devices)
    state = bench.initial_state()
    host_batch = bench.batcher.batch(0)
    batch = train.shard_batch(host_batch, bench.mesh)
    result: dict[str, Any] = {
        "benchmark": "train_step",
        "date": datetime.date.today().isoformat(),
        "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "args": vars(args),
        "config": {
            "loss": config.loss.to_dict(),
            "attack": config.attack.to_dict(),
            "optim": config.optim.to_dict(),
            "ema": config.ema.to_dict(),
            "augment": config.augment.to_dict(),
        },
    }
    with tempfile.TemporaryDirectory() as workdir:
        spec = torch_spec(
            bench, "train", args.steps, args.warmup, args.breakdown, args.torch_channels_last
        )
        spec["profile"] = args.profile
        # The initial weights go to the reference; the JAX steps donate `state`.
        torch_state = None if args.no_torch else jax.device_get(state)
        j = run_jax_train(bench, state, batch, args.steps, args.warmup, args.profile)
        state = j.pop("_state")
        j["conv_impl"] = layers.resolve_conv_impl(args.conv_impl)
        j["flop_per_s"] = j["flops_per_step"] / j["step_s_median"]
        if args.peak_flops > 0:  # model FLOPs utilisation against the chip's peak
            j["mfu"] = j["flop_per_s"] / (args.peak_flops * bench.mesh.size)
        trades = config.loss.method == "trades"
        if args.breakdown:
            b = jax_breakdown(bench, state, host_batch, args.steps, args.warmup)
            j["breakdown"] = add_estimates(b, j["step_s_median"], config.attack.num_steps, trades)
        j["peak_rss_mb"] = peak_rss_mb()
        j["device_peak_mb"] = device_peak_mb()
        result["jax"] = j
        result["torch"] = None
        print(f"JAX: {j['images_per_s']:.2f} img/s, compile {j['compile_s']:.1f} s", flush=True)
        if not args.no_torch:
            try:
                t = run_torch(spec, torch_state, host_batch, workdir)
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
        help="the models' convolution (config.model.conv_impl; auto: im2col on CPU)",
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps in training")
    parser.add_argument("--devices", type=int, default=0, help="first N devices (0: all)")
    parser.add_argument("--breakdown", action="store_true", help="also time the step's parts")
    parser.add_argument("--profile", action="store_true", help="op-level profile of one step")
    parser.add_argument(
        "--paired",
        default="",
        help="comma list of conv variants (e.g. im2col,xla): time them and PyTorch in turn, "
        "one step each per round, PyTorch in this process (ignores --conv-impl, --breakdown, "
        "--profile)",
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


def write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)


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
