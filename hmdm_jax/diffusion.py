"""The Gaussian diffusion kernel of DDPM: schedules, q(z_t | y), posteriors and the reverse step.

Conventions
-----------
* Diffusion time ``t`` is 1-based as in the paper: ``z_0 = y`` and ``t = 1..T``.
* One example per call: ``y``, ``z_t`` and ``eps`` have any shape ``[*event]`` (a vector or an
  ``[H, W, C]`` image) and ``t`` is a scalar int. Batch with ``jax.vmap``. Elementwise functions also
  broadcast a scalar ``t`` over a batch; log-densities sum over *all* axes of their input.
* Every function takes the one immutable :class:`Schedule`, so that training, scoring and sampling can
  never disagree on β, α, ᾱ.

The seed paper (shared/seeds/000) has typos in its formulas: the emission writes ``1/√α_1`` where
``1/√α_t`` is meant, and Algorithm 2 writes ``(1 − α_t)`` where DDPM writes ``β_t`` (equal, since
``α_t = 1 − β_t``). We implement the standard DDPM formulas (Ho et al., 2020):

    q(z_t | y)          = N(√ᾱ_t y, (1 − ᾱ_t) I)
    q(z_t | z_{t−1})    = N(√α_t z_{t−1}, β_t I)
    q(z_{t−1} | z_t, y) = N(μ̃_t, β̃_t I),  μ̃_t = √ᾱ_{t−1} β_t/(1−ᾱ_t) y + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) z_t,
                                            β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t
    p_θ(z_{t−1} | z_t)  = N((z_t − β_t/√(1−ᾱ_t) ε_θ(z_t, t)) / √α_t, σ_t² I),  σ_t² ∈ {β_t, β̃_t}
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np
from jaxtyping import Float, Int

__all__ = [
    "alpha_bar", "cosine_schedule", "decoder_log_prob", "discretized_gaussian_log_prob", "Gaussian",
    "gaussian_kl", "gaussian_log_prob", "get_schedule", "linear_schedule", "one_minus_alpha_bar",
    "p_mean", "p_reverse", "p_variance", "predict_y_from_eps", "prior_kl", "q_posterior",
    "q_sample", "q_step", "reverse_step", "Schedule", "schedule_from_betas", "VARIANCES",
]

Array = jax.Array

VARIANCES = ("beta", "beta_tilde")


class Schedule(NamedTuple):
    """The noise schedule, a pytree of three ``[T]`` float32 arrays; index ``t − 1`` holds step ``t``.

    Attributes:
      betas: ``[T]``, β_t, the variance added at step t.
      alphas: ``[T]``, α_t = 1 − β_t.
      alpha_bars: ``[T]``, ᾱ_t = ∏_{s ≤ t} α_s, the signal fraction of q(z_t | y).
    """

    betas: Array
    alphas: Array
    alpha_bars: Array

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps (static: read from the array shape)."""
        return self.betas.shape[0]


