"""Fréchet distance between Gaussian fits of feature sets (FID), with a pluggable feature network.

FID = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}) between the mean/covariance of features of real and
generated images (Heusel et al., 2017). The value depends on the feature network, the sample count
(it is biased upwards for small N), the sampler and its number of steps, and whether EMA weights were
used; :func:`fid_record` attaches all of these to every reported number.

Feature networks (:data:`FeatureExtractor`: images ``[B, H, W, C]`` in [−1, 1] → features ``[B, F]``):

* CIFAR-10 / natural images: :func:`hmdm_jax.metrics.inception.inception_feature_extractor` — the
  pytorch-fid InceptionV3 (pool3, 2048-d) with user-supplied weights. Only this gives numbers
  comparable with published FIDs.
* Digits (MNIST and the like): :func:`hmdm_jax.metrics.digit_classifier.classifier_feature_extractor`,
  a small CNN trained by the project on the training split. This "domain FID" is meaningful for
  comparing models within this project only; it is NOT comparable with Inception FID.

The matrix square root term is computed in float64 as tr((Σ₁ Σ₂)^{1/2}) = Σ √λ_i(√Σ₁ Σ₂ √Σ₁): the
product √Σ₁ Σ₂ √Σ₁ is symmetric PSD and has the same eigenvalues as Σ₁ Σ₂, so a symmetric
eigendecomposition gives the trace without scipy.linalg.sqrtm's complex parts or its failures on
singular products (rank-deficient covariances, N < F); tiny negative eigenvalues from round-off are
clipped to 0.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = [
    "FeatureExtractor",
    "feature_statistics",
    "frechet_distance",
    "fid_from_features",
    "extract_features",
    "fid_record",
]

FeatureExtractor = Callable[[np.ndarray], np.ndarray]
"""Any callable ``images [B, H, W, C] float32 in [−1, 1] -> features [B, F]`` (NumPy or JAX arrays)."""


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix ``[F, F]`` (negative round-off clipped)."""
    eigval, eigvec = np.linalg.eigh(sigma)
    return (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set.

    Args:
      features: ``[N, F]``, N ≥ 2.

    Returns:
      ``(mu [F], sigma [F, F])`` float64; sigma is the unbiased sample covariance (ddof = 1, as in
      pytorch-fid and the TTUR reference code).
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must have shape [N, F], got {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
      mu1, mu2: ``[F]`` means.
      sigma1, sigma2: ``[F, F]`` symmetric positive semi-definite covariances (rank-deficient allowed).

    Returns:
      ‖mu1 − mu2‖² + tr(sigma1) + tr(sigma2) − 2 tr((sigma1 sigma2)^{1/2}) as a float (≥ 0 up to
      round-off; computed in float64).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be [F] vectors of equal length, got {mu1.shape} and {mu2.shape}")
    f = mu1.shape[0]
    if s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"covariances must be [F, F] = ({f}, {f}), got {s1.shape} and {s2.shape}")
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} contains NaN or inf")
        if not np.allclose(s, s.T, rtol=1e-5, atol=1e-8 * max(1.0, float(np.abs(s).max()))):
            raise ValueError(f"{name} is not symmetric")
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets ``[N1, F]`` and ``[N2, F]`` (e.g. real vs generated)."""
    mu1, s1 = feature_statistics(features1)
    mu2, s2 = feature_statistics(features2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance(mu1, s1, mu2, s2)


def extract_features(feature_extractor: FeatureExtractor, images, batch_size: int = 256) -> np.ndarray:
    """Runs a feature network over ``images [N, H, W, C]`` in [−1, 1] in batches; returns ``[N, F]`` float64.

    Batches have a fixed size (the last one is padded by repeating its final image and trimmed), so a
    jitted extractor compiles once.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, H, W, C], got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("no images")
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        n = batch.shape[0]
        if n < batch_size and images.shape[0] > batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
        feats = np.asarray(feature_extractor(batch), np.float64)
        if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
            raise ValueError(f"feature extractor must return [B, F], got {feats.shape} for B={batch.shape[0]}")
        out.append(feats[:n])
    return np.concatenate(out)


def fid_record(value: float, *, num_samples: int, sampler: str, steps: int, ema: bool,
               feature_net: str) -> dict:
    """A JSON-ready record of one FID with everything needed to interpret it.

    Args:
      value: the FID.
      num_samples: number of generated samples (FID is biased upwards for small N; 50k is the norm).
      sampler: e.g. "ddpm", "ddim", "ancestral-hmm".
      steps: number of sampling steps.
      ema: whether EMA parameters generated the samples.
      feature_net: e.g. "inception-v3-pytorch-fid-pool3" or "digit-cnn-128 (domain FID, not Inception)".

    Returns:
      ``{"fid", "num_samples", "sampler", "steps", "ema", "feature_net"}``.
    """
    if int(num_samples) != num_samples or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2, got {num_samples}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not sampler or not feature_net:
        raise ValueError("sampler and feature_net must be non-empty strings")
    return {
        "fid": float(value),
        "num_samples": int(num_samples),
        "sampler": str(sampler),
        "steps": int(steps),
        "ema": bool(ema),
        "feature_net": str(feature_net),
    }
