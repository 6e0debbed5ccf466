"""The one Monte-Carlo EM train step, shared by the mixture and HMDM, and its two model-free halves: the
DDPM ε-loss gradient step (:func:`denoising_step`) and the Dirichlet M-step (:func:`accumulate_counts`).

A step is ``E-step → ε-loss gradient step → M-step``. The two models differ only in the E-step: how the
classes of a batch are sampled (independent categoricals for the mixture, forward filtering backward
sampling for HMDM) and which counts feed the M-step. :func:`make_em_step` takes that E-step as a value::

    train_step = make_em_step(config, eps_fn, schedule, optimizer, mixture.sample_classes)
    state, metrics = jax.jit(train_step)(state, batch, key)

An E-step is ``e_step(config, eps_fn, params, schedule, state, batch, keys, axis_name) -> EStepResult``
(see :class:`EStepResult`); ``keys`` are the step's ``(score, sample)`` keys.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hmdm_jax import diffusion
from hmdm_jax.em import EMConfig, EpsFn, TrainEpsFn, frame_keys, observed_label_loss, step_keys, temperature_at
from hmdm_jax.parallel import psum_if
from hmdm_jax.state import TrainState

__all__ = ["EStep", "EStepResult", "accumulate_counts", "class_balanced_weights", "denoising_loss", "denoising_step",
           "dirichlet_log_probs", "end_epoch", "gradient_update", "m_step", "make_em_step"]

Array = jax.Array
# folded into the step's loss key for the dropout masks: the per-frame keys are fold_in(key, frame index),
# so a constant beyond any batch size keeps the two apart
DROPOUT_STREAM = 2**31 - 1


# --------------------------------------------------------------------------------------- the ε-loss step


def denoising_loss(
    eps_fn: EpsFn,
    params: Any,
    schedule: diffusion.Schedule,
    y: Array,
    classes: Array,
    keys: Array,
    weights: Array,
    normalizer: Array,
    label_dropout: float = 0.0,
    null_class: int | None = None,
) -> Array:
    """The DDPM ε-loss Σ_i w_i ‖ε_i − ε_θ(√ᾱ_t y_i + √(1−ᾱ_t) ε_i, t_i, x_i)‖²/D / normalizer, t ~ U{1..T}.

    Args:
      y: ``[B, *event]`` frames.
      classes: ``[B]`` int32 class of each frame (sampled or observed).
      keys: ``[B]`` per-frame PRNG keys (t, ε and label dropout of frame i come from keys[i]).
      weights: ``[B]`` float32 frame weights (0 for padding).
      normalizer: ``[]`` the total weight of the (global) batch, so that per-device losses add up.
      label_dropout: probability of replacing a class by ``null_class`` (classifier-free guidance).

    Returns:
      ``[]`` the weighted sum over frames of the per-frame mean squared error, divided by ``normalizer``.
    """

    def draw(key, frame):
        key_t, key_eps, key_drop = jax.random.split(key, 3)
        t = jax.random.randint(key_t, (), 1, schedule.num_steps + 1)
        eps = jax.random.normal(key_eps, frame.shape, frame.dtype)
        return t, eps, jax.random.bernoulli(key_drop, label_dropout)

    t, eps, drop = jax.vmap(draw)(keys, y)
    z_t = jax.vmap(diffusion.q_sample, (None, 0, 0, 0))(schedule, y, t, eps)
    if label_dropout > 0.0:
        classes = jnp.where(drop, null_class, classes)
    pred = eps_fn(params, z_t, t, classes)
    per_frame = jnp.mean(jnp.square(eps - pred).reshape(y.shape[0], -1), axis=1)
    return jnp.sum(weights * per_frame) / jnp.maximum(normalizer, 1e-6)


def class_balanced_weights(classes: Array, weights: Array, num_classes: int, axis_name: str | None = None) -> Array:
    """``[B]`` frame weights under which every class present in the (global) batch has the same total weight,
    and the total is that of ``weights``: w_i · W / (K_present · W_{x_i}), with W_k the weight of class k.
    Padding (weight 0) stays 0. A class with one frame in the batch weighs as much as one with a hundred."""
    per_class = psum_if(jax.ops.segment_sum(weights, classes, num_segments=num_classes), axis_name)
    present = jnp.sum(per_class > 0)
    share = jnp.where(per_class > 0, per_class, 1.0)[classes]
    return weights * jnp.sum(per_class) / (jnp.maximum(present, 1) * share)


def gradient_update(
    state: TrainState, grads: Any, optimizer: optax.GradientTransformation, ema_decay: float
) -> TrainState:
    """An optax step on ``grads`` and the EMA update; increments ``step``."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
    return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)