def schedule_from_betas(betas) -> Schedule:
    """Builds a :class:`Schedule` from ``[T]`` betas in (0, 1); computed in float64, stored float32."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError("every beta must lie in the open interval (0, 1)")
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)
    as32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(as32(betas), as32(alphas), as32(alpha_bars))


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                    max_beta: float = 0.999) -> Schedule:
    """DDPM's linear schedule: β_t evenly spaced from ``beta_start`` (t = 1) to ``beta_end`` (t = T).

    The endpoints are rescaled by 1000 / T so that any T spans the same noise range as T = 1000;
    betas are clipped at ``max_beta`` (the rescaled β_T reaches 1 for T ≤ 20).
    """
    scale = 1000.0 / num_steps
    return schedule_from_betas(np.minimum(np.linspace(scale * beta_start, scale * beta_end, num_steps), max_beta))


def cosine_schedule(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """The cosine schedule of Nichol & Dhariwal (2021): ᾱ(u) ∝ cos²((u + s)/(1 + s) · π/2), β clipped."""
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.clip(1.0 - f[1:] / f[:-1], 1e-8, max_beta)
    return schedule_from_betas(betas)


def get_schedule(name: str, num_steps: int) -> Schedule:
    """The schedule called ``name`` ("linear" or "cosine") with ``num_steps`` steps."""
    if name == "linear":
        return linear_schedule(num_steps)
    if name == "cosine":
        return cosine_schedule(num_steps)
    raise ValueError(f"unknown schedule {name!r}; expected 'linear' or 'cosine'")


def _at(values: Array, t) -> Array:
    """values[t − 1] for 1-based t (values is a ``[T]`` schedule array)."""
    return values[jnp.asarray(t, jnp.int32) - 1]


def alpha_bar(schedule: Schedule, t) -> Array:
    """ᾱ_t for t in 0..T, with ᾱ_0 = 1 (so that z_0 = y); t may be any int array."""
    t = jnp.asarray(t, jnp.int32)
    return jnp.where(t > 0, schedule.alpha_bars[jnp.maximum(t, 1) - 1], 1.0)


def one_minus_alpha_bar(schedule: Schedule, t) -> Array:
    """1 − ᾱ_t for t in 0..T (0 at t = 0), accurate in float32 where ᾱ_t ≈ 1.

    ``1 − alpha_bar`` in float32 loses ~1e-4 relative accuracy at small t (ᾱ_1 = 0.9999); this uses
    −expm1(Σ_{s ≤ t} log1p(−β_s)) instead (relative error ~1e-6 everywhere).
    """
    t = jnp.asarray(t, jnp.int32)
    log_alpha_bars = jnp.cumsum(jnp.log1p(-schedule.betas))
    return jnp.where(t > 0, -jnp.expm1(log_alpha_bars[jnp.maximum(t, 1) - 1]), 0.0)


def q_sample(schedule: Schedule, y: Float[Array, "*shape"], t: Int[Array, ""] | int,
             noise: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """A draw from q(z_t | y) = N(√ᾱ_t y, (1 − ᾱ_t) I), reparameterised by ``noise`` ~ N(0, I).

    Args:
      schedule: the noise schedule.
      y: ``[*event]``, the clean observation z_0.
      t: scalar int in 0..T (t = 0 returns y).
      noise: ``[*event]``, standard normal.

    Returns:
      ``[*event]``, z_t.
    """
    return jnp.sqrt(alpha_bar(schedule, t)) * y + jnp.sqrt(one_minus_alpha_bar(schedule, t)) * noise


def q_step(schedule: Schedule, z_prev: Array, t, noise: Array) -> Array:
    """One forward step, a draw from q(z_t | z_{t−1}) = N(√α_t z_{t−1}, β_t I), for t in 1..T."""
    return jnp.sqrt(_at(schedule.alphas, t)) * z_prev + jnp.sqrt(_at(schedule.betas, t)) * noise


class Gaussian(NamedTuple):
    """An isotropic Gaussian N(mean, variance · I).

    Attributes:
      mean: ``[*event]``.
      variance: scalar (shared by every coordinate).
    """

    mean: Array
    variance: Array


def q_posterior(schedule: Schedule, y: Array, z_t: Array, t) -> Gaussian:
    """q(z_{t−1} | z_t, y) = N(μ̃_t, β̃_t I) for t in 1..T (at t = 1 it is the point mass at y).

    Args:
      y: ``[*event]``, z_0.
      z_t: ``[*event]``.
      t: scalar int in 1..T.
    """
    beta = _at(schedule.betas, t)
    t_prev = jnp.asarray(t) - 1
    one_minus_t, one_minus_prev = one_minus_alpha_bar(schedule, t), one_minus_alpha_bar(schedule, t_prev)
    coef_y = jnp.sqrt(alpha_bar(schedule, t_prev)) * beta / one_minus_t
    coef_z = jnp.sqrt(_at(schedule.alphas, t)) * one_minus_prev / one_minus_t
    return Gaussian(coef_y * y + coef_z * z_t, one_minus_prev / one_minus_t * beta)


def predict_y_from_eps(schedule: Schedule, z_t: Array, t, eps: Array) -> Array:
    """ŷ = (z_t − √(1 − ᾱ_t) ε) / √ᾱ_t, the clean observation implied by a noise prediction."""
    return (z_t - jnp.sqrt(one_minus_alpha_bar(schedule, t)) * eps) / jnp.sqrt(alpha_bar(schedule, t))


def p_mean(schedule: Schedule, z_t: Float[Array, "*shape"], t: Int[Array, ""] | int,
           eps: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """The reverse mean (z_t − β_t/√(1 − ᾱ_t) · ε) / √α_t, given ``eps`` = ε_θ(z_t, t, k)."""
    beta = _at(schedule.betas, t)
    return (z_t - beta / jnp.sqrt(one_minus_alpha_bar(schedule, t)) * eps) / jnp.sqrt(_at(schedule.alphas, t))


def p_variance(schedule: Schedule, t, variance: str = "beta") -> Array:
    """σ_t² of the reverse step: β_t (``"beta"``) or β̃_t (``"beta_tilde"``).

    β̃_1 = 0, so at t = 1 ``"beta_tilde"`` falls back to β_1 (the decoder needs a proper density).
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
    beta = _at(schedule.betas, t)
    if variance == "beta":
        return beta
    t = jnp.asarray(t)
    tilde = one_minus_alpha_bar(schedule, t - 1) / one_minus_alpha_bar(schedule, t) * beta
    return jnp.where(t > 1, tilde, beta)


