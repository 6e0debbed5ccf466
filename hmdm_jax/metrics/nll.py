"""Negative log-likelihood in bits per dimension for the mixture and the HMDM.

Inputs are per-class ELBOs from the emission module (estimator="elbo", decoder="discretized"):
``elbo[..., k]`` is a lower bound, in nats, on log p(y | x = k) for one data point y. The data are
8-bit images (256 levels) scaled to [−1, 1] and the discretized decoder puts probability mass on the
256 bins, so p(y | x = k) is a probability of the *discrete* data, not a density. The numbers below
are therefore proper discrete bits/dim — upper bounds on −log₂ p(y) / D — computed exactly as in the
DDPM literature (Ho et al. 2020 report 3.70–3.75 bits/dim on CIFAR-10 this way), and comparable with it.

Why they are bounds: every ELBO_k(y) ≤ log p(y | k), and both the mixture sum and the HMM sum over
paths are sums of nonnegative terms, increasing in each p(y | k); replacing p by exp(ELBO) therefore
lowers log p(y) and raises the NLL.

* Mixture: log p(y) ≥ logsumexp_k (log π_k + ELBO_k(y)).
* HMDM: log p(y_1..y_n) ≥ the forward-algorithm log marginal with emissions log b_k(y_i) := ELBO_k(y_i),
  computed by :func:`hmdm_jax.hmm.forward_filter`.

Units: ``num_dims`` = D, the number of scalar dimensions per frame (H·W·C for images). bits/dim =
nats / (D · ln 2). For the HMDM the bound is per valid frame; the dataset-level number should weight
sequences by their frame counts (sum of nats over the set / (total frames · D · ln 2)), which
:func:`dataset_bits_per_dim` does.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["mixture_nll_bits_per_dim", "hmdm_nll_bits_per_dim", "dataset_bits_per_dim"]

Array = jax.Array


def _check_num_dims(num_dims) -> int:
    if int(num_dims) != num_dims or int(num_dims) <= 0:
        raise ValueError(f"num_dims must be a positive integer (dimensions per frame), got {num_dims}")
    return int(num_dims)


def _check_log_pi(log_pi, num_classes: int) -> Array:
    log_pi = jnp.asarray(log_pi, jnp.float32)
    if log_pi.shape != (num_classes,):
        raise ValueError(f"log_pi must have shape [K]=({num_classes},), got {log_pi.shape}")
    return log_pi


def mixture_nll_bits_per_dim(log_pi, elbo, num_dims: int) -> Array:
    """Upper bound on −log₂ p(y) / D for a K-component mixture, per data point.

    Args:
      log_pi: ``[K]`` log mixture weights (log-probabilities, summing to 1 in probability space).
      elbo: ``[B, K]`` per-class ELBOs in nats, ``elbo[b, k] ≤ log p(y_b | x = k)`` (discretized decoder).
      num_dims: D, scalar dimensions per data point (e.g. 28·28·1).

    Returns:
      ``[B]`` float32 bits/dim: −logsumexp_k(log π_k + ELBO_k(y_b)) / (D ln 2).
    """
    num_dims = _check_num_dims(num_dims)
    elbo = jnp.asarray(elbo, jnp.float32)
    if elbo.ndim != 2:
        raise ValueError(f"elbo must have shape [B, K], got {elbo.shape}")
    log_pi = _check_log_pi(log_pi, elbo.shape[1])
    log_p = jax.nn.logsumexp(log_pi[None, :] + elbo, axis=1)
    return -log_p / (num_dims * math.log(2.0))


def hmdm_nll_bits_per_dim(log_pi, log_A, elbo, mask, num_dims: int) -> Array:
    """Upper bound on −log₂ p(y_1..y_n) / (n_valid · D) for each sequence of an HMDM.

    The forward algorithm of :func:`hmdm_jax.hmm.forward_filter` runs with emissions
    log b_k(y_i) = ELBO_k(y_i), one sequence at a time, vmapped over the batch.

    Args:
      log_pi: ``[K]`` log initial-state probabilities.
      log_A: ``[K, K]`` log transition matrix, ``log_A[i, j] = log p(x_{l+1} = j | x_l = i)``.
      elbo: ``[N, n, K]`` per-frame, per-class ELBOs in nats (discretized decoder).
      mask: ``[N, n]`` bool, True for valid frames (padding only at the end). None = all valid.
      num_dims: D, scalar dimensions per frame.

    Returns:
      ``[N]`` float32 bits/dim per valid frame. A sequence with no valid frame gets NaN.
    """
    from hmdm_jax.hmm import forward_filter  # core module; imported here so metrics import without it

    num_dims = _check_num_dims(num_dims)
    elbo = jnp.asarray(elbo, jnp.float32)
    if elbo.ndim != 3:
        raise ValueError(f"elbo must have shape [N, n, K], got {elbo.shape}")
    num_seq, seq_len, num_classes = elbo.shape
    log_pi = _check_log_pi(log_pi, num_classes)
    log_A = jnp.asarray(log_A, jnp.float32)
    if log_A.shape != (num_classes, num_classes):
        raise ValueError(f"log_A must have shape [K, K]=({num_classes}, {num_classes}), got {log_A.shape}")
    if mask is None:
        mask = jnp.ones((num_seq, seq_len), dtype=bool)
    mask = jnp.asarray(mask)
    if mask.shape != (num_seq, seq_len):
        raise ValueError(f"mask must have shape [N, n]=({num_seq}, {seq_len}), got {mask.shape}")
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean, got dtype {mask.dtype}")

    def one_sequence(log_b, m):
        return forward_filter(log_pi, log_A, log_b, m).log_marginal

    log_marginal = jax.vmap(one_sequence)(elbo, mask)  # [N] nats
    num_valid = jnp.sum(mask, axis=1)
    bpd = -log_marginal / (num_valid * num_dims * math.log(2.0))
    return jnp.where(num_valid > 0, bpd, jnp.nan)


def dataset_bits_per_dim(bits_per_dim, num_frames=None) -> Array:
    """Dataset-level bits/dim from per-sequence values, weighting each sequence by its frame count.

    Args:
      bits_per_dim: ``[N]`` per-sequence (per-frame-normalised) bits/dim, e.g. from
        :func:`hmdm_nll_bits_per_dim`, or per-point values from :func:`mixture_nll_bits_per_dim`.
      num_frames: ``[N]`` valid frames per sequence (``mask.sum(1)``); None = equal weights.

    Returns:
      scalar: Σ_i n_i · bpd_i / Σ_i n_i (= total nats / (total frames · D · ln 2)).
    """
    bpd = jnp.asarray(bits_per_dim, jnp.float32)
    if bpd.ndim != 1:
        raise ValueError(f"bits_per_dim must have shape [N], got {bpd.shape}")
    if num_frames is None:
        return jnp.mean(bpd)
    w = jnp.asarray(num_frames, jnp.float32)
    if w.shape != bpd.shape:
        raise ValueError(f"num_frames {w.shape} must match bits_per_dim {bpd.shape}")
    safe = jnp.where(w > 0, bpd, 0.0)  # sequences without frames carry NaN and zero weight
    return jnp.sum(w * safe) / jnp.sum(w)
