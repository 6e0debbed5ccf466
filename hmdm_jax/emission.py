r"""Per-class emission log-likelihoods log b̃_k(y) of a class-conditional diffusion model.

Over 400 lines on purpose: the estimators share their draws (common random numbers), chunking and checks,
and this docstring states each one's formula; the registry keeps adding one to one place.

A mixture / HMM of diffusion models needs, for every observation y and every class k, a score
log b̃_k(y) that stands in for log p_θ(y | x = k): the class posterior is then
p̃(x = k | y) ∝ exp(log b̃_k(y)) π_k (:func:`class_log_posterior`). The exact likelihood is
intractable; this module implements the paper's estimator and lower-variance alternatives.

The seed paper (shared/seeds/000) has typos in its emission: it writes ``1/√α_1`` where ``1/√α_t`` is
meant and Algorithm 2 writes ``(1 − α_t)`` for DDPM's ``β_t`` (equal, since α_t = 1 − β_t). We
implement the standard DDPM formulas of :mod:`hmdm_jax.diffusion` (Ho et al., 2020).

Estimators (``estimator=``), all [B, K], each *up to class-independent terms* as stated
-----------------------------------------------------------------------------------------
Each estimator is one :class:`Estimator` value in the ordered registry ``ESTIMATORS`` (name →
Estimator): its scoring function and everything the callers need to know about it (its default
t-band, whether it takes a ``t_range``, whether it is single-draw and what several draws of it
become — :func:`resolve_num_draws` — whether it draws two noises, uses ``decoder``/``variance``).
``log_emission`` takes the name or the value; adding an estimator is one registry entry.

Notation: D = number of scalars in one observation, ε_θ = ε_θ(z_t, t, k), z_t = √ᾱ_t y + √(1−ᾱ_t) ε,
w_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) (so that KL_t = w_t ‖ε − ε_θ‖² + a class-independent constant),
σ_t² = β_t or β̃_t (``variance=``, see :func:`diffusion.p_variance`; β_1 at t = 1 for both).

``"random_t"`` (the paper, Algorithms 1 and 3, literally)
    One t ~ U{1..T} per observation (``t_range`` may restrict it), ε, ε* ~ N(0, I);
    z_{t−1} = √ᾱ_{t−1} y + √(1−ᾱ_{t−1}) ε, z_t = √α_t z_{t−1} + √β_t ε*. For t ≥ 2 the score is
    log N(z_{t−1}; μ_θ(z_t, t, k), σ_t² I); for t = 1 it is the decoder log p_θ(y | z_1, k) with
    z_1 = √α_1 y + √β_1 ε* (Gaussian N(μ_θ(z_1, 1, k), σ_1² I) or, ``decoder="discretized"``, its
    256-bin discretisation). All Gaussian normalisers are kept. Its expectation is
    (1/T)·[ELBO_k(y) + Σ_{t≥2} H(q(z_{t−1} | z_t, y)) + KL(q(z_T | y) ‖ N(0, I))]: the dropped part
    (entropies of q and the paper's e^T p(z_T) prior term) is class-independent, so ``scale=T`` gives
    an unbiased single-sample estimate of ELBO_k up to that constant. It is a weak classifier: the
    spread of the ε*-cross-term exceeds the class signal, and one term is ≈ 1/T of log p(y | k).
    It is here for the paper's ablations (results in RESULTS.md).
``"last_decoder"``
    Always t = 1: the decoder log-density log p_θ(y | z_1, k), one z_1 draw (the paper's "always use
    the last decoder" ablation). A proper log-density of y, but only the t = 1 term of the ELBO.
``"multi_t"``
    The mean over ``num_t`` independent ``"random_t"`` terms (own t, ε, ε* each); same expectation.
``"elbo"``
    The full variational bound, every term and constant kept:
    ELBO_k(y) = E log p_θ(y | z_1, k) − Σ_{t=2..T} KL(q(z_{t−1} | z_t, y) ‖ p_θ(z_{t−1} | z_t, k))
    − KL(q(z_T | y) ‖ N(0, I)), each t-term with one z_t ~ q(z_t | y) draw and analytic KL.
    E ELBO_k(y) ≤ log p_θ(y | k). With ``decoder="discretized"`` (8-bit data scaled to [−1, 1]) it
    bounds the discrete log P(y | k), so −ELBO / (D ln 2) is an upper bound on bits/dim.
    Cost: T network evaluations per class and observation, run one t at a time (``lax.map``).
    ``num_t=None`` (default) or ``num_t ≥ T``: the full bound. ``2 ≤ num_t < T``: a deterministic
    grid (:func:`elbo_grid`): the t = 1 decoder term exactly, plus ``num_t − 1`` KL terms at the
    midpoints of ``num_t − 1`` contiguous blocks partitioning {2..T}, each weighted by its block's
    size (a midpoint rule; the weights sum to T − 1, so it is consistent, and exact when every block
    has one element).
``"elbo_term"`` (Rao-Blackwellised single-t ELBO term)
    −n_t · w_t ‖ε − ε_θ‖², t ~ U{t_min..t_max} (default the full 1..T, n_t = t_max − t_min + 1),
    mean over ``num_t`` draws. t = 1 is included: for the Gaussian decoder the class-dependent part
    of −log p_θ(y | z_1, k) is exactly w_1 ‖ε − ε_θ‖² (w_1 = β_1 / (2 σ_1² α_1)), the same formula.
    Unbiased for the class-dependent part of ELBO_k (Gaussian decoder; ``decoder`` is ignored);
    drops the KL constants (D/2)(log(σ_t²/β̃_t) + β̃_t/σ_t² − 1), the decoder normaliser and the
    prior term.
``"eps_mse"`` (DEFAULT)
    −‖ε − ε_θ‖², unweighted, t ~ U{t_min..t_max}, mean over ``num_t`` draws. Not an estimate of a
    likelihood: it drops everything class-independent *and* reweights the t-terms, so use it for
    class posteriors, not for NLL. ``t_range=None`` is the middle band
    (round(0.3 T), round(0.6 T)) — (300, 600) for T = 1000 — the band chosen on digits (RESULTS.md):
    at small t the network denoises without looking at the class, at large t one draw of ε swamps the
    class signal. A band can also be chosen without labels: ``em.select_t_range``.
    ``decoder`` and ``variance`` are ignored.

Common random numbers: within one observation, the K classes are scored on the SAME draws of t, ε
and ε* (so the K scores are comparable; their differences have far less variance than the scores);
observations and t-draws get independent draws. The draws depend only on ``key``, the observation's
index in the batch and ``num_t`` — not on K, on ``chunk_size`` or on the other observations — so
scoring one class at a time with the same key reproduces a column of the K-class result exactly.

``scale`` multiplies the result (1 as in the paper; T turns a single-t ``random_t``/``multi_t``
score into an ELBO-sized one; 1/temperature for tempering). ``per_dim=True`` divides by D, so that
scores of data of different sizes, and tempered and untempered posteriors, are comparable (with
784-dim data the untempered posterior is nearly one-hot).

Memory: one network call evaluates K · num_t · B observations at once (elbo: K · B per t);
``chunk_size`` bounds B per call with ``lax.map`` (results identical). Scores stay differentiable
with respect to ``params``; callers that only need values apply ``jax.lax.stop_gradient``.

Jit: every argument except ``params``, ``schedule``, ``y``, ``key`` and ``scale`` is static; use
``jax.jit(log_emission, static_argnames=EMISSION_STATIC_ARGNAMES)`` (``t_range`` then must be a
tuple), or :func:`make_log_emission`, which closes over the configuration and returns a jitted
``(params, schedule, y, key) -> [B, K]``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxtyping import Float, Key, PRNGKeyArray, UInt32

from hmdm_jax import diffusion
from hmdm_jax.diffusion import Schedule

__all__ = [
    "band_steps", "clamp_to_labels", "class_log_posterior", "DECODERS", "DEFAULT_EPS_MSE_BAND",
    "default_t_range", "elbo_grid", "elbo_terms", "ElboTerms", "EMISSION_STATIC_ARGNAMES", "eps_all_classes",
    "Estimator", "EstimatorRegistry", "FIRST_STEP_BAND", "FULL_BAND", "get_estimator",
    "log_emission", "make_log_emission", "observation_keys", "resolve_num_draws",
]

Array = jax.Array
EpsFn = Callable[..., Array]

DECODERS = ("gaussian", "discretized")
EMISSION_STATIC_ARGNAMES = (
    "eps_fn", "num_classes", "estimator", "num_t", "t_range", "per_dim", "variance", "decoder", "chunk_size",
)
# The eps_mse default band, as fractions of T (see the module docstring).
DEFAULT_EPS_MSE_BAND = (0.3, 0.6)
FULL_BAND = (0.0, 1.0)  # every t, 1..T
FIRST_STEP_BAND = (0.0, 0.0)  # t = 1 only


class ElboTerms(NamedTuple):
    """The terms of ELBO_k(y) (nats), so that ``elbo = terms.sum(0) + prior[:, None]`` (full bound).

    Attributes:
      terms: ``[n, B, K]``, the term of each requested t (row j is t_values[j]): for t = 1 the decoder
        log p_θ(y | z_1, k); for t ≥ 2, −KL(q(z_{t−1} | z_t, y) ‖ p_θ(z_{t−1} | z_t, k)).
      prior: ``[B]``, −KL(q(z_T | y) ‖ N(0, I)), the class-independent prior term.
      t_values: ``[n]`` int32, the t of each row of ``terms``.
    """

    terms: Array
    prior: Array
    t_values: Array


# ----------------------------------------------------------------------------------------------
# Estimators as values
# ----------------------------------------------------------------------------------------------

# scores(eps_fn, params, schedule, y [b, *event], keys [b], *, num_classes, num_t, t_min, t_max, variance,
#        decoder) -> [b, K] float32: the unscaled scores of one chunk of b observations.
ScoresFn = Callable[..., Array]


def band_steps(band: Tuple[float, float], num_steps: int) -> Tuple[int, int]:
    """A band given as fractions (lo, hi) of T, as inclusive integer steps (t_min, t_max) within 1..T.

    t_min = round(lo · T) and t_max = round(hi · T), each clipped to 1..T, and t_max ≥ t_min, so that the
    range is never empty: (0, 0) is t = 1 only, (0, 1) is 1..T, (0.3, 0.6) is (300, 600) for T = 1000.
    """
    lo = min(max(1, int(round(band[0] * num_steps))), num_steps)
    hi = min(max(lo, int(round(band[1] * num_steps))), num_steps)
    return lo, hi


@dataclasses.dataclass(frozen=True)
class Estimator:
    """One emission estimator: its scoring function and the facts its callers need about it.

    Frozen and hashable, so a value is a static argument of jitted functions like its name.

    Attributes:
      name: its key in ``ESTIMATORS`` (and the ``estimator=`` string that selects it).
      scores: ``scores(eps_fn, params, schedule, y, keys, *, num_classes, num_t, t_min, t_max, variance,
        decoder) -> [b, K]`` float32, the unscaled scores of one chunk: ``y [b, *event]`` float32
        observations, ``keys [b]`` one PRNG key per observation, ``num_t`` as given to
        :func:`log_emission` (None or an int ≥ 1), ``(t_min, t_max)`` the resolved inclusive t-range
        (the ``t_range`` argument, else :meth:`default_t_range`). It must draw from each observation's
        key alone and score the K classes on the same draws (see "Common random numbers").
      default_band: the t-range used when ``t_range=None``, as fractions (lo, hi) of T
        (:func:`band_steps`): ``FULL_BAND`` is 1..T, ``FIRST_STEP_BAND`` is t = 1.
      takes_band: whether a ``t_range`` may be given. False for an estimator whose t's are fixed (every t
        or a deterministic grid; t = 1): then ``t_range`` must be None.
      single_draw: ``num_t`` must be None or 1 (one t-draw per observation).
      several_draws: for a single-draw estimator, the name of the estimator that averages ``num_t > 1`` of
        its draws (same expectation); None: several draws reduce to one (:func:`resolve_num_draws`).
      grid: ``num_t`` is the size of a deterministic grid of t's (:func:`elbo_grid`), not a number of
        random t-draws (so "one t-draw per frame" keeps ``num_t``).
      two_noises: it draws ε and ε* per t-draw (the paper's two-stage z_{t−1}, z_t) rather than one ε.
      uses_decoder: the ``decoder`` argument changes its scores.
      uses_variance: the ``variance`` argument changes its scores.
      is_bound: its scores are a bound on log p(y | k) itself (not a score up to a class-independent
        scale), so a decision by the model's own likelihood takes them at temperature 1.
    """

    name: str
    scores: ScoresFn = dataclasses.field(repr=False)
    default_band: Tuple[float, float] = FULL_BAND
    takes_band: bool = True
    single_draw: bool = False
    several_draws: Optional[str] = None
    grid: bool = False
    two_noises: bool = False
    uses_decoder: bool = False
    uses_variance: bool = False
    is_bound: bool = False

    def default_t_range(self, num_steps: int) -> Tuple[int, int]:
        """The inclusive (t_min, t_max) it draws from when ``t_range=None``: ``default_band`` in steps."""
        return band_steps(self.default_band, num_steps)


class EstimatorRegistry(Mapping):
    """A read-only, ordered Mapping name → :class:`Estimator`; ``str()`` is the tuple of names."""

    def __init__(self, estimators: Sequence[Estimator]):
        self._by_name = {e.name: e for e in estimators}
        if len(self._by_name) != len(estimators):
            raise ValueError("estimator names must be unique")

    def __getitem__(self, name: str) -> Estimator:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __str__(self) -> str:
        return str(tuple(self._by_name))

    def __repr__(self) -> str:
        return f"EstimatorRegistry({tuple(self._by_name)})"


def get_estimator(estimator: Union[str, Estimator]) -> Estimator:
    """The :class:`Estimator` named ``estimator`` in ``ESTIMATORS``; an Estimator value is returned as is.

    Raises:
      ValueError: an unknown name (the message lists the registry).
    """
    if isinstance(estimator, Estimator):
        return estimator
    if isinstance(estimator, str) and estimator in ESTIMATORS:
        return ESTIMATORS[estimator]
    raise ValueError(f"unknown estimator {estimator!r}; expected one of {tuple(ESTIMATORS)} or an emission.Estimator")


def resolve_num_draws(estimator: Union[str, Estimator], num_t: Optional[int]) -> Tuple[Estimator, Optional[int]]:
    """The estimator and number of t-draws that honour a request for ``num_t`` draws.

    The single-draw rule, in one place: a single-draw estimator asked for ``num_t > 1`` draws becomes its
    ``several_draws`` estimator with ``num_t`` draws (random_t → multi_t, the mean of num_t random_t
    terms), or, without one, keeps its one draw (last_decoder: t = 1 is fixed); a single-draw estimator
    asked for None or 1 draw gets 1. Any other estimator is returned with ``num_t`` unchanged.

    Returns:
      ``(estimator, num_t)``, valid arguments of :func:`log_emission`.
    """
    est = get_estimator(estimator)
    if not est.single_draw:
        return est, num_t
    if num_t is not None and num_t > 1 and est.several_draws is not None:
        return get_estimator(est.several_draws), num_t
    return est, 1


def default_t_range(estimator: Union[str, Estimator], num_steps: int) -> Tuple[int, int]:
    """The inclusive t-range an estimator draws from when ``t_range=None`` (its ``default_band``).

    ``eps_mse``: (round(0.3 T), round(0.6 T)) clipped to 1..T; ``last_decoder``: (1, 1);
    the others: (1, T).
    """
    return get_estimator(estimator).default_t_range(num_steps)


def elbo_grid(num_steps: int, num_t: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The t-values and weights of the (grid) ELBO: Σ_j weights[j] · term(t_values[j]).

    t = 1 (the decoder term) always has weight 1. The KL terms t = 2..T are split into
    ``num_t − 1`` contiguous blocks of (nearly) equal size; each block is represented by its
    midpoint, weighted by the block size. ``num_t=None`` or ``num_t ≥ T`` gives every t with
    weight 1, the full bound.

    Args:
      num_steps: T.
      num_t: total number of terms (network evaluations per class), ≥ 2, or None.

    Returns:
      t_values: ``[n]`` int32, increasing, t_values[0] = 1.
      weights: ``[n]`` float32, weights[0] = 1, sum = T.
    """
    if num_t is None or num_t >= num_steps:
        return np.arange(1, num_steps + 1, dtype=np.int32), np.ones(num_steps, np.float32)
    if num_t < 2:
        raise ValueError(
            f"the grid ELBO needs num_t >= 2 (the t = 1 decoder term plus at least one KL term) or "
            f"num_t=None for the full bound, got num_t={num_t}")
    num_kl, num_blocks = num_steps - 1, num_t - 1
    edges = 2 + (np.arange(num_blocks + 1) * num_kl) // num_blocks  # block j = [edges[j], edges[j+1])
    sizes = np.diff(edges)
    mids = edges[:-1] + (sizes - 1) // 2
    t_values = np.concatenate([[1], mids]).astype(np.int32)
    weights = np.concatenate([[1], sizes]).astype(np.float32)
    return t_values, weights


def _check_inputs(schedule, y, num_classes, estimator, num_t, t_range, variance, decoder, chunk_size):
    """Validates the arguments; returns the :class:`Estimator` and the resolved (t_min, t_max)."""
    est = get_estimator(estimator)
    if variance not in diffusion.VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {diffusion.VARIANCES}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if num_t is not None and (not isinstance(num_t, (int, np.integer)) or num_t < 1):
        raise ValueError(f"num_t must be a positive int or None, got {num_t!r}")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if np.ndim(y) < 2:
        raise ValueError(
            f"y must have a batch axis: [B, D] vectors or [B, H, W, C] images, got shape {np.shape(y)}")
    if np.shape(y)[0] == 0:
        raise ValueError("y is an empty batch")
    if est.single_draw and num_t not in (None, 1):
        hint = (f"use {est.several_draws!r} for num_t={num_t}" if est.several_draws is not None
                else "pass num_t=1 or None")
        raise ValueError(f"estimator {est.name!r} uses one t-draw; {hint} (see emission.resolve_num_draws)")
    num_steps = schedule.num_steps
    if t_range is None:
        return (est, *est.default_t_range(num_steps))
    if not est.takes_band:
        raise ValueError(f"t_range does not apply to estimator {est.name!r}, whose t's are fixed "
                         f"(default band {est.default_band} of T); pass t_range=None")
    try:
        t_min, t_max = (int(v) for v in t_range)
    except (TypeError, ValueError):
        raise ValueError(f"t_range must be a pair of ints (t_min, t_max), got {t_range!r}") from None
    if not 1 <= t_min <= t_max <= num_steps:
        raise ValueError(f"t_range {t_range!r} must satisfy 1 <= t_min <= t_max <= T = {num_steps} "
                         "(inclusive, non-empty)")
    return est, t_min, t_max


# ----------------------------------------------------------------------------------------------
# Network evaluation shared by every estimator
# ----------------------------------------------------------------------------------------------

def eps_all_classes(eps_fn: EpsFn, params, z: Array, t: Array, num_classes: int) -> Array:
    """ε_θ(z, t, k) for k = 0..K−1 on the same inputs ``z [N, *event]``, ``t [N]``: ``[K, N, *event]``.

    The one way the library scores every class. When ``eps_fn`` offers a one-pass form
    (``eps_fn.all_classes(params, z, t) -> [K', N, *event]`` with ``eps_fn.num_classes = K' >= K``, as
    :func:`hmdm_jax.models.make_eps_fn` gives for a network with class heads), that single pass is used;
    otherwise (any plain 4-argument function) ``eps_fn`` is vmapped over the K classes.
    """
    all_classes = getattr(eps_fn, "all_classes", None)
    offered = getattr(eps_fn, "num_classes", None)
    if all_classes is not None and offered is not None and num_classes <= offered:
        eps = all_classes(params, z, t)
        return eps if num_classes == offered else eps[:num_classes]
    n = z.shape[0]

    def one_class(k):
        return eps_fn(params, z, t, jnp.full((n,), k, jnp.int32))

    return jax.vmap(one_class)(jnp.arange(num_classes, dtype=jnp.int32))


def observation_keys(key: Array, batch: int) -> Array:
    """One PRNG key per observation: ``key`` split B ways, or ``key`` itself when it is already a
    batch of B keys (raw ``[B, 2]`` uint32 or typed ``[B]``)."""
    is_typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if is_typed else 2):
        if key.shape[0] != batch:
            raise ValueError(f"got {key.shape[0]} keys for {batch} observations")
        return key
    return jax.random.split(key, batch)