def p_reverse(schedule: Schedule, z_t: Array, t, eps: Array, variance: str = "beta") -> Gaussian:
    """p_θ(z_{t−1} | z_t, k) as a Gaussian, given ``eps`` = ε_θ(z_t, t, k); at t = 1 the decoder."""
    return Gaussian(p_mean(schedule, z_t, t, eps), p_variance(schedule, t, variance))


def reverse_step(key: Array, schedule: Schedule, z_t: Array, t, eps: Array, variance: str = "beta") -> Array:
    """One ancestral step z_{t−1} ~ p_θ(z_{t−1} | z_t, k); at t = 1 it returns the mean (no noise)."""
    dist = p_reverse(schedule, z_t, t, eps, variance)
    noise = jax.random.normal(key, z_t.shape, z_t.dtype)
    return dist.mean + jnp.where(jnp.asarray(t) > 1, jnp.sqrt(dist.variance), 0.0) * noise


def gaussian_log_prob(x: Array, dist: Gaussian) -> Array:
    """log N(x; mean, variance · I), summed over all axes of ``x`` (nats, scalar)."""
    d = x.size
    sq = jnp.sum(jnp.square(x - dist.mean))
    return -0.5 * (sq / dist.variance + d * jnp.log(2.0 * math.pi * dist.variance))


def gaussian_kl(q: Gaussian, p: Gaussian) -> Array:
    """KL(q ‖ p) between isotropic Gaussians of the same shape, summed over all axes (nats, scalar)."""
    d = q.mean.size
    sq = jnp.sum(jnp.square(q.mean - p.mean))
    return 0.5 * (d * (jnp.log(p.variance) - jnp.log(q.variance) + q.variance / p.variance - 1.0) + sq / p.variance)


def decoder_log_prob(schedule: Schedule, y: Array, z_1: Array, eps: Array) -> Array:
    """log p_θ(y | z_1, k) for the Gaussian decoder N(p_mean(z_1, 1, ε), β_1 I), summed (nats, scalar)."""
    return gaussian_log_prob(y, p_reverse(schedule, z_1, 1, eps))


def discretized_gaussian_log_prob(y: Array, dist: Gaussian, num_bins: int = 256) -> Array:
    """log P(y) of ``num_bins``-level data under a Gaussian discretised to the bins, summed (nats, scalar).

    ``y`` holds data scaled to [−1, 1] (uint8 v ↦ 2v/255 − 1), any shape and any channel count. Each
    bin has width 2/(num_bins − 1); the two edge bins extend to ∓∞ (Ho et al., 2020, eq. 13).

    Computed with log Φ and log(1 − e^x) on the lower tail (by the Gaussian's symmetry), so a bin many
    standard deviations from the mean keeps its true (tiny) log-probability in float32 instead of
    being floored (a difference of two CDFs near 1 loses every digit beyond ~5σ).
    """
    half_bin = 1.0 / (num_bins - 1)
    inv_std = jax.lax.rsqrt(dist.variance)
    centred = y - dist.mean
    log_cdf_plus = jax.scipy.special.log_ndtr((centred + half_bin) * inv_std)  # left edge bin: P(Y < y + h)
    log_sf_min = jax.scipy.special.log_ndtr(-(centred - half_bin) * inv_std)  # right edge bin: P(Y > y − h)
    # Interior bin: Φ(a) − Φ(b) with a = (h − |c|)/σ > b = (−h − |c|)/σ, evaluated on the lower tail.
    dist_abs = jnp.abs(centred)
    log_a = jax.scipy.special.log_ndtr((half_bin - dist_abs) * inv_std)
    log_b = jax.scipy.special.log_ndtr((-half_bin - dist_abs) * inv_std)
    log_delta = log_a + jnp.log(-jnp.expm1(log_b - log_a))
    edge = 1.0 - half_bin
    log_probs = jnp.where(y < -edge, log_cdf_plus, jnp.where(y > edge, log_sf_min, log_delta))
    return jnp.sum(log_probs)


def prior_kl(schedule: Schedule, y: Array) -> Array:
    """KL(q(z_T | y) ‖ N(0, I)), the class-independent prior term of the ELBO (nats, scalar)."""
    t_max = schedule.num_steps
    q = Gaussian(jnp.sqrt(alpha_bar(schedule, t_max)) * y, one_minus_alpha_bar(schedule, t_max))
    return gaussian_kl(q, Gaussian(jnp.zeros_like(y), jnp.ones(())))
