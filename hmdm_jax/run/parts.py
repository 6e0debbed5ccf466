"""Assembling a run from its config: the network, ``eps_fn``, schedule, optimizer, random streams, the
initial state, the jitted step, and loading a saved run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import optax

from hmdm_jax import checkpoint, diffusion, hmdm, mixture, models, parallel
from hmdm_jax.run.config import RunConfig
from hmdm_jax.state import TrainState, create_train_state

__all__ = ["RunParts", "Streams", "build_parts", "init_state", "load_run", "make_step", "streams"]


class RunParts(NamedTuple):
    """The static pieces a run is built from (not saved; rebuilt from the config)."""

    model: Any
    eps_fn: Callable
    schedule: diffusion.Schedule
    optimizer: optax.GradientTransformation
    train_eps_fn: Callable | None = None  # the dropout-on network for the ε-loss; None without dropout


class Streams(NamedTuple):
    """Independent PRNG keys split once from the run's seed.

    Attributes:
      init: the ε-network's initial parameters.
      train: the base of the step keys, ``fold_in(train, step)`` (``TrainState.key``).
      eval: decoding for evaluation.
      heuristics: the loop's periodic hooks (re-seeding, band choice), folded with the step they run at.
    """

    init: jax.Array
    train: jax.Array
    eval: jax.Array
    heuristics: jax.Array


def streams(seed: int) -> Streams:
    """The run's four independent streams: one ``jax.random.split`` of ``PRNGKey(seed)``."""
    return Streams(*jax.random.split(jax.random.PRNGKey(seed), 4))


def build_parts(config: RunConfig) -> RunParts:
    """Model, ``eps_fn``, schedule and optimizer for ``config``."""
    model = models.build_model(config.network, config.num_classes)
    schedule = diffusion.get_schedule(config.diffusion.schedule, config.diffusion.timesteps)
    o = config.optim
    lr = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
    optimizer = optax.chain(optax.clip_by_global_norm(o.grad_clip), optax.adam(lr))
    # without dropout the train-mode network equals eps_fn: leave it out, so the step draws no dropout key
    train_eps_fn = models.make_train_eps_fn(model) if config.network.dropout > 0 else None
    return RunParts(model, models.make_eps_fn(model), schedule, optimizer, train_eps_fn)


def init_state(config: RunConfig, parts: RunParts, params: Any = None) -> TrainState:
    """A fresh state: parameters from the init stream (or ``params``), uniform π and A."""
    keys = streams(config.seed)
    if params is None:
        params = models.init_params(keys.init, parts.model, config.event_shape)
    return create_train_state(keys.train, params, parts.optimizer, config.num_classes)


def make_step(config: RunConfig, parts: RunParts, mesh=None, *, fused: int = 1
              ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step ``(state, batch) -> (state, metrics)`` with key ``fold_in(state.key, state.step)``.

    With ``fused > 1`` it takes batches stacked on a leading axis of that size and runs them in one
    ``lax.scan``. On a mesh of more than one device the step is data-parallel.
    """
    factory = hmdm.make_train_step if config.model_type == "hmdm" else mixture.make_train_step
    args = (config.em, parts.eps_fn, parts.schedule, parts.optimizer)
    kwargs = dict(ema_decay=config.optim.ema_decay, train_eps_fn=parts.train_eps_fn)
    if mesh is not None and mesh.devices.size > 1:
        inner = parallel.make_parallel_step(factory, mesh, *args, **kwargs)
    else:
        inner = factory(*args, **kwargs)

    def one(state, batch):
        return inner(state, batch, jax.random.fold_in(state.key, state.step))

    if fused == 1:
        return jax.jit(one, donate_argnums=0)
    return jax.jit(lambda state, batches: jax.lax.scan(one, state, batches), donate_argnums=0)


def load_run(workdir: str | Path, step: int | None = None) -> tuple[RunConfig, RunParts, TrainState, dict]:
    """The config as trained (``RunConfig.with_decisions`` of the saved metadata), parts, restored state
    and checkpoint metadata of the run in ``workdir``.

    Raises ``checkpoint.CheckpointNotFoundError`` naming the directory when there is no checkpoint.
    """
    directory = Path(workdir) / "checkpoints"
    config = RunConfig.from_dict(checkpoint.read_config(directory, step))
    parts = build_parts(config)
    with checkpoint.Checkpointer.open(directory, read_only=True, config=config) as ckpt:
        state, metadata = ckpt.restore(init_state(config, parts), step)
    return config.with_decisions(metadata.get("decisions", {})), parts, state, metadata