def _vmap_examples(fn, *in_axes):
    """jax.vmap of a per-example diffusion function over the batch axis (in_axes as given)."""
    return jax.vmap(fn, in_axes=in_axes)


# ----------------------------------------------------------------------------------------------
# Sampled estimators (random_t, last_decoder, multi_t, elbo_term, eps_mse)
# ----------------------------------------------------------------------------------------------

def _draws(keys, event_shape, num_draws, t_min, t_max, two_noises):
    """Per-observation draws: t ``[b, n]`` int32 uniform on t_min..t_max, ε and ε* ``[b, n, *event]``.

    Three PRNG calls per observation (split, uniform, normal) rather than one per quantity and draw:
    jax.random's threefry hash is expensive to compile on CPU. ``eps_star`` is None unless two_noises.
    """

    def one(key_obs):
        key_t, key_noise = jax.random.split(key_obs)
        u = jax.random.uniform(key_t, (num_draws,), jnp.float32)
        t = jnp.minimum(t_min + jnp.floor(u * (t_max - t_min + 1)).astype(jnp.int32), t_max)
        noise = jax.random.normal(key_noise, (num_draws, 1 + two_noises) + tuple(event_shape), jnp.float32)
        return t, noise

    t, noise = jax.vmap(one)(keys)
    return t, noise[:, :, 0], (noise[:, :, 1] if two_noises else None)


