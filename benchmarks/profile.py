"""Where a train step's time goes: its FLOPs, its parts timed apart, an op-level profile.

`step_flops`: XLA's cost analysis of the step lowered for one CPU device, whatever the device it
runs on (on GPU the compiled convolutions are cuDNN custom calls, which the analysis does not
count). It counts the body of a while loop once, whatever its trip count, so the attack's other
num_steps - 1 iterations are added (one iteration = the count minus that of the step lowered
with num_steps 0).

`jax_breakdown` times the step's parts (forward pass in train and eval mode, the attack, loss
forward + backward, optimizer + EMA update), `add_estimates` derives the rest; `profile_jax`
traces one step (`jax.profiler`) and sums the time of each executed XLA instruction (thunk) by
kind (convolution, dot, reduce, data movement, elementwise, from `hlo_instructions`) and by layer
and direction (`layer_of`: from the instruction's `op_name` metadata).
"""

import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.common import flops_of
from benchmarks.timing import time_calls
from score_jax import train, xla_options
from score_jax.setup import Setup


def step_flops(setup: Setup, state, batch, key) -> tuple[float, float]:
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
        cfg = setup.config.copy_and_resolve_references()
        cfg.attack.num_steps = num_steps
        step = train.compile_train_step(
            setup.model,
            cfg,
            setup.schedule,
            setup.ema_warmup_steps,
            mesh,
            momentum_fn=setup.momentum_schedule,
        )
        return flops_of(step.lower(*args).cost_analysis())

    num_steps = setup.config.attack.num_steps
    counted = lowered_flops(num_steps)
    iteration = counted - lowered_flops(0) if num_steps else 0.0
    return counted + max(num_steps - 1, 0) * iteration, iteration


def jax_breakdown(setup: Setup, state, host_batch: dict, steps: int, warmup: int) -> dict:
    """Median ms of the step's parts, each jitted alone on one device from the library's own
    pieces (`train.apply_train`, `adversarial_examples`, `make_loss_fn`, `update`): the
    forward pass in train and eval mode, the whole attack, the loss's value and gradient, and
    the optimizer + EMA update."""
    c, model = setup.config, setup.model
    state = jax.device_put(jax.device_get(state), setup.mesh.devices.flat[0])
    x = jnp.asarray(host_batch["image"], jnp.float32) / 255.0
    labels = jnp.asarray(host_batch["label"])
    keys = jax.random.split(jax.random.key(0), x.shape[0])
    forward = xla_options.jit(
        lambda st, x: train.apply_train(model, st.params, st.batch_stats, x)[0]
    )
    forward_eval = xla_options.jit(
        lambda st, x: model.apply({"params": st.params, "batch_stats": st.batch_stats}, x, False)
    )
    attack = xla_options.jit(
        lambda st, x: train.adversarial_examples(model, c, st, x, labels, keys)[0]
    )

    @xla_options.jit
    def loss_grad(st, x_adv):
        loss_fn = train.make_loss_fn(model, c, st.batch_stats, x, x_adv, labels)
        return jax.value_and_grad(loss_fn, has_aux=True)(st.params)

    @xla_options.jit
    def update(st, grads):
        return train.update(st, grads, st.batch_stats, c.ema.decay, setup.ema_warmup_steps)

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
