"""Data parallelism: the device mesh, the run's keys, placing arrays on the mesh, and the one
jit(shard_map(...)) wrapper that the train step, the evaluators and AutoAttack are mapped with.

Per-device code is written pmap-style: it sees its own rows of the batch and reduces over the
mesh axis `AXIS` with explicit collectives (`lax.pmean`, `lax.psum`).

    mesh = make_mesh()                                     # all devices of all processes
    step = data_parallel(per_device_step, mesh, (P(), P(AXIS)), P())
    out = step(replicate(params, mesh), shard_batch(host_batch, mesh))
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from score_jax import xla_options

AXIS = "batch"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all devices (of all processes), axis "batch"."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def base_key(seed: int) -> np.ndarray:
    """The run's base PRNG key as raw uint32 data (identical on every host)."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree on every device of `mesh` (replicated; each process supplies its copy)."""
    return jax.device_put(jax.device_get(tree), NamedSharding(mesh, P()))


def replicated_abstract(tree: Any, mesh: Mesh) -> Any:
    """`tree`'s leaves (arrays or jax.ShapeDtypeStructs) as jax.ShapeDtypeStructs with the
    placement `replicate` gives them: a restore target that holds no data."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays split on "batch" from this process's rows (each host passes its own part)."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def data_parallel(
    fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any, *, donate_argnums: Any = ()
) -> Callable:
    """jit(shard_map(fn)) over `mesh`, compiled with score_jax.xla_options.

    check_vma=False gives pmap semantics: a replicated input's gradient is per-device (not
    implicitly summed), so the per-device code's explicit collectives are the only reductions.
    """
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return xla_options.jit(mapped, donate_argnums=donate_argnums)