def _eps_weight(schedule: Schedule, t, variance: str) -> Array:
    """w_t = β_t² / (2 σ_t² α_t (1 − ᾱ_t)): KL_t = w_t ‖ε − ε_θ‖² + const (t = 1: decoder)."""
    beta = schedule.betas[t - 1]
    return jnp.square(beta) / (
        2.0 * diffusion.p_variance(schedule, t, variance) * schedule.alphas[t - 1] * diffusion.one_minus_alpha_bar(schedule, t))


def _num_draws(num_t: Optional[int]) -> int:
    """The number of t-draws of a sampled estimator: ``num_t``, 1 when None."""
    return 1 if num_t is None else int(num_t)


def _mean_over_draws(scores: Array, b: int, num_draws: int) -> Array:
    """``[K, b·n]`` per-draw scores (observation-major) → ``[b, K]`` their mean over the n draws."""
    num_classes = scores.shape[0]
    return scores.reshape(num_classes, b, num_draws).mean(axis=-1).T


def _density_scores(eps_fn, params, schedule, y, keys, *, num_classes, num_t, t_min, t_max, variance, decoder):
    """random_t / multi_t / last_decoder on one chunk: ``y [b, *event]``, ``keys [b]`` → ``[b, K]``.

    The mean over n = num_t draws of log N(z_{t−1}; μ_θ(z_t, t, k), σ_t² I) (t = 1: the decoder of y).
    """
    b, event = y.shape[0], y.shape[1:]
    num_draws = _num_draws(num_t)
    t, eps, eps_star = _draws(keys, event, num_draws, t_min, t_max, True)  # [b, n], [b, n, *event] twice
    flat = lambda a: a.reshape((b * num_draws,) + a.shape[2:])
    t, eps, eps_star = flat(t), flat(eps), flat(eps_star)  # [b·n], [b·n, *event]
    y_rep = flat(jnp.broadcast_to(y[:, None], (b, num_draws) + event))  # [b·n, *event]
    # The paper's two-stage draw: z_{t−1} ~ q(z_{t−1} | y), then z_t ~ q(z_t | z_{t−1}); z_0 = y.
    z_prev = _vmap_examples(diffusion.q_sample, None, 0, 0, 0)(schedule, y_rep, t - 1, eps)
    z_t = _vmap_examples(diffusion.q_step, None, 0, 0, 0)(schedule, z_prev, t, eps_star)
    eps_hat = eps_all_classes(eps_fn, params, z_t, t, num_classes)  # [K, b·n, *event]

    def score(z_prev_i, z_t_i, t_i, y_i, eps_hat_i):
        dist = diffusion.p_reverse(schedule, z_t_i, t_i, eps_hat_i, variance)
        gauss = diffusion.gaussian_log_prob(z_prev_i, dist)  # at t = 1, z_prev = y: the decoder
        if decoder == "discretized":
            return jnp.where(t_i == 1, diffusion.discretized_gaussian_log_prob(y_i, dist), gauss)
        return gauss

    per_example = jax.vmap(score, in_axes=(0, 0, 0, 0, 0))
    scores = jax.vmap(per_example, in_axes=(None, None, None, None, 0))(z_prev, z_t, t, y_rep, eps_hat)  # [K, b·n]
    return _mean_over_draws(scores, b, num_draws)


