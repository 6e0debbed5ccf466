"""The hidden Markov diffusion model (Algorithm 3 of the paper draft): jitted EM step, decoding, bound.

The classes x_1..x_n of a sequence y_1..y_n follow a Markov chain (π, A) and each frame is a
class-conditional DDPM. One training step on a batch of sequences ``[B, n, *event]``:

1. emissions log b̃_k for every frame and class in one batched pass (``em.e_step_scores``; padded frames
   are scored too, static shapes, and ignored by the masked HMM);
2. observed labels clamp the emissions (−inf for the other classes);
3. forward filtering and backward sampling of the state path, per sequence (vmap over B);
4. a DDPM ε-loss gradient step over valid frames with their sampled states;
5. the M-step for π and A from the sampled paths (or smoothed expected counts) plus Dirichlet
   pseudo-counts.

After training, :func:`decode` runs jit-compiled emissions and Viterbi on held-out sequences.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hmdm_jax import diffusion, emission, hmm
from hmdm_jax.em import (
    FINAL_STEP,
    TEMPERATURE_GRID,
    EMConfig,
    EpsFn,
    Priors,
    evaluation_config,
    frame_keys,
    TrainEpsFn,
    e_step_scores,
)
from hmdm_jax.parallel import pmean_if, psum_if
from hmdm_jax.state import TrainState
from hmdm_jax.steps import EStepResult, dirichlet_log_probs, make_em_step

__all__ = [
    "BAUM_WELCH_ITERATIONS", "decode", "DecodeResult", "DecodingFit", "decoding_fit", "log_likelihood_bound",
    "make_train_step", "refit_chain", "sample_paths", "select_decoding", "sequence_log_emissions",
    "tempered_log_densities",
]

Array = jax.Array
Batch = dict  # {"images": [B, n, *event], "mask": [B, n] bool, "labels": [B, n] int32 (−1 = unknown)}


def sequence_log_emissions(
    config: EMConfig, eps_fn: EpsFn, params: Any, schedule: diffusion.Schedule, images: Array, key: Array,
    step: Array, labels: Array | None = None, axis_name: str | None = None,
) -> Array:
    """Tempered emissions of every frame of every sequence, observed labels clamped.

    Args:
      images: ``[B, n, *event]``.
      labels: optional ``[B, n]`` int32, −1 = unknown.

    Returns:
      ``[B, n, K]`` log b̃ (tempered; −inf where a known label excludes the class).
    """
    batch, length = images.shape[:2]
    frames = images.reshape((batch * length,) + images.shape[2:])
    keys = frame_keys(key, batch * length, axis_name)
    log_b = e_step_scores(config, eps_fn, params, schedule, frames, keys, step).reshape(batch, length, -1)
    return log_b if labels is None else emission.clamp_to_labels(log_b, labels)


def _batch_fields(batch: Batch) -> tuple[Array, Array, Array]:
    images = batch["images"]
    shape = images.shape[:2]
    mask = batch.get("mask", jnp.ones(shape, bool))
    labels = batch.get("labels", jnp.full(shape, -1, jnp.int32))
    return images, mask, labels


def sample_paths(config: EMConfig, eps_fn: EpsFn, params: Any, schedule: diffusion.Schedule, state: TrainState,
                 batch: Batch, keys: tuple[Array, Array], axis_name: str | None = None) -> EStepResult:
    """HMDM's E-step: emissions of every frame and class (observed labels clamped), then a state path per
    sequence by forward filtering backward sampling; initial and transition counts from the sampled paths
    (``priors.counts_from="sampled"``) or the smoothed expected counts (``"smoothed"``)."""
    images, mask, labels = _batch_fields(batch)
    batch_size, length = images.shape[:2]
    key_score, key_sample = keys
    k = config.num_classes
    log_b = sequence_log_emissions(config, eps_fn, params, schedule, images, key_score, state.step, labels, axis_name)
    states, log_marginal = jax.vmap(hmm.ffbs, (0, None, None, 0, 0))(
        frame_keys(key_sample, batch_size, axis_name), state.log_pi, state.log_A, log_b, mask
    )
    if config.priors.counts_from == "sampled":
        counts = jax.vmap(hmm.path_counts, (0, None, 0))(states, k, mask)
    else:
        counts = jax.vmap(hmm.expected_counts, (None, None, 0, 0))(state.log_pi, state.log_A, log_b, mask)
    initial, transitions = psum_if((jnp.sum(counts.initial, 0), jnp.sum(counts.transitions, 0)), axis_name)
    usage = psum_if(jnp.sum(jax.nn.one_hot(states, k) * mask[..., None], axis=(0, 1)), axis_name)
    metrics = {"log_marginal": pmean_if(jnp.mean(log_marginal), axis_name),
               "class_usage": usage / jnp.maximum(jnp.sum(usage), 1.0)}
    frames = images.reshape((batch_size * length,) + images.shape[2:])
    return EStepResult(
        frames, jnp.maximum(states.reshape(-1), 0),  # padded frames (−1) have weight 0
        mask.reshape(-1).astype(jnp.float32), jnp.where(mask, labels, -1).reshape(-1),
        jnp.zeros(k),  # the label loss is frame-wise, with a uniform prior
        initial, transitions, metrics,
    )


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
    """``train_step(state, batch, key) -> (state, metrics)`` for HMDM: :func:`steps.make_em_step` with
    :func:`sample_paths` (jit it, or map it over devices with ``hmdm_jax.parallel``).

    ``batch``: ``images [B, n, *event]``, ``mask [B, n]`` bool (optional), ``labels [B, n]`` int32 with −1
    for unknown (optional). Metrics: ``loss``, ``log_marginal`` (mean tempered log p(Y) per sequence),
    ``class_usage [K]`` over valid frames, ``temperature``, and ``label_loss`` when
    ``config.labels.loss_weight > 0``.
    """
    if config.balance_classes:
        # the states of a sequence are sampled jointly (FFBS); a per-frame rescaling would break the chain
        raise ValueError("EMConfig.balance_classes is for the mixture; HMDM samples its states with FFBS "
                         "and keeps them alive by re-seeding dead states (reseed.every)")
    return make_em_step(config, eps_fn, schedule, optimizer, sample_paths, ema_decay=ema_decay, axis_name=axis_name,
                        train_eps_fn=train_eps_fn)


class DecodeResult(NamedTuple):
    """Decoded held-out sequences.

    Attributes:
      states: ``[N, n]`` int32 Viterbi paths, −1 past each sequence's length.
      log_joint: ``[N]`` log max_x p(x, Y) of the Viterbi path under the scoring emissions.
      marginals: ``[N, n, K]`` smoothed posteriors p(x_i = k | Y) (0 past each length).
      log_emissions: ``[N, n, K]`` the scoring emissions log b̃_k of every frame, before the chain.
    """

    states: Array
    log_joint: Array
    marginals: Array
    log_emissions: Array


def decode(
    config: EMConfig,
    eps_fn: EpsFn,
    params: Any,
    schedule: diffusion.Schedule,
    log_pi: Array,
    log_A: Array,
    images: Array,
    mask: Array,
    key: Array,
    *,
    estimator: str | None = None,
    num_t: int | None = None,
) -> DecodeResult:
    """Viterbi decoding of sequences (jit with ``static_argnames=("config", "eps_fn", "estimator", "num_t")``).

    Emissions use the training estimator and temperature unless ``estimator``/``num_t`` override them:
    more t-draws (e.g. 64) or ``"elbo"`` score more accurately.

    Args:
      images: ``[N, n, *event]``; mask: ``[N, n]`` bool.
    """
    eval_config = evaluation_config(config, estimator, num_t)
    log_b = sequence_log_emissions(eval_config, eps_fn, params, schedule, images, key, jnp.int32(FINAL_STEP))
    paths = jax.vmap(hmm.viterbi, (None, None, 0, 0))(log_pi, log_A, log_b, mask)
    marginals = jax.vmap(hmm.smooth, (None, None, 0, 0))(log_pi, log_A, log_b, mask)
    return DecodeResult(paths.states, paths.log_joint, marginals, log_b)


def log_likelihood_bound(
    eps_fn: EpsFn,
    params: Any,
    schedule: diffusion.Schedule,
    log_pi: Array,
    log_A: Array,
    images: Array,
    mask: Array,
    key: Array,
    *,
    num_t: int | None = None,
    decoder: str = "discretized",
) -> Array:
    """A lower bound on log p(y_1..y_n) per sequence: the forward algorithm over ELBO emissions (nats).

    Jit with ``static_argnames=("eps_fn", "num_t", "decoder")``.

    Args:
      images: ``[N, n, *event]`` 8-bit data scaled to [−1, 1] (for ``decoder="discretized"``).
      mask: ``[N, n]`` bool.
      num_t: ELBO terms on a grid of this many steps (None: all T terms).

    Returns:
      ``[N]`` log-likelihood lower bounds in nats.
    """
    batch, length = images.shape[:2]
    frames = images.reshape((batch * length,) + images.shape[2:])
    num_classes = log_pi.shape[0]
    elbo = emission.log_emission(
        eps_fn, params, schedule, frames, frame_keys(key, batch * length), num_classes,
        estimator="elbo", num_t=num_t, decoder=decoder,
    ).reshape(batch, length, num_classes)
    return jax.vmap(hmm.forward_filter, (None, None, 0, 0))(log_pi, log_A, elbo, mask).log_marginal


BAUM_WELCH_ITERATIONS = 20  # EM on (π, A) with the emissions fixed converges in a handful; 20 is cheap


def tempered_log_densities(log_b: Array, mask: Array, temperature) -> Array:
    """``[N, n, K]`` log q_τ(y | x) − log p(y) of frames scored ``log_b`` (untempered), at temperature τ.

    Tempered class scores define, for every τ, a proper class-conditional density of a frame,
    q_τ(y | x) = p(y) · softmax(log b(y) / τ)[x] / prior_τ(x), with prior_τ the mean of the tempered
    posteriors over the valid frames (so ∫ q_τ(y | x) dy = 1): emissions whose HMM likelihoods can be
    compared across τ. Padding frames get 0."""
    num_frames = jnp.maximum(mask.sum(), 1)
    log_post = jax.nn.log_softmax(log_b / temperature, axis=-1)
    pooled = jnp.where(mask[..., None], log_post, -jnp.inf).reshape(-1, log_b.shape[-1])
    log_prior = jax.nn.logsumexp(pooled, axis=0) - jnp.log(num_frames)
    return jnp.where(mask[..., None], log_post - log_prior, 0.0)


def refit_chain(priors: Priors, log_q: Array, mask: Array, log_pi: Array, log_A: Array,
                iterations: int = BAUM_WELCH_ITERATIONS) -> tuple[Array, Array]:
    """Baum–Welch on the chain with the emissions ``log_q [N, n, K]`` held fixed: ``iterations`` EM steps from
    ``(log_pi, log_A)``, each the expected counts of every sequence (:func:`hmm.expected_counts`) and the
    training's own M-step on them (``priors``: Dirichlet pseudo-counts; π only with ``learn_pi``, A only
    with ``learn_A``). The likelihood of the sequences never decreases from one iteration to the next.

    Training estimates π and A from paths sampled with the E-step's one noisy draw per frame; with the final
    decoding's many-draw emissions the same EM gives the chain those emissions explain best."""

    def body(_, chain):
        lp, lA = chain
        counts = jax.vmap(hmm.expected_counts, (None, None, 0, 0))(lp, lA, log_q, mask)
        if priors.learn_pi:
            lp = dirichlet_log_probs(counts.initial.sum(0), priors.pseudo_count)
        if priors.learn_A:
            lA = dirichlet_log_probs(counts.transitions.sum(0), priors.pseudo_count, priors.sticky_count)
        return lp, lA

    return jax.lax.fori_loop(0, iterations, body, (jnp.asarray(log_pi), jnp.asarray(log_A)))


