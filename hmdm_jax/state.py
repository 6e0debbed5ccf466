"""The one training-state pytree that every train step, the training loop and checkpoints share."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = [
    "create_train_state", "TrainState",
]

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint must restore to continue a run exactly.

    Attributes:
      step: ``[]`` int32, number of optimizer steps taken.
      params: the ε-network parameters being trained.
      ema_params: exponential moving average of ``params`` (used for sampling and evaluation).
      opt_state: the optax optimizer state.
      log_pi: ``[K]``, log p(x = k) (mixture) or log p(x_1 = k) (HMDM).
      log_A: ``[K, K]``, log p(x_{l+1} = j | x_l = i); uniform and unused by the mixture.
      class_counts: ``[K]``, running sufficient statistics for π: sampled class counts (mixture) or
        initial-state counts (HMDM), decayed or accumulated as ``EMConfig.prior_update`` says.
      transition_counts: ``[K, K]``, running transition counts for A (HMDM; zeros for the mixture).
      key: a raw ``uint32[2]`` PRNG key, the base of the step keys ``fold_in(key, step)``.

    Only arrays: the run's config is not part of the state (the checkpointer saves it beside).
    """

    step: Array
    params: Any
    ema_params: Any
    opt_state: Any
    log_pi: Array
    log_A: Array
    class_counts: Array
    transition_counts: Array
    key: Array

    @property
    def num_classes(self) -> int:
        return self.log_pi.shape[0]


def create_train_state(
    key: Array,
    params: Any,
    optimizer: optax.GradientTransformation,
    num_classes: int,
    *,
    log_pi: Array | None = None,
    log_A: Array | None = None,
) -> TrainState:
    """A fresh :class:`TrainState`: uniform π and A unless given, zero counts, EMA = params.

    Args:
      key: a raw ``uint32[2]`` key (``jax.random.PRNGKey(seed)``); the run's base key.
      params: initial ε-network parameters.
      optimizer: the optax transformation whose state is initialised here.
      num_classes: K.
      log_pi: optional ``[K]`` initial log π.
      log_A: optional ``[K, K]`` initial log A.
    """
    k = num_classes
    uniform = jnp.full((k,), -jnp.log(k), jnp.float32)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.array, params),
        opt_state=optimizer.init(params),
        log_pi=uniform if log_pi is None else jnp.asarray(log_pi, jnp.float32),
        log_A=jnp.tile(uniform, (k, 1)) if log_A is None else jnp.asarray(log_A, jnp.float32),
        class_counts=jnp.zeros((k,), jnp.float32),
        transition_counts=jnp.zeros((k, k), jnp.float32),
        key=jnp.asarray(key),
    )