def _eps_errors(eps_fn, params, schedule, y, keys, num_classes, num_draws, t_min, t_max):
    """The one-noise draws of elbo_term / eps_mse: t ``[b·n]`` int32 and ‖ε − ε_θ(z_t, t, k)‖² ``[K, b·n]``."""
    b, event = y.shape[0], y.shape[1:]
    t, eps, _ = _draws(keys, event, num_draws, t_min, t_max, False)  # [b, n], [b, n, *event]
    flat = lambda a: a.reshape((b * num_draws,) + a.shape[2:])
    t, eps = flat(t), flat(eps)
    y_rep = flat(jnp.broadcast_to(y[:, None], (b, num_draws) + event))
    z_t = _vmap_examples(diffusion.q_sample, None, 0, 0, 0)(schedule, y_rep, t, eps)
    eps_hat = eps_all_classes(eps_fn, params, z_t, t, num_classes)  # [K, b·n, *event]
    return t, jnp.sum(jnp.square(eps[None] - eps_hat).reshape(num_classes, b * num_draws, -1), axis=-1)


def _elbo_term_scores(eps_fn, params, schedule, y, keys, *, num_classes, num_t, t_min, t_max, variance, decoder):
    """elbo_term on one chunk: the mean over draws of −n_t w_t ‖ε − ε_θ‖², ``[b, K]`` (decoder unused)."""
    num_draws = _num_draws(num_t)
    t, sq = _eps_errors(eps_fn, params, schedule, y, keys, num_classes, num_draws, t_min, t_max)
    weight = (t_max - t_min + 1) * _eps_weight(schedule, t, variance)  # [b·n]
    return _mean_over_draws(-weight[None] * sq, y.shape[0], num_draws)


