"""Data-parallel training over all local devices, and across hosts.

Why ``jax.shard_map`` over a 1-D device mesh rather than ``jax.pmap``: in the installed JAX, ``pmap`` is
in maintenance mode and implemented on top of ``shard_map``; ``shard_map`` takes ordinary (global) arrays,
so the same step function, the same :class:`~hmdm_jax.state.TrainState` and the same Orbax checkpoints
serve one device, eight GPUs or a TPU pod slice, with no leading device axis to add and strip.

What is split and what is summed. The batch (frames for the mixture, sequences for HMDM) is split over the
mesh axis ``"data"``; each device runs the per-class emission pass (the dominant cost, B·n·K network
evaluations), the forward filter and backward sampling, and the ε-loss on its share. The train steps of
``mixture`` and ``hmdm`` are written with an ``axis_name``: gradients, the loss normaliser and the
sufficient statistics of π and A (class, initial-state and transition counts) are summed across devices
(``lax.psum``) before the optimizer and M-step updates, so the updated state is identical on every device
and equal to the single-device update on the same global batch. Per-frame random draws come from
``fold_in(step_key, global frame index)`` (``em.frame_keys``), so even the draws do not depend on the
number of devices: 1-device and N-device steps agree to float tolerance (tests/test_parallel.py).

A global batch that does not divide by the number of devices is rejected with a clear error (rather than
padded), because padding frames would silently change the batch statistics of the mixture.

Multi-host (TPU pod slices, several GPU nodes): call :func:`initialize_distributed` first on every host;
each host reads its own shard of the data (``jax.process_index()`` of ``jax.process_count()``; see
``hmdm_jax.data``), and :func:`global_batch` assembles the host-local shards into one global array over
the mesh of all devices. Exact commands are in README ("Running on TPU", "Running on GPU").
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "check_divisible", "DATA_AXIS", "data_mesh", "global_batch", "initialize_distributed",
    "make_parallel_step", "pmean_if", "psum_if", "replicate", "shard_batch",
]

DATA_AXIS = "data"


def initialize_distributed(**kwargs) -> None:
    """``jax.distributed.initialize(**kwargs)`` when running on more than one host.

    On TPU pod slices and on Slurm/Open MPI GPU clusters the arguments are discovered automatically;
    elsewhere pass ``coordinator_address``, ``num_processes`` and ``process_id``.
    """
    jax.distributed.initialize(**kwargs)


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_divisible(global_batch_size: int, mesh: Mesh) -> None:
    """Raises a clear ``ValueError`` when the global batch does not split evenly over the devices."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(
            f"the global batch size {global_batch_size} is not divisible by the number of devices {n}; "
            f"choose a batch size that is a multiple of {n}"
        )


def make_parallel_step(
    make_step: Callable[..., Callable], mesh: Mesh, *args, **kwargs
) -> Callable[[Any, dict, jax.Array], tuple[Any, dict]]:
    """A jitted data-parallel ``train_step(state, batch, key)`` over ``mesh``.

    Args:
      make_step: ``mixture.make_train_step``, ``hmdm.make_train_step`` or ``mixture.make_supervised_step``.
      mesh: from :func:`data_mesh`.
      *args, **kwargs: passed to ``make_step`` (``axis_name`` is set here).

    The state and key are replicated; every array of the batch is split along its leading axis.
    """
    step = make_step(*args, axis_name=DATA_AXIS, **kwargs)
    mapped = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P()),
        out_specs=(P(), P()),
        check_vma=False,  # the psums make the outputs replicated; the checker cannot see through the optimizer
    )

    def parallel_step(state, batch, key):
        check_divisible(jax.tree.leaves(batch)[0].shape[0], mesh)
        return jitted(state, batch, key)

    jitted = jax.jit(mapped)
    return parallel_step


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places a host batch on the mesh, split along the leading axis (single host)."""
    check_divisible(jax.tree.leaves(batch)[0].shape[0], mesh)
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assembles each host's shard of the batch into global arrays over the mesh (multi-host).

    Every host passes its own ``[B_local, ...]`` arrays; the result has leading size
    ``B_local · jax.process_count()``.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (the train state) on every device of the mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), sharding), tree)


def psum_if(x: Any, axis_name: str | None) -> Any:
    """Sum across devices when running under a named mapped axis, identity otherwise."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def pmean_if(x: Any, axis_name: str | None) -> Any:
    """Average across devices when running under a named mapped axis, identity otherwise."""
    return x if axis_name is None else jax.lax.pmean(x, axis_name)