class DecodingFit(NamedTuple):
    """For each temperature of a grid: the fit (nats per valid frame) and the chain it was reached with.

    Attributes:
      fits: ``[G]`` log p_τ(y_1..y_n) − Σ_l log p(y_l) per valid frame, under the chain below.
      log_pi: ``[G, K]``; log_A: ``[G, K, K]``: the chain refitted at each τ (the given one without refit).
    """

    fits: Array
    log_pi: Array
    log_A: Array


def decoding_fit(
    log_b: Array, mask: Array, log_pi: Array, log_A: Array, priors: Priors | None = None, grid=TEMPERATURE_GRID,
    iterations: int = BAUM_WELCH_ITERATIONS,
) -> DecodingFit:
    """For each temperature τ of ``grid``: the log-likelihood per frame that the chain adds to sequences whose
    frames are scored ``log_b``, with the emissions :func:`tempered_log_densities` at τ, and with the chain
    refitted to them (:func:`refit_chain`, from ``(log_pi, log_A)``; ``priors=None``: the given chain as is).

    A held-out-style likelihood that can be compared across τ, with no labels. Too low a τ makes every frame's
    decision final, and a frame the network gets wrong costs the chain a transition it deems unlikely; too high
    a τ leaves the frames no evidence, and the value falls to 0 as τ → ∞. The decoding averages many t-draws,
    so its scores are far less noisy than the E-step's one draw: the E-step's temperature leaves them too soft,
    and the chain learned from the E-step's noisy paths is off where the frames are ambiguous; fitting τ and
    the chain together to the decoding's own scores corrects both (RESULTS.md, stops 33–34).

    Args:
      log_b: ``[N, n, K]`` untempered class scores of the decoding (its estimator and t-draws).
      mask: ``[N, n]`` bool.
      log_pi, log_A: the learned chain (the start of the refit).
      priors: the training's M-step, or None for no refit.
      grid: candidate temperatures.
    """
    num_frames = jnp.maximum(mask.sum(), 1)
    forward = jax.vmap(hmm.forward_filter, (None, None, 0, 0))

    def fit(temperature):
        log_q = tempered_log_densities(log_b, mask, temperature)
        chain = (jnp.asarray(log_pi), jnp.asarray(log_A)) if priors is None else refit_chain(
            priors, log_q, mask, log_pi, log_A, iterations)
        return forward(*chain, log_q, mask).log_marginal.sum() / num_frames, *chain

    return DecodingFit(*jax.lax.map(fit, jnp.asarray(grid, jnp.float32)))


def select_decoding(
    log_b: Array, mask: Array, log_pi: Array, log_A: Array, priors: Priors | None = None, grid=TEMPERATURE_GRID,
) -> tuple[float, Array, Array, Array]:
    """``(τ, log_pi, log_A, fits)``: the temperature of ``grid`` with the highest :func:`decoding_fit`, the
    chain fitted with it, and every τ's fit."""
    result = jax.jit(decoding_fit, static_argnames=("priors", "grid", "iterations"))(
        log_b, mask, log_pi, log_A, priors=priors, grid=tuple(float(g) for g in grid))
    best = int(jnp.argmax(result.fits))
    return float(grid[best]), result.log_pi[best], result.log_A[best], result.fits
