"""The E-step side of EM that both models share: the options (``EMConfig``), tempered class scores, the
label loss, the label-free band choice, the balanced posterior (the ε-loss and M-step are in ``steps``).

Both models alternate (Algorithms 1 and 3 of the paper draft)

1. an E-step: score every class k of every frame by a Monte-Carlo emission log b̃_k (``emission``),
   then sample the class (mixture) or the state path (HMDM, forward filtering backward sampling);
2. a gradient step on the DDPM ε-loss with the sampled classes;
3. an M-step on π (and A) from the sampled classes, with Dirichlet pseudo-counts so that no class or
   transition ever reaches probability 0 (hmmlearn's "rows of transmat_ must sum to 1" failure).

Defaults are the ones that learn unsupervised (RESULTS.md): the unweighted mid-range ε-MSE
score (two t-draws per frame for the mixture, one for HMDM, whose chain pools the evidence of
neighbouring frames) and temperature 0.15, π fixed uniform, A re-estimated. ``EMConfig.paper()`` gives
the seed's algorithm taken literally (one random t, the sampled density, scale 1, π re-estimated), which
does not learn from a random start but is kept for the ablations.

About 500 lines on purpose: a third is the four option groups and their checks, and every function
below reads them; split, each half would import the other.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hmdm_jax import diffusion, emission
from hmdm_jax.parallel import psum_if

__all__ = [
    "BALANCE_ITERATIONS", "BALANCE_SCALES", "balanced_class_posterior", "band_agreement",
    "CANDIDATE_BANDS", "tempered_log_emissions", "COUNTS_FROM", "EMConfig", "evaluation_config",
    "FINAL_STEP", "frame_keys", "label_loss", "Labels", "observed_label_loss", "posterior_entropy",
    "Priors", "resolved_t_range", "Scoring", "Temperature", "e_step_scores", "select_t_range", "select_temperature",
    "step_keys", "TEMPERATURE_GRID", "temperature_at", "temperature_fit",
]

Array = jax.Array
EpsFn = Callable[[Any, Array, Array, Array], Array]
# the dropout-on form, train_eps_fn(dropout_key, params, z_t, t, k) (models.make_train_eps_fn)
TrainEpsFn = Callable[[Array, Any, Array, Array, Array], Array]

COUNTS_FROM = ("sampled", "smoothed")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Scoring:
    """How every frame is scored under every class: the emission estimator and its draws.

    Attributes:
      estimator: a name in ``emission.ESTIMATORS`` ("eps_mse", the unweighted mid-band ε-MSE, by default).
      num_t: t-draws per frame. Two by default: the mixture from a random start needs them. HMDM pools
        the evidence of a frame's neighbours through A, so its presets use one.
      t_range: the scoring band as fractions (lo, hi) of T, for every estimator that takes a band; None:
        the estimator's own default band. An estimator whose t's are fixed (elbo, last_decoder) needs None.
      variance: σ_t² of the reverse step, "beta" or "beta_tilde" (the density estimators).
      chunk_size: score at most this many frames at once (bounds memory; None: all at once).
    """

    estimator: str = "eps_mse"
    num_t: int = 2
    t_range: tuple[float, float] | None = (0.3, 0.6)
    variance: str = "beta"
    chunk_size: int | None = None

    def __post_init__(self):
        emission.get_estimator(self.estimator)  # an unknown name: ValueError listing emission.ESTIMATORS
        _check(self.num_t >= 1, f"scoring.num_t must be >= 1, got {self.num_t}")
        # Whether the estimator takes a band is checked where the band is used (resolved_t_range), not
        # here: dotted overrides replace one field at a time ("em.scoring.estimator=elbo", then "...t_range=null").
        _check(self.t_range is None or 0.0 <= self.t_range[0] <= self.t_range[1] <= 1.0,
               f"scoring.t_range must be fractions 0 <= lo <= hi <= 1 of T, got {self.t_range}")
        _check(self.chunk_size is None or self.chunk_size >= 1,
               f"scoring.chunk_size must be None or >= 1, got {self.chunk_size}")


@dataclasses.dataclass(frozen=True)
class Temperature:
    """The class scores log b̃ are divided by the temperature before the E-step samples from them.

    Attributes:
      final: the temperature (0.15 by default; 1 is the untempered paper score).
      initial: with ``anneal_steps``, the temperature anneals geometrically from ``initial`` to ``final``
        over that many steps (a soft start from random initialisation). Both or neither.
      anneal_steps: the length of that annealing.
    """

    final: float = 0.15
    initial: float | None = None
    anneal_steps: int = 0

    def __post_init__(self):
        _check(self.final > 0 and (self.initial is None or self.initial > 0), "temperatures must be > 0")
        _check((self.initial is None) == (self.anneal_steps == 0) and self.anneal_steps >= 0,
               "temperature.initial and temperature.anneal_steps > 0 go together (an annealing), or neither; "
               f"got initial={self.initial}, anneal_steps={self.anneal_steps}")


@dataclasses.dataclass(frozen=True)
class Priors:
    """The M-step: Dirichlet re-estimation of π and A from the E-step's counts.

    Attributes:
      learn_pi: re-estimate π (False: π stays as initialised, uniform by default).
      learn_A: re-estimate A (HMDM).
      pseudo_count: Dirichlet pseudo-count on every class and every transition (> 0: nothing reaches 0).
      sticky_count: extra pseudo-count on the diagonal of A (a sticky prior).
      count_decay: ρ of the running update: the counts decay by ``1 − ρ`` each step and π, A are
        re-estimated every step; they average ≈ 1/ρ recent batches.
      epoch_steps: instead of the running update, accumulate the counts and re-estimate π, A (and reset
        the counts) every ``epoch_steps`` steps, inside the train step. None: the running update.
      counts_from: HMDM statistics from the "sampled" paths or the "smoothed" expected counts.
    """

    learn_pi: bool = False
    learn_A: bool = True
    pseudo_count: float = 1.0
    sticky_count: float = 0.0
    count_decay: float = 0.05
    epoch_steps: int | None = None
    counts_from: str = "sampled"

    def __post_init__(self):
        _check(self.pseudo_count > 0, "priors.pseudo_count must be > 0 so that no class reaches probability 0")
        _check(self.sticky_count >= 0, f"priors.sticky_count must be >= 0, got {self.sticky_count}")
        _check(0.0 < self.count_decay <= 1.0, f"priors.count_decay must be in (0, 1], got {self.count_decay}")
        _check(self.epoch_steps is None or self.epoch_steps >= 1,
               f"priors.epoch_steps must be None (the running update) or >= 1, got {self.epoch_steps}")
        _check(self.counts_from in COUNTS_FROM,
               f"priors.counts_from must be one of {COUNTS_FROM}, got {self.counts_from!r}")


@dataclasses.dataclass(frozen=True)
class Labels:
    """How observed labels and the null class enter the ε-loss (observed labels always clamp their frames).

    Attributes:
      loss_weight: α of a discriminative term on the frames with observed labels: α times the
        cross-entropy of the tempered class posterior softmax(log b̃ / temperature + log prior) against
        the label, one t-draw per frame, differentiated through the K network passes (:func:`label_loss`).
        The analogue of the α·log q(x | y) term of semi-supervised generative models (Kingma et al.,
        2014): EM alone uses an observed label only to clamp its frame, so a few labels barely move the
        class scores of the unlabelled frames. 0 (default): the paper's EM. Does nothing without labels.
      loss_frames: score at most this many frames of the global batch in the label loss, the ones with
        observed labels first, in batch order (None: every frame; frames without a label add no term but
        cost K network passes with gradients all the same). With at least as many frames as observed
        labels in the batch the loss is exactly the uncapped one; with fewer, it is the mean over the first
        ones. Under several devices each scores ``ceil(loss_frames / devices)`` of its own share.
      dropout: probability of training a frame with the null class K (for classifier-free guidance).
    """

    loss_weight: float = 0.0
    loss_frames: int | None = None
    dropout: float = 0.0

    def __post_init__(self):
        _check(self.loss_weight >= 0, f"labels.loss_weight must be >= 0, got {self.loss_weight}")
        _check(self.loss_frames is None or self.loss_frames >= 1,
               f"labels.loss_frames must be None or >= 1, got {self.loss_frames}")
        _check(0.0 <= self.dropout < 1.0, f"labels.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class EMConfig:
    """Options of the E-step, the ε-loss and the M-step, grouped by what they act on (static: changing
    one recompiles). ``EMConfig(num_classes=K)`` is the default that learns unsupervised.

    Attributes:
      num_classes: K.
      scoring: how each frame is scored under each class (:class:`Scoring`).
      temperature: the tempering of those scores (:class:`Temperature`).
      priors: the M-step on π and A (:class:`Priors`).
      labels: the label loss and the null class (:class:`Labels`).
      balance_classes: mixture only. The E-step samples each frame's class from the batch posterior
        rescaled by per-class offsets (:func:`balanced_class_posterior`) so that class k receives B·π_k of
        the global batch's frames in expectation (the equipartition constraint of
        self-labelling clustering, Asano et al., 2020; Caron et al., 2020). It rules out the collapse of a
        sharp E-step into one or two classes. False (default): the model's own posterior, as the paper.
      balance_loss: weight the ε-loss so that every class present in the global batch contributes the same
        total weight (:func:`hmdm_jax.steps.class_balanced_weights`). Each class's own optimum is unchanged;
        what changes is that a rare state's density is learnt as fast as a common one's, where the plain
        loss trains it in proportion to its frames and a better-trained common state then takes the rare
        one's ambiguous frames, and so on (a rich-get-richer drift on uneven chains). False (default): the
        paper's loss, every frame weighted alike.
    """

    num_classes: int
    scoring: Scoring = Scoring()
    temperature: Temperature = Temperature()
    priors: Priors = Priors()
    labels: Labels = Labels()
    balance_classes: bool = False
    balance_loss: bool = False

    def __post_init__(self):
        _check(isinstance(self.num_classes, int) and self.num_classes >= 1,
               f"num_classes must be an int >= 1, got {self.num_classes!r}")
        for name, group in (("scoring", Scoring), ("temperature", Temperature), ("priors", Priors),
                            ("labels", Labels)):
            _check(isinstance(getattr(self, name), group),
                   f"EMConfig.{name} must be an em.{group.__name__}, got {getattr(self, name)!r}")

    def replace(self, **groups) -> "EMConfig":
        """A copy with fields of the groups replaced: ``config.replace(scoring=dict(num_t=1))`` changes
        ``scoring.num_t`` only; a group value (``Scoring(...)``) or a top-level field replaces it whole."""
        changes = {}
        for name, value in groups.items():
            current = getattr(self, name)
            changes[name] = (dataclasses.replace(current, **value)
                             if isinstance(value, dict) and dataclasses.is_dataclass(current) else value)
        return dataclasses.replace(self, **changes)

    @classmethod
    def paper(cls, num_classes: int) -> "EMConfig":
        """The seed's Algorithms 1 and 3 taken literally: one random t, the sampled Gaussian density,
        scale 1, π (and A) re-estimated. Does not learn from random initialisation (see RESULTS.md)."""
        return cls(num_classes=num_classes, scoring=Scoring(estimator="random_t", num_t=1, t_range=None),
                   temperature=Temperature(final=1.0), priors=Priors(learn_pi=True))


def temperature_at(config: EMConfig, step: Array) -> Array:
    """The (possibly annealed) temperature at ``step``: geometric from initial to final temperature."""
    temp = config.temperature
    final = jnp.float32(temp.final)
    if temp.initial is None:
        return final
    frac = jnp.clip(step / temp.anneal_steps, 0.0, 1.0)
    return jnp.float32(temp.initial) * (final / temp.initial) ** frac


FINAL_STEP = 2**30  # a step past any annealing: scoring at evaluation uses the final temperature


def evaluation_config(config: EMConfig, estimator: str | None = None, num_t: int | None = None) -> EMConfig:
    """``config`` with the emission estimator and number of t-draws overridden for evaluation.

    The pair is resolved by :func:`emission.resolve_num_draws` (random_t with several draws is multi_t,
    last_decoder keeps one draw). The band ``t_range`` is kept for an estimator that takes one and set to
    None for one that does not (elbo, last_decoder), whatever the training estimator's band was.
    """
    scoring = config.scoring
    resolved, draws = emission.resolve_num_draws(scoring.estimator if estimator is None else estimator,
                                                 scoring.num_t if num_t is None else num_t)
    t_range = scoring.t_range if resolved.takes_band else None
    return config.replace(scoring=dict(estimator=resolved.name, num_t=draws, t_range=t_range))


def resolved_t_range(config: EMConfig, num_steps: int) -> tuple[int, int] | None:
    """``config.scoring.t_range`` as inclusive integer steps (t_min, t_max) within 1..T (:func:`emission.band_steps`).

    None when the band is None (the estimator's own default band). Every estimator that takes a
    band gets it (random_t, multi_t, elbo_term, eps_mse).

    Raises:
      ValueError: a band for an estimator whose t's are fixed (elbo, last_decoder). ``EMConfig``'s default
        band is (0.3, 0.6): such configs set ``t_range=None`` (``EMConfig.paper`` and
        :func:`evaluation_config` do).
    """
    scoring = config.scoring
    if scoring.t_range is None:
        return None
    if not emission.get_estimator(scoring.estimator).takes_band:
        raise ValueError(f"scoring.t_range={scoring.t_range} does not apply to estimator {scoring.estimator!r}, "
                         "whose t's are fixed; set t_range=None (Scoring's default band is (0.3, 0.6))")
    return emission.band_steps(scoring.t_range, num_steps)


def tempered_log_emissions(
    config: EMConfig, eps_fn: EpsFn, params: Any, schedule: diffusion.Schedule, y: Array, keys: Array,
    step: Array, num_t: int | None = None,
) -> Array:
    """Tempered class log-scores log b̃_k / temperature for frames ``y [B, *event]``, differentiable.

    Args:
      keys: ``[B]`` per-frame keys (see :func:`frame_keys`).
      step: ``[]`` the optimizer step (for the temperature annealing).
      num_t: overrides ``config.scoring.num_t``.

    Returns:
      ``[B, K]`` float32 tempered emission log-likelihoods (class-independent constants may be dropped).
    """
    log_b = emission.log_emission(
        eps_fn,
        params,
        schedule,
        y,
        keys,
        config.num_classes,
        estimator=config.scoring.estimator,
        num_t=config.scoring.num_t if num_t is None else num_t,
        t_range=resolved_t_range(config, schedule.num_steps),
        variance=config.scoring.variance,
        chunk_size=config.scoring.chunk_size,
    )
    return log_b / temperature_at(config, step)


def e_step_scores(
    config: EMConfig, eps_fn: EpsFn, params: Any, schedule: diffusion.Schedule, y: Array, keys: Array, step: Array
) -> Array:
    """:func:`tempered_log_emissions` of the E-step: ``[B, K]``, no gradient."""
    return jax.lax.stop_gradient(tempered_log_emissions(config, eps_fn, params, schedule, y, keys, step))


def label_loss(
    config: EMConfig,
    eps_fn: EpsFn,
    params: Any,
    schedule: diffusion.Schedule,
    y: Array,
    labels: Array,
    keys: Array,
    log_prior: Array,
    step: Array,
    normalizer: Array,
) -> Array:
    """α Σ_i [x_i observed] −log softmax(log b̃(y_i) / temperature + log_prior)[x_i] / normalizer.

    The cross-entropy of the E-step's own class posterior on the frames with observed labels, with one
    t-draw per frame (the grid of ``"elbo"`` as configured), differentiable in ``params``. Minimising it
    calibrates the tempered posterior that EM samples from on the labelled frames.

    Args:
      y: ``[B, *event]`` frames; labels: ``[B]`` int32, −1 = unknown (no term).
      keys: ``[B]`` per-frame keys, independent of the E-step's.
      log_prior: ``[K]`` log class prior of the posterior (log π for the mixture).
      step: ``[]`` the optimizer step (temperature annealing).
      normalizer: ``[]`` the number of observed frames in the global batch (so per-device terms add up).

    Returns:
      ``[]`` ``config.labels.loss_weight`` times the summed cross-entropy (nats) divided by ``normalizer``.
    """
    num_t = config.scoring.num_t if emission.get_estimator(config.scoring.estimator).grid else 1  # a grid is not a draw
    log_b = tempered_log_emissions(config, eps_fn, params, schedule, y, keys, step, num_t=num_t)
    log_post = emission.class_log_posterior(log_b, jax.lax.stop_gradient(log_prior))
    observed = labels >= 0
    picked = jnp.take_along_axis(log_post, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    cross_entropy = jnp.sum(jnp.where(observed, -picked, 0.0))
    return config.labels.loss_weight * cross_entropy / jnp.maximum(normalizer, 1.0)


def step_keys(config: EMConfig, key: Array) -> tuple[Array, Array, Array, Array | None]:
    """A train step's keys ``(score, sample, loss, label)``; ``label`` is None without the label loss.

    Three keys are split without the label loss, as before it existed, so such runs stay bit-identical.
    """
    if config.labels.loss_weight > 0:
        return tuple(jax.random.split(key, 4))
    return (*jax.random.split(key, 3), None)


def observed_label_loss(
    config: EMConfig, eps_fn: EpsFn, schedule: diffusion.Schedule, y: Array, labels: Array, log_prior: Array,
    step: Array, key: Array | None, axis_name: str | None = None,
) -> Callable[[Any], Array] | None:
    """``params -> label_loss(...)`` on frames ``y [B, *event]`` with ``labels [B]`` (−1 = unknown), for
    :func:`denoising_step`'s ``extra_loss``; None when ``config.labels.loss_weight`` is 0 (nothing traced).

    ``key`` is the label key of :func:`step_keys`; under a mapped axis the normaliser counts the observed
    frames of the global batch. ``config.labels.loss_frames`` caps the frames scored (observed ones first).
    """
    if config.labels.loss_weight <= 0:
        return None
    keys = frame_keys(key, y.shape[0], axis_name)  # each frame keeps its draws whether or not others are dropped
    if config.labels.loss_frames is not None:
        devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
        cap = -(-config.labels.loss_frames // devices)
        if cap < y.shape[0]:
            # the labelled frames first (a stable sort keeps batch order), then a static-size slice
            picked = jnp.argsort(labels < 0, stable=True)[:cap]
            y, labels, keys = y[picked], labels[picked], keys[picked]
    normalizer = psum_if(jnp.sum(labels >= 0).astype(jnp.float32), axis_name)
    return lambda params: label_loss(config, eps_fn, params, schedule, y, labels, keys, log_prior, step, normalizer)


CANDIDATE_BANDS = ((0.01, 0.05), (0.02, 0.1), (0.05, 0.2), (0.1, 0.3), (0.2, 0.4), (0.3, 0.6), (0.5, 0.8))


def band_agreement(
    config: EMConfig,
    eps_fn: EpsFn,
    params: Any,
    schedule: diffusion.Schedule,
    y: Array,
    assignment: Array,
    key: Array,
    bands=CANDIDATE_BANDS,
) -> Array:
    """For each scoring band, the fraction of frames whose one-draw ε-MSE argmax is their assigned class.

    The label-free criterion for the scoring band (``scoring.t_range``) of :func:`select_t_range`: a network
    trained on an assignment (the k-means warm start, or the current EM states) can only reproduce it
    from one draw where the class signal of the score exceeds its noise. At small t the network denoises
    without looking at the class (no signal); at large t one draw of ε dominates (noise).

    Args:
      config: the E-step options (its estimator, band and draws are replaced: eps_mse, one draw).
      y: ``[B, *event]`` frames; assignment: ``[B]`` int32 their classes in 0..K−1 (no labels needed).
      bands: candidate (lo, hi) fractions of T.

    Returns:
      ``[len(bands)]`` float32 agreement in [0, 1] (chance is about 1/K).
    """
    keys = frame_keys(key, y.shape[0])

    def agreement(band):
        band_config = config.replace(scoring=dict(estimator="eps_mse", num_t=1, t_range=band))
        log_b = e_step_scores(band_config, eps_fn, params, schedule, y, keys, FINAL_STEP)
        return jnp.mean(jnp.argmax(log_b, axis=-1) == assignment)

    return jnp.stack([agreement(tuple(band)) for band in bands])  # a few bands: unrolled at trace time


def select_t_range(
    config: EMConfig,
    eps_fn: EpsFn,
    params: Any,
    schedule: diffusion.Schedule,
    y: Array,
    assignment: Array,
    key: Array,
    bands=CANDIDATE_BANDS,
) -> tuple[tuple[float, float], Array]:
    """The candidate band with the highest :func:`band_agreement`, and all the agreements.

    Uses no labels: ``assignment`` is whatever partition the network was trained on. Ties go to the
    first band. Returns ``((lo, hi), agreements [len(bands)])``.

    Reproducing the current partition is not the same as improving on it: the mixture's ``cpu-small``
    preset uses it (``band.choose``), HMDM's does not (RESULTS.md has both measurements).
    """
    scores = jax.jit(band_agreement, static_argnums=(0, 1), static_argnames="bands")(
        config, eps_fn, params, schedule, y, assignment, key, bands=tuple(tuple(b) for b in bands)
    )
    return tuple(bands[int(jnp.argmax(scores))]), scores


# 20 points per decade, wide enough for frames of many values, whose scores are sums over all of them (RESULTS.md,
# stop 33); the points below 10 are the earlier grid's, bit for bit.
TEMPERATURE_GRID = tuple(float(t) for t in np.geomspace(0.01, 100.0, 81))
REFERENCE_DRAWS = 32  # t-draws of the model's own class decision that a calibrated E-step score predicts


def temperature_fit(
    config: EMConfig,
    eps_fn: EpsFn,
    params: Any,
    schedule: diffusion.Schedule,
    y: Array,
    key: Array,
    grid=TEMPERATURE_GRID,
    reference_draws: int = REFERENCE_DRAWS,
) -> Array:
    """For each temperature τ of ``grid``: how well the E-step's tempered posterior of a frame predicts the
    model's own class decision for it, the mean log softmax(log b̃ / τ)[decision].

    The E-step scores a frame with few t-draws (``scoring.num_t``), a noisy estimate of the class evidence
    whose spread depends on the band, the network and the data. The decision is the argmax of
    ``reference_draws`` independent draws in the same band. The τ that maximises this log-likelihood makes
    the E-step's posterior as sure as its draws warrant: too low and the chain can no longer outvote a noisy
    frame, too high and the frames' evidence is lost. Uses no labels.

    Args:
      config: the E-step options (their estimator, band and draws; the temperature is what is fitted).
      y: ``[B, *event]`` frames.
      grid: candidate temperatures.

    Returns:
      ``[len(grid)]`` float32 mean log-likelihoods (nats per frame).
    """
    untempered = config.replace(temperature=Temperature(final=1.0))
    scores = lambda keys, num_t: tempered_log_emissions(untempered, eps_fn, params, schedule, y, keys, FINAL_STEP, num_t)
    log_b = scores(frame_keys(key, y.shape[0]), None)  # the E-step's own draws
    decision = jnp.argmax(scores(frame_keys(jax.random.fold_in(key, 1), y.shape[0]), reference_draws), axis=-1)

    def log_likelihood(temperature):
        log_post = jax.nn.log_softmax(log_b / temperature, axis=-1)
        return jnp.mean(jnp.take_along_axis(log_post, decision[:, None], axis=-1))

    return jax.vmap(log_likelihood)(jnp.asarray(grid, jnp.float32))


def select_temperature(
    config: EMConfig,
    eps_fn: EpsFn,
    params: Any,
    schedule: diffusion.Schedule,
    y: Array,
    key: Array,
    grid=TEMPERATURE_GRID,
) -> tuple[float, Array]:
    """The temperature of ``grid`` with the highest :func:`temperature_fit`, and all the fits."""
    fits = jax.jit(temperature_fit, static_argnums=(0, 1), static_argnames="grid")(
        config, eps_fn, params, schedule, y, key, grid=tuple(grid))
    return float(grid[int(jnp.argmax(fits))]), fits


def frame_keys(key: Array, batch_size: int, axis_name: str | None = None) -> Array:
    """``[B]`` per-frame keys ``fold_in(key, global frame index)``.

    Under a mapped axis the index counts across devices, so every frame gets the same draws whatever the
    number of devices: multi-device and single-device steps on one global batch agree exactly.
    """
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_size
    return jax.vmap(jax.random.fold_in, (None, 0))(key, offset + jnp.arange(batch_size))


BALANCE_SCALES = 16  # ε-scaling stages of the balanced E-step (from soft to the actual posterior)
BALANCE_ITERATIONS = 5  # Sinkhorn iterations per stage


def balanced_class_posterior(log_post: Array, log_pi: Array, axis_name: str | None = None) -> Array:
    """The batch posterior rescaled so that every class receives its prior share of the batch.

    Finds per-class offsets c_k such that ``softmax_k(log_post[i] + c)`` summed over the (global) batch
    gives class k a total of B·π_k: Sinkhorn–Knopp in log space (column rescaling, then row
    normalisation), with ε-scaling: the scores are first flattened by a factor λ₀ = 1 / (their spread) and
    sharpened in ``BALANCE_SCALES`` geometric stages to λ = 1, carrying the offsets over. Plain Sinkhorn
    needs thousands of iterations on E-step scores, whose differences run to hundreds of nats; this needs
    80. Rows are normalised last, so each row is a distribution to sample from. With near one-hot rows the
    column totals can only be met to about a frame.

    The result is ``log_post + a_i + c_k`` (a per-frame and a per-class offset), so the order of classes
    within a frame is kept; −inf entries (clamped labels) stay −inf, so a clamped frame keeps its class.

    Args:
      log_post: ``[B, K]`` normalised log-probabilities (−inf allowed).
      log_pi: ``[K]`` log prior: the target class shares.
      axis_name: under a named mapped axis the column totals and the spread are over the global batch, so
        the result equals the single-device one on the concatenated batch.

    Returns:
      ``[B, K]`` normalised log-probabilities.
    """
    finite = jnp.isfinite(log_post)
    extremes = jnp.stack([jnp.max(jnp.where(finite, log_post, 0.0)), -jnp.min(jnp.where(finite, log_post, 0.0))])
    extremes = extremes if axis_name is None else jax.lax.pmax(extremes, axis_name)
    spread = extremes[0] + extremes[1]
    scales = jnp.exp(jnp.linspace(-jnp.log(jnp.maximum(spread, 1.0)), 0.0, BALANCE_SCALES))
    target = jnp.log(psum_if(jnp.float32(log_post.shape[0]), axis_name)) + log_pi

    no_prior = jnp.zeros(log_post.shape[-1], log_post.dtype)
    normalise_rows = lambda x: emission.class_log_posterior(x, no_prior)  # all −inf rows stay so

    def column_log_totals(x):
        top = jnp.max(x, axis=0)
        top = top if axis_name is None else jax.lax.pmax(top, axis_name)
        top = jnp.where(jnp.isfinite(top), top, 0.0)
        return top + jnp.log(psum_if(jnp.sum(jnp.exp(x - top), axis=0), axis_name))

    def stage(carry, scale):
        offsets, previous_scale = carry
        scaled = log_post * scale  # scale > 0: −inf entries stay −inf
        offsets = offsets * (scale / previous_scale)  # the offsets grow with the sharpness

        def iteration(_, offsets):
            totals = column_log_totals(normalise_rows(scaled + offsets))
            # a class no frame can take (its column all −inf) keeps its offset
            return offsets + jnp.where(jnp.isfinite(totals), target - totals, 0.0)

        return (jax.lax.fori_loop(0, BALANCE_ITERATIONS, iteration, offsets), scale), None

    init = (jnp.zeros(log_post.shape[-1], log_post.dtype), scales[0])
    offsets = jax.lax.scan(stage, init, scales)[0][0]
    return normalise_rows(log_post + offsets)


def posterior_entropy(log_post: Array) -> Array:
    """Mean entropy (nats) of the rows of ``log_post [B, K]`` (normalised log-probabilities; −inf allowed)."""
    p = jnp.exp(log_post)
    return -jnp.mean(jnp.sum(jnp.where(p > 0, p * log_post, 0.0), axis=-1))