def _eps_mse_scores(eps_fn, params, schedule, y, keys, *, num_classes, num_t, t_min, t_max, variance, decoder):
    """eps_mse on one chunk: the mean over draws of −‖ε − ε_θ‖², ``[b, K]`` (decoder, variance unused)."""
    num_draws = _num_draws(num_t)
    _, sq = _eps_errors(eps_fn, params, schedule, y, keys, num_classes, num_draws, t_min, t_max)
    return _mean_over_draws(-sq, y.shape[0], num_draws)


# ----------------------------------------------------------------------------------------------
# The ELBO
# ----------------------------------------------------------------------------------------------

def _elbo_chunk(eps_fn, params, schedule, y, keys, t_values, *, num_classes, variance, decoder):
    """ElboTerms-like (terms [n, b, K], prior [b]) for one chunk; one t at a time via lax.map."""
    b, event = y.shape[0], y.shape[1:]

    def term_at(t):
        # One z_t draw per (observation, t), shared by the K classes; the key depends on t only,
        # so a grid ELBO reuses exactly the draws of the full one.
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), event, jnp.float32))(keys)
        t_vec = jnp.full((b,), t, jnp.int32)
        z_t = _vmap_examples(diffusion.q_sample, None, 0, 0, 0)(schedule, y, t_vec, noise)
        eps_hat = eps_all_classes(eps_fn, params, z_t, t_vec, num_classes)  # [K, b, *event]
        t_kl = jnp.maximum(t, 2)  # q(z_0 | z_1, y) is a point mass; keep the unused branch finite

        def score(y_i, z_t_i, eps_hat_i):
            dist = diffusion.p_reverse(schedule, z_t_i, t, eps_hat_i, variance)
            if decoder == "discretized":
                dec = diffusion.discretized_gaussian_log_prob(y_i, dist)
            else:
                dec = diffusion.gaussian_log_prob(y_i, dist)
            p_kl = diffusion.p_reverse(schedule, z_t_i, t_kl, eps_hat_i, variance)
            kl = diffusion.gaussian_kl(diffusion.q_posterior(schedule, y_i, z_t_i, t_kl), p_kl)
            return jnp.where(t == 1, dec, -kl)

        per_example = jax.vmap(score, in_axes=(0, 0, 0))
        return jax.vmap(per_example, in_axes=(None, None, 0))(y, z_t, eps_hat).T  # [b, K]

    terms = jax.lax.map(term_at, t_values)  # [n, b, K]
    prior = -jax.vmap(diffusion.prior_kl, in_axes=(None, 0))(schedule, y)
    return terms, prior


