"""`model.dtype=bfloat16`: what runs in bfloat16 and what stays float32, read from the train
step's HLO and the dtypes of the state it takes and returns (tiny WRN-10-1 on 8x8 images, the
DDPM config otherwise).

The HLO is the lowered program (what JAX asks XLA for; XLA's CPU backend may widen bfloat16
further, never narrow it). An instruction belongs to the model if its op_name has the Flax
module's scope (`WideResNet`), or if it sits in a computation that only model instructions call
(the `silu` calls, the reductions' regions).
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import load_config

from score_jax import data, train, trainer

_HEADER = re.compile(r"^(?:ENTRY )?([\w.-]+) ")
# The result type: a shape, or a tuple of shapes "(bf16[4]{0}, f32[])".
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?([\w.-]+) = (\(.*?\)|\S+) ([\w-]+)\((.*)$")
_CALLED = re.compile(r"(?:to_apply|calls|body|condition)=([\w.-]+)")


def _instructions(hlo: str) -> list[dict[str, str]]:
    """Every instruction: computation, name, result type, opcode, op_name, called computations."""
    out, computation = [], None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.endswith("{"):
            computation = _HEADER.match(line).group(1)
            continue
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        name, result, opcode, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        out.append(
            dict(
                computation=computation,
                name=name,
                result=result,
                opcode=opcode,
                op_name=op_name.group(1) if op_name else "",
                called=_CALLED.findall(rest),
            )
        )
    return out


def _in_model(instructions: list[dict]) -> set[str]:
    """Names of the computations called only from inside the model (transitively)."""
    callers = collections.defaultdict(list)
    for inst in instructions:
        for called in inst["called"]:
            callers[called].append(inst)
    inside: set[str] = set()
    changed = True
    while changed:
        changed = False
        for computation, calls in callers.items():
            if computation not in inside and all(
                "WideResNet" in c["op_name"] or c["computation"] in inside for c in calls
            ):
                inside.add(computation)
                changed = True
    return inside


@pytest.fixture(scope="module")
def bf16_step():
    config = load_config("cifar10_ddpm")
    config.model.update(depth=10, width=1, dtype="bfloat16", conv_impl="xla")
    config.batch_size = 4
    config.attack.num_steps = 1
    config.num_train_steps = 4
    info = data.DatasetInfo("cifar10", 10, (8, 8, 3), (0.5,) * 3, (0.25,) * 3, 64)
    mesh = train.make_mesh(jax.devices()[:1])
    setup = trainer.Setup(config, dataset=info, mesh=mesh)
    rng = np.random.default_rng(0)
    local = {
        "image": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 4).astype(np.int32),
        "pos": np.arange(4),
    }
    state = setup.initial_state()
    step = setup.compile_train_step()
    lowered = step.lower(state, train.shard_batch(local, mesh), setup.key)
    hlo = lowered.as_text(dialect="hlo", debug_info=True)
    new_state, _ = lowered.out_info  # the step's outputs' shapes and dtypes, not computed
    return state, new_state, _instructions(hlo)


def test_state_stays_float32(bf16_step):
    state, new_state, _ = bf16_step
    for s in (state, new_state):
        parts = {
            "params": s.params,
            "ema_params": s.ema_params,
            "batch_stats": s.batch_stats,
            "opt_state": s.opt_state,
        }
        for part, tree in parts.items():
            floats = [
                x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
            ]
            assert floats and set(floats) == {np.dtype(np.float32)}, part


def test_bfloat16_only_inside_the_model_and_every_reduction_float32(bf16_step):
    *_, instructions = bf16_step
    inside = _in_model(instructions)

    def in_model(inst):
        return "WideResNet" in inst["op_name"] or inst["computation"] in inside

    bf16 = [i for i in instructions if "bf16" in i["result"]]
    # The model does compute in bfloat16: its convolutions, forward and backward.
    convs = [i for i in instructions if i["opcode"] == "convolution"]
    assert convs and all(i["result"].startswith("bf16") for i in convs)
    # Nothing outside the model: the loss's softmax and divergences, the attack's steps, the
    # gradient averaging, the optimizer, the EMA and the divergence guard run in float32.
    outside = [(i["op_name"] or i["computation"], i["opcode"]) for i in bf16 if not in_model(i)]
    assert outside == [], outside[:5]
    # Every exp and log outside the model (softmax, log_softmax of the loss and the attack's
    # objective) is float32, and there are some.
    loss_ops = [
        i for i in instructions if i["opcode"] in ("exponential", "log") and not in_model(i)
    ]
    assert loss_ops and {i["result"].split("[")[0] for i in loss_ops} == {"f32"}
    # Every reduction accumulates in float32: BatchNorm's batch statistics, the pooling, the
    # gradients' sums over the batch (the logits bias's included), the loss's means.
    reductions = [i for i in instructions if i["opcode"] == "reduce"]
    bn = [i for i in reductions if "batchnorm" in i["op_name"]]
    assert bn and not [i["op_name"] for i in reductions if "bf16" in i["result"]]
