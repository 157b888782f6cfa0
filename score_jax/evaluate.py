"""Clean and PGD accuracy of a model on a data split, data-parallel over the mesh.

Robust accuracy is the fraction of examples still classified correctly at the PGD point that
maximises the configured objective (cross-entropy or CW margin; restarts keep, per example, the
point with the highest objective).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from score_jax import attacks, data, losses
from score_jax.train import AXIS, shard_batch


def eval_step(
    variables: dict,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    model: nn.Module,
    attack: ml_collections.ConfigDict,
) -> dict[str, jax.Array]:
    """Per-device sums over this batch: correct clean, correct under PGD, and the count."""
    x = batch["image"].astype(jnp.float32) / 255.0
    labels, mask = batch["label"], batch["mask"]

    def logits_fn(inputs):
        return model.apply(variables, inputs, train=False)

    offset = jax.lax.axis_index(AXIS) * x.shape[0]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        jax.random.wrap_key_data(key), offset + jnp.arange(x.shape[0])
    )
    clean = losses.accuracy(logits_fn(x), labels)
    if attack.num_steps > 0:
        x_adv = attacks.pgd(
            attacks.eval_objective(attack.objective, logits_fn, labels),
            x,
            keys,
            eps=attack.eps,
            step_size=attack.step_size,
            num_steps=attack.num_steps,
            norm=attack.norm,
            init=attack.init,
            restarts=attack.restarts,
        )
        adv = losses.accuracy(logits_fn(x_adv), labels)
    else:
        adv = clean
    sums = {"clean": jnp.sum(clean * mask), "adv": jnp.sum(adv * mask), "count": jnp.sum(mask)}
    return jax.lax.psum(sums, AXIS)


def compile_eval_step(model: nn.Module, attack: ml_collections.ConfigDict, mesh: Mesh):
    """jit(shard_map(eval_step)): variables replicated, batch split on "batch"."""
    step = functools.partial(eval_step, model=model, attack=attack)
    return jax.jit(
        jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(), check_vma=False)
    )


def evaluate(
    step_fn,
    variables: dict,
    split: data.Split,
    batch_size: int,
    mesh: Mesh,
    key: np.ndarray,
) -> dict[str, float]:
    """{"clean_accuracy", "adv_accuracy", "num_examples"} of `variables` on `split`."""
    totals = None
    for i, batch in enumerate(data.eval_batches(split, batch_size)):
        batch_key = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key), i))
        sums = step_fn(variables, shard_batch(batch, mesh), np.asarray(batch_key))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.tree.map(float, totals)  # one host transfer at the end
    n = max(totals["count"], 1.0)
    return {
        "clean_accuracy": totals["clean"] / n,
        "adv_accuracy": totals["adv"] / n,
        "num_examples": int(totals["count"]),
    }
