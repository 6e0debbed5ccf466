"""The mixture of diffusion models (Algorithm 1 of the paper draft) as a jitted Monte-Carlo EM step.

Each image y has a class x ~ Categorical(π) and, given x, a class-conditional DDPM. One step:

1. E-step: score all K classes of each frame (``em.e_step_scores``, common random numbers across
   classes), clamp observed labels, and sample x from p̃(x = k | z, y) ∝ b̃_k π_k (optionally balanced
   over the batch, ``EMConfig.balance_classes``);
2. a DDPM ε-loss gradient step with the sampled classes (optax) and the EMA update;
3. M-step on π from the sampled class counts (Dirichlet pseudo-counts; fixed uniform by default).

Under a named mapped axis (``axis_name``, see ``hmdm_jax.parallel``) gradients and class counts are
summed across devices, so the update equals the single-device update on the global batch.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from hmdm_jax import diffusion, emission
from hmdm_jax.em import (
    FINAL_STEP,
    EMConfig,
    EpsFn,
    balanced_class_posterior,
    evaluation_config,
    frame_keys,
    posterior_entropy,
    TrainEpsFn,
    e_step_scores,
)
from hmdm_jax.parallel import pmean_if, psum_if
from hmdm_jax.state import TrainState
from hmdm_jax.steps import EStepResult, denoising_step, make_em_step

__all__ = [
    "class_posterior", "make_supervised_step", "make_train_step", "predict", "sample_classes",
]

Array = jax.Array
Batch = dict  # {"images": [B, *event] float32, "labels": [B] int32 (−1 = unknown)}


def class_posterior(log_b: Array, log_pi: Array, labels: Array | None = None) -> Array:
    """log p̃(x = k | z, y) ∝ log b̃_k + log π_k, with observed labels clamped exactly.

    Args:
      log_b: ``[B, K]`` class log-scores (tempered or not).
      log_pi: ``[K]`` log prior.
      labels: optional ``[B]`` int32, −1 = unknown; a known label gets posterior probability 1.

    Returns:
      ``[B, K]`` normalised log-probabilities (−inf for impossible classes).
    """
    if labels is not None:
        log_b = emission.clamp_to_labels(log_b, labels)
    return emission.class_log_posterior(log_b, log_pi)


def sample_classes(config: EMConfig, eps_fn: EpsFn, params: Any, schedule: diffusion.Schedule, state: TrainState,
                   batch: Batch, keys: tuple[Array, Array], axis_name: str | None = None) -> EStepResult:
    """The mixture's E-step: score every class of every frame, clamp observed labels, sample each frame's
    class from its posterior (balanced over the batch with ``config.balance_classes``); class counts."""
    y = batch["images"]
    batch_size = y.shape[0]
    labels = batch.get("labels", jnp.full((batch_size,), -1, jnp.int32))
    key_score, key_sample = keys
    log_b = e_step_scores(config, eps_fn, params, schedule, y, frame_keys(key_score, batch_size, axis_name), state.step)
    log_post = class_posterior(log_b, state.log_pi, labels)
    if config.balance_classes:
        log_post = balanced_class_posterior(log_post, state.log_pi, axis_name)
    classes = jax.vmap(jax.random.categorical)(frame_keys(key_sample, batch_size, axis_name), log_post)
    k = config.num_classes
    counts = psum_if(jnp.sum(jax.nn.one_hot(classes, k), axis=0), axis_name)
    metrics = {"posterior_entropy": pmean_if(posterior_entropy(log_post), axis_name),
               "class_usage": counts / jnp.sum(counts)}
    return EStepResult(y, classes, jnp.ones((batch_size,), jnp.float32), labels, state.log_pi, counts,
                       jnp.zeros((k, k), jnp.float32), metrics)


def make_train_step(
    config: EMConfig,
    eps_fn: EpsFn,
    schedule: diffusion.Schedule,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float = 0.999,
    axis_name: str | None = None,
    train_eps_fn: TrainEpsFn | None = None,
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, dict]]:
    """``train_step(state, batch, key) -> (state, metrics)`` for the mixture: :func:`steps.make_em_step`
    with :func:`sample_classes` (jit it, or let ``hmdm_jax.parallel`` map it over devices).

    ``batch["images"]``: ``[B, *event]``; ``batch["labels"]``: ``[B]`` int32 with −1 for unknown (optional).
    Metrics: ``loss``, ``posterior_entropy`` (nats), ``class_usage [K]`` (fractions of sampled classes),
    ``temperature``, and ``label_loss`` when ``config.labels.loss_weight > 0``.
    """
    return make_em_step(config, eps_fn, schedule, optimizer, sample_classes, ema_decay=ema_decay, axis_name=axis_name,
                        train_eps_fn=train_eps_fn)


def make_supervised_step(
    eps_fn: EpsFn,
    schedule: diffusion.Schedule,
    optimizer: optax.GradientTransformation,
    *,
    num_classes: int,
    label_dropout: float = 0.0,
    ema_decay: float = 0.999,
    axis_name: str | None = None,
    train_eps_fn: TrainEpsFn | None = None,
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, dict]]:
    """A plain class-conditional DDPM step with every label observed (no E-step, no M-step).

    Used to pretrain the conditional diffusion that the fine-tuning ablation starts from, and as the
    "plain step" baseline of ``benchmarks/train_bench.py``. ``batch["labels"]`` must be all known.
    """

    def train_step(state: TrainState, batch: Batch, key: Array) -> tuple[TrainState, dict]:
        y, labels = batch["images"], batch["labels"]
        state, loss, _ = denoising_step(
            state, eps_fn, schedule, optimizer, y, labels, jnp.ones((y.shape[0],), jnp.float32), key,
            ema_decay=ema_decay, label_dropout=label_dropout, null_class=num_classes, axis_name=axis_name,
            train_eps_fn=train_eps_fn,
        )
        return state, {"loss": loss}

    return train_step


def predict(
    config: EMConfig,
    eps_fn: EpsFn,
    params: Any,
    schedule: diffusion.Schedule,
    log_pi: Array,
    y: Array,
    key: Array,
    *,
    estimator: str | None = None,
    num_t: int | None = None,
) -> tuple[Array, Array]:
    """Class assignments of images by the posterior mode (jit with ``static_argnums=(0, 1)``).

    Args:
      y: ``[B, *event]`` images.
      estimator, num_t: override the training estimator (e.g. more t-draws, or "elbo", for evaluation).

    Returns:
      ``(classes [B] int32, log_posterior [B, K])``.
    """
    eval_config = evaluation_config(config, estimator, num_t)
    log_b = e_step_scores(eval_config, eps_fn, params, schedule, y, frame_keys(key, y.shape[0]), FINAL_STEP)
    log_post = class_posterior(log_b, log_pi)
    return jnp.argmax(log_post, axis=-1).astype(jnp.int32), log_post