def _elbo_scores(eps_fn, params, schedule, y, keys, *, num_classes, num_t, t_min, t_max, variance, decoder):
    """elbo on one chunk: the (grid) bound Σ_j weights[j] term(t_j) + prior, ``[b, K]`` (t-range unused)."""
    t_values, weights = elbo_grid(schedule.num_steps, num_t)
    terms, prior = _elbo_chunk(eps_fn, params, schedule, y, keys, jnp.asarray(t_values),
                               num_classes=num_classes, variance=variance, decoder=decoder)
    return jnp.tensordot(jnp.asarray(weights), terms, axes=1) + prior[:, None]


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

ESTIMATORS: Mapping[str, Estimator] = EstimatorRegistry((
    Estimator("random_t", _density_scores, single_draw=True, several_draws="multi_t", two_noises=True,
              uses_decoder=True, uses_variance=True),
    # uses_variance=False: at t = 1 both variances are β_1
    Estimator("last_decoder", _density_scores, default_band=FIRST_STEP_BAND, takes_band=False, single_draw=True,
              two_noises=True, uses_decoder=True),
    Estimator("multi_t", _density_scores, two_noises=True, uses_decoder=True, uses_variance=True),
    Estimator("elbo", _elbo_scores, takes_band=False, grid=True, uses_decoder=True, uses_variance=True,
              is_bound=True),
    Estimator("elbo_term", _elbo_term_scores, uses_variance=True),
    Estimator("eps_mse", _eps_mse_scores, default_band=DEFAULT_EPS_MSE_BAND),
))