def denoising_step(
    state: TrainState,
    eps_fn: EpsFn,
    schedule: diffusion.Schedule,
    optimizer: optax.GradientTransformation,
    y: Array,
    classes: Array,
    weights: Array,
    key: Array,
    *,
    ema_decay: float,
    label_dropout: float = 0.0,
    null_class: int | None = None,
    axis_name: str | None = None,
    extra_loss: Callable[[Any], Array] | None = None,
    train_eps_fn: TrainEpsFn | None = None,
) -> tuple[TrainState, Array, Array]:
    """One gradient step on :func:`denoising_loss` (plus ``extra_loss``), summed across devices.

    Args:
      y: ``[B, *event]`` frames (this device's share of the global batch).
      classes: ``[B]`` int32 class of each frame.
      weights: ``[B]`` float32 frame weights (0 for padding).
      key: the step's loss key; frame i draws from ``frame_keys(key, B, axis_name)[i]``.
      extra_loss: optional ``extra_loss(params) -> []`` added to the objective (e.g. :func:`label_loss`),
        this device's share of a global-batch term.
      train_eps_fn: the dropout-on network (``models.make_train_eps_fn``); when given, the ε-loss uses it
        with a dropout key drawn from ``key`` (and, on a mesh, the device index, so devices drop
        different units). Without it the loss uses ``eps_fn`` (no dropout) and ``key`` is used as before.

    Returns:
      ``(state, loss, extra)``: the state after the optax and EMA update, the global-batch ε-loss and the
      global ``extra_loss`` (0 without one).
    """
    normalizer = psum_if(jnp.sum(weights), axis_name)
    keys = frame_keys(key, y.shape[0], axis_name)

    if train_eps_fn is not None:
        dropout_key = jax.random.fold_in(key, DROPOUT_STREAM)
        if axis_name is not None:
            dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
        eps_fn = functools.partial(train_eps_fn, dropout_key)

    def loss_fn(p):
        loss = denoising_loss(eps_fn, p, schedule, y, classes, keys, weights, normalizer, label_dropout, null_class)
        extra = jnp.float32(0.0) if extra_loss is None else extra_loss(p)
        return loss + extra, (loss, extra)

    (_, (loss, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # per-device losses are already divided by the global normalizer, so the sum is the global loss
    loss, extra, grads = psum_if((loss, extra, grads), axis_name)
    return gradient_update(state, grads, optimizer, ema_decay), loss, extra


def dirichlet_log_probs(counts: Array, pseudo_count: float, sticky_count: float = 0.0) -> Array:
    """log of the posterior-mean probabilities (counts + pseudo) / Σ, normalised over the last axis.

    Args:
      counts: ``[K]`` or ``[K, K]`` non-negative (expected) counts.
      sticky_count: added to the diagonal of a ``[K, K]`` count matrix.
    """
    alpha = counts + pseudo_count
    if counts.ndim == 2 and sticky_count:
        alpha = alpha + sticky_count * jnp.eye(counts.shape[0], dtype=counts.dtype)
    return jnp.log(alpha) - jnp.log(jnp.sum(alpha, axis=-1, keepdims=True))


def accumulate_counts(config: EMConfig, state: TrainState, class_counts: Array, transition_counts: Array) -> TrainState:
    """Adds a batch's counts to the running statistics and re-estimates π and A: every step (the running
    update), or at the end of every ``priors.epoch_steps`` steps, counting the step just taken."""
    priors = config.priors
    decay = 1.0 - priors.count_decay if priors.epoch_steps is None else 1.0
    state = state.replace(
        class_counts=decay * state.class_counts + class_counts,
        transition_counts=decay * state.transition_counts + transition_counts,
    )
    if priors.epoch_steps is None:
        return m_step(config, state)
    epoch_done = state.step % priors.epoch_steps == 0
    updated = end_epoch(config, state)
    fields = ("log_pi", "log_A", "class_counts", "transition_counts")
    return state.replace(**{f: jnp.where(epoch_done, getattr(updated, f), getattr(state, f)) for f in fields})


def m_step(config: EMConfig, state: TrainState) -> TrainState:
    """Sets π (if learned) and A (if learned) to their Dirichlet posterior means given the counts."""
    priors = config.priors
    if priors.learn_pi:
        state = state.replace(log_pi=dirichlet_log_probs(state.class_counts, priors.pseudo_count))
    if priors.learn_A:
        state = state.replace(
            log_A=dirichlet_log_probs(state.transition_counts, priors.pseudo_count, priors.sticky_count)
        )
    return state


def end_epoch(config: EMConfig, state: TrainState) -> TrainState:
    """The epoch-level M-step: re-estimate π, A from the accumulated counts, then reset them."""
    state = m_step(config, state)
    return state.replace(
        class_counts=jnp.zeros_like(state.class_counts), transition_counts=jnp.zeros_like(state.transition_counts)
    )


# --------------------------------------------------------------------------------------- the EM step


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
    train_eps_fn: TrainEpsFn | None = None,
) -> Callable[[TrainState, dict, Array], tuple[TrainState, dict]]:
    """``train_step(state, batch, key) -> (state, metrics)`` of Monte-Carlo EM with ``e_step``.

    The E-step and the label loss score classes with ``eps_fn`` (deterministic: dropout would add noise
    to the class posterior); only the ε-loss trains with dropout, through ``train_eps_fn`` when given.

    Under a named mapped axis (``axis_name``, see ``hmdm_jax.parallel``) gradients and counts are summed
    across devices, so the update equals the single-device update on the global batch. Metrics: ``loss``,
    ``temperature``, the E-step's metrics, and ``label_loss`` when ``config.labels.loss_weight > 0``.
    """

    def train_step(state: TrainState, batch: dict, key: Array) -> tuple[TrainState, dict]:
        key_score, key_sample, key_loss, key_label = step_keys(config, key)
        e = e_step(config, eps_fn, state.params, schedule, state, batch, (key_score, key_sample), axis_name)
        if config.balance_loss:
            e = e._replace(weights=class_balanced_weights(e.classes, e.weights, config.num_classes, axis_name))
        step_before_update = state.step
        state, loss, supervised = denoising_step(
            state, eps_fn, schedule, optimizer, e.frames, e.classes, e.weights, key_loss,
            ema_decay=ema_decay, label_dropout=config.labels.dropout, null_class=config.num_classes,
            axis_name=axis_name, train_eps_fn=train_eps_fn,
            extra_loss=observed_label_loss(config, eps_fn, schedule, e.frames, e.labels, e.label_prior,
                                           step_before_update, key_label, axis_name),
        )
        state = accumulate_counts(config, state, e.initial_counts, e.transition_counts)
        metrics = {"loss": loss, **e.metrics, "temperature": temperature_at(config, step_before_update)}
        if config.labels.loss_weight > 0:
            metrics["label_loss"] = supervised
        return state, metrics

    return train_step
