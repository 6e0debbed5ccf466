"""The one Monte-Carlo EM train step, shared by the mixture and HMDM.

A step is ``E-step → ε-loss gradient step → M-step``. The two models differ only in the E-step: how the
classes of a batch are sampled (independent categoricals for the mixture, forward filtering backward
sampling for HMDM) and which counts feed the M-step. :func:`make_em_step` takes that E-step as a value::

    train_step = make_em_step(config, eps_fn, schedule, optimizer, mixture.sample_classes)
    state, metrics = jax.jit(train_step)(state, batch, key)

An E-step is ``e_step(config, eps_fn, params, schedule, state, batch, keys, axis_name) -> EStepResult``
(see :class:`EStepResult`); ``keys`` are the step's ``(score, sample)`` keys.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hmdm_jax import diffusion
from hmdm_jax.em import (EMConfig, EpsFn, accumulate_counts, denoising_step, observed_label_loss, step_keys,
                         temperature_at)
from hmdm_jax.state import TrainState

__all__ = ["EStep", "EStepResult", "make_em_step"]

Array = jax.Array


class EStepResult(NamedTuple):
    """What an E-step hands to the shared ε-loss and M-step.

    Attributes:
      frames: ``[F, *event]`` the batch's frames (sequences flattened).
      classes: ``[F]`` int32 sampled class of each frame (any valid class for padding).
      weights: ``[F]`` float32 frame weights (0 for padding).
      labels: ``[F]`` int32 observed labels (−1 = unknown or padding), for the label loss.
      label_prior: ``[K]`` the log prior of the label loss's class posterior.
      initial_counts: ``[K]`` the batch's class (mixture) or initial-state (HMDM) counts, global over devices.
      transition_counts: ``[K, K]`` the batch's transition counts (zeros for the mixture), global.
      metrics: the E-step's own metrics (``class_usage`` and model-specific ones).
    """

    frames: Array
    classes: Array
    weights: Array
    labels: Array
    label_prior: Array
    initial_counts: Array
    transition_counts: Array
    metrics: dict


EStep = Callable[..., EStepResult]


def make_em_step(
    config: EMConfig,
    eps_fn: EpsFn,
    schedule: diffusion.Schedule,
    optimizer: optax.GradientTransformation,
    e_step: EStep,
    *,
    ema_decay: float = 0.999,
    axis_name: str | None = None,
) -> Callable[[TrainState, dict, Array], tuple[TrainState, dict]]:
    """``train_step(state, batch, key) -> (state, metrics)`` of Monte-Carlo EM with ``e_step``.

    Under a named mapped axis (``axis_name``, see ``hmdm_jax.parallel``) gradients and counts are summed
    across devices, so the update equals the single-device update on the global batch. Metrics: ``loss``,
    ``temperature``, the E-step's metrics, and ``label_loss`` when ``config.label_loss_weight > 0``.
    """

    def train_step(state: TrainState, batch: dict, key: Array) -> tuple[TrainState, dict]:
        key_score, key_sample, key_loss, key_label = step_keys(config, key)
        score_params = state.ema_params if config.score_with_ema else state.params
        e = e_step(config, eps_fn, score_params, schedule, state, batch, (key_score, key_sample), axis_name)
        step_before_update = state.step
        state, loss, supervised = denoising_step(
            state, eps_fn, schedule, optimizer, e.frames, e.classes, e.weights, key_loss,
            ema_decay=ema_decay, label_dropout=config.label_dropout, null_class=config.num_classes,
            axis_name=axis_name,
            extra_loss=observed_label_loss(config, eps_fn, schedule, e.frames, e.labels, e.label_prior,
                                           step_before_update, key_label, axis_name),
        )
        state = accumulate_counts(config, state, e.initial_counts, e.transition_counts)
        metrics = {"loss": loss, **e.metrics, "temperature": temperature_at(config, step_before_update)}
        if config.label_loss_weight > 0:
            metrics["label_loss"] = supervised
        return state, metrics

    return train_step