def _over_chunks(fn, y, keys, chunk_size):
    """fn(y_chunk, keys_chunk) over chunks of ``chunk_size`` observations with lax.map.

    B need not be divisible: the batch is padded by repeating observations, and the padding is cut
    from every output (outputs have the chunk's batch axis first: ``[b, ...]``).
    """
    batch = y.shape[0]
    if chunk_size is None or chunk_size >= batch:
        return fn(y, keys)
    num_chunks = -(-batch // chunk_size)
    idx = jnp.arange(num_chunks * chunk_size) % batch
    y_c = y[idx].reshape((num_chunks, chunk_size) + y.shape[1:])
    keys_c = keys[idx].reshape((num_chunks, chunk_size) + keys.shape[1:])
    out = jax.lax.map(lambda args: fn(*args), (y_c, keys_c))
    return jax.tree_util.tree_map(lambda a: a.reshape((num_chunks * chunk_size,) + a.shape[2:])[:batch], out)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def log_emission(
    eps_fn: EpsFn,
    params,
    schedule: Schedule,
    y: Float[Array, "B *event"],
    key: PRNGKeyArray | UInt32[Array, "2"] | UInt32[Array, "B 2"] | Key[Array, " B"],
    num_classes: int,
    *,
    estimator: Union[str, Estimator] = "eps_mse",
    num_t: Optional[int] = None,
    t_range: Optional[Tuple[int, int]] = None,
    scale=1.0,
    per_dim: bool = False,
    variance: str = "beta",
    decoder: str = "gaussian",
    chunk_size: Optional[int] = None,
) -> Float[Array, "B K"]:
    """log b̃_k(y) for every observation and class (see the module docstring for each estimator).

    Args:
      eps_fn: ``eps_fn(params, z_t [N, *event], t [N] int32, k [N] int32) -> [N, *event]``. Static.
      params: the network parameters (any pytree; differentiable).
      schedule: the noise schedule (T = schedule.num_steps).
      y: ``[B, *event]`` float32 observations: vectors ``[B, D]`` or images ``[B, H, W, C]`` (any C;
        scaled to [−1, 1] when ``decoder="discretized"``).
      key: PRNG key, observation i then uses ``jax.random.split(key, B)[i]``; or a batch of B keys,
        one per observation (so that a frame's draws do not depend on how the batch is split over
        devices).
      num_classes: K (classes 0..K−1 are scored; the null class K is not). Static.
      estimator: a name in ``ESTIMATORS`` (default ``"eps_mse"``) or an :class:`Estimator`. Static.
      num_t: number of t-draws averaged (single-draw estimators, random_t/last_decoder: must be 1 or
        None, see :func:`resolve_num_draws`; multi_t, elbo_term, eps_mse: default 1), or for a grid
        estimator (``"elbo"``) the grid size (None = full bound, see :func:`elbo_grid`). Static.
      t_range: inclusive ``(t_min, t_max)``, 1 ≤ t_min ≤ t_max ≤ T, for the estimators that take a band
        (random_t, multi_t, elbo_term, eps_mse; None = the estimator's :func:`default_t_range`); must be
        None for the others (elbo, last_decoder). Static.
      scale: multiplies the result (may be traced).
      per_dim: divide the result by D = prod(event shape). Static.
      variance: σ_t² of the reverse steps, ``"beta"`` or ``"beta_tilde"``. Static.
      decoder: the t = 1 density, ``"gaussian"`` or ``"discretized"`` (256 bins). Static.
      chunk_size: score at most this many observations per network call (lax.map over chunks);
        None = all at once. Results are identical. Static.

    Returns:
      ``[B, K]`` float32 log b̃_k(y_i) (nats, times ``scale``, divided by D if ``per_dim``).
    """
    est, t_min, t_max = _check_inputs(schedule, y, num_classes, estimator, num_t, t_range, variance, decoder,
                                      chunk_size)
    y = jnp.asarray(y, jnp.float32)
    keys = observation_keys(key, y.shape[0])
    chunk_fn = functools.partial(est.scores, eps_fn, params, schedule, num_classes=num_classes, num_t=num_t,
                                 t_min=t_min, t_max=t_max, variance=variance, decoder=decoder)
    log_b = _over_chunks(chunk_fn, y, keys, chunk_size) * scale
    if per_dim:
        log_b = log_b / math.prod(y.shape[1:])
    return log_b.astype(jnp.float32)


def elbo_terms(
    eps_fn: EpsFn,
    params,
    schedule: Schedule,
    y: Array,
    key: Array,
    num_classes: int,
    *,
    t_values: Optional[Sequence[int]] = None,
    variance: str = "beta",
    decoder: str = "gaussian",
    chunk_size: Optional[int] = None,
) -> ElboTerms:
    """The individual ELBO terms at the given t's, on the draws ``log_emission(estimator="elbo")`` uses.

    With ``t_values=None`` (all of 1..T) and the same key,
    ``terms.sum(0) + prior[:, None] == log_emission(..., estimator="elbo")``; for a grid,
    ``tensordot(weights, elbo_terms(t_values=grid).terms, 1) + prior[:, None]`` with
    ``grid, weights = elbo_grid(T, num_t)``.

    Args:
      t_values: concrete ints in 1..T (default 1..T); the draw of z_t depends on t only, so the term of
        a given t is the same whatever else is requested.
      (the others as in :func:`log_emission`)

    Returns:
      :class:`ElboTerms` with ``terms [n, B, K]``, ``prior [B]``, ``t_values [n]`` (nats).
    """
    _check_inputs(schedule, y, num_classes, "elbo", None, None, variance, decoder, chunk_size)
    num_steps = schedule.num_steps
    if t_values is None:
        t_np = np.arange(1, num_steps + 1, dtype=np.int32)
    else:
        t_np = np.asarray(t_values)
        if t_np.ndim != 1 or t_np.size == 0 or not np.issubdtype(t_np.dtype, np.integer):
            raise ValueError(f"t_values must be a non-empty 1-D sequence of ints, got {t_values!r}")
        if t_np.min() < 1 or t_np.max() > num_steps:
            raise ValueError(f"t_values must lie in 1..T = 1..{num_steps}")
        t_np = t_np.astype(np.int32)
    y = jnp.asarray(y, jnp.float32)
    keys = observation_keys(key, y.shape[0])
    t_arr = jnp.asarray(t_np)

    def chunk_fn(y_c, keys_c):
        terms, prior = _elbo_chunk(eps_fn, params, schedule, y_c, keys_c, t_arr,
                                   num_classes=num_classes, variance=variance, decoder=decoder)
        return jnp.swapaxes(terms, 0, 1), prior  # batch axis first for chunking

    terms, prior = _over_chunks(chunk_fn, y, keys, chunk_size)
    return ElboTerms(jnp.swapaxes(terms, 0, 1), prior, t_arr)


def make_log_emission(eps_fn: EpsFn, num_classes: int, **options) -> Callable[..., Array]:
    """A jitted ``(params, schedule, y, key) -> [B, K]`` computing ``log_emission`` with fixed options.

    ``options`` are the keyword arguments of :func:`log_emission` (estimator, num_t, t_range, scale,
    per_dim, variance, decoder, chunk_size); they are validated now, except for shape checks.
    """
    bad = set(options) - set(EMISSION_STATIC_ARGNAMES) - {"scale"}
    if bad:
        raise ValueError(f"unknown log_emission options {sorted(bad)}")
    options = dict(options)
    if "t_range" in options and options["t_range"] is not None:
        options["t_range"] = tuple(options["t_range"])

    @jax.jit
    def emission(params, schedule, y, key):
        return log_emission(eps_fn, params, schedule, y, key, num_classes, **options)

    return emission


def clamp_to_labels(log_b: Array, labels: Array) -> Array:
    """Observed labels clamp the class: for labels ≥ 0 every other class gets −inf.

    Args:
      log_b: ``[..., K]`` emission log-likelihoods.
      labels: ``[...]`` int32 in −1..K−1 (−1 = unknown: that row is left unchanged).

    Returns:
      ``[..., K]``, log_b with ``log_b[..., j] = −inf`` for j ≠ label where the label is known; the
      known label's own entry is never changed.
    """
    log_b = jnp.asarray(log_b)
    labels = jnp.asarray(labels)
    if log_b.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {labels.shape} must equal log_b's leading shape {log_b.shape[:-1]}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers (−1 = unknown), got dtype {labels.dtype}")
    classes = jnp.arange(log_b.shape[-1])
    keep = (labels[..., None] < 0) | (classes == labels[..., None])
    return jnp.where(keep, log_b, -jnp.inf)


def class_log_posterior(log_b: Array, log_pi: Array) -> Array:
    """log p̃(x = k | y) = log b̃_k + log π_k − logsumexp_j(log b̃_j + log π_j).

    −inf entries (clamped labels, π_k = 0) are allowed and give probability 0; a row with no possible
    class (all −inf) stays all −inf instead of becoming NaN.

    Args:
      log_b: ``[..., K]`` emission log-likelihoods.
      log_pi: ``[K]`` (or broadcastable to log_b) log prior class probabilities.

    Returns:
      ``[..., K]`` normalised log-probabilities (each row's exp sums to 1).
    """
    log_b, log_pi = jnp.asarray(log_b), jnp.asarray(log_pi)
    if log_pi.shape[-1:] != log_b.shape[-1:]:
        raise ValueError(f"log_pi has {log_pi.shape[-1:]} classes but log_b has {log_b.shape[-1:]}")
    # Shift log_b by its row maximum before adding log π: −1.2e5 + log π would round to float32's
    # 0.008-nat spacing there, while the difference of two nearby float32 scores is exact.
    peak = jnp.max(log_b, axis=-1, keepdims=True)
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    joint = (log_b - peak) + log_pi
    top = jnp.max(joint, axis=-1, keepdims=True)
    shifted = joint - jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    norm = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
    norm = jnp.where(jnp.isfinite(norm), norm, 0.0)  # all −inf row: −inf − 0, not −inf − (−inf)
    return shifted - norm
