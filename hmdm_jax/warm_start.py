"""Warm starts for the class assignment, used as clamped labels for a few hundred steps before EM runs free
(EM from a random start leaves dead or merged classes): clusters of the frames (k-means, Ward, or a Gaussian
mixture on a UMAP embedding of them), or, for
sequences, the Viterbi path of a Gaussian HMM fitted to them (:mod:`hmdm_jax.gaussian_hmm`), which uses the
chain as the HMDM does, so the diffusion model starts where the classical HMM ends."""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from hmdm_jax import gaussian_hmm

__all__ = [
    "cluster_labels", "describe", "gaussian_hmm_labels", "kmeans_labels", "MAX_WARD_FRAMES", "METHODS", "SEQUENCE_METHODS",
    "umap_labels",
]


METHODS = ("kmeans", "ward", "umap", "ghmm")
SEQUENCE_METHODS = ("ghmm",)  # need sequences [N, n, *event] and their mask, not a set of frames
MAX_WARD_FRAMES = 30_000  # Ward keeps an N × N distance structure: 30k frames ≈ 7 GB


def _features(frames: np.ndarray, num_classes: int, seed: int, pca_dims: int | None) -> np.ndarray:
    """Flattened frames ``[N, D]`` (float64), PCA-projected to ``pca_dims``; at least K frames are needed."""
    if len(frames) < num_classes:
        raise ValueError(f"clustering into K = {num_classes} classes needs at least {num_classes} frames, "
                         f"got {len(frames)}")
    x = np.asarray(frames, np.float64).reshape(len(frames), -1)
    if pca_dims is not None and pca_dims < x.shape[1]:
        x = PCA(n_components=min(pca_dims, len(x)), random_state=seed).fit_transform(x)
    return x


def cluster_labels(frames: np.ndarray, num_classes: int, method: str = "kmeans", seed: int = 0,
                   pca_dims: int | None = 50, seed_labels: np.ndarray | None = None) -> np.ndarray:
    """Cluster indices ``[N]`` int32 in 0..K−1 of ``frames [N, *event]`` by ``method``.

    ``"kmeans"``: :func:`kmeans_labels` (seeded by ``seed_labels`` when possible). ``"umap"``:
    :func:`umap_labels` (likewise seeded). ``"ward"``: Ward's agglomerative clustering on the same PCA
    features, deterministic; ``seed_labels`` are not used (the caller renumbers the clusters). Ward needs
    O(N²) memory: above ``MAX_WARD_FRAMES`` frames it is refused with an error that says so.
    """
    if method == "kmeans":
        return kmeans_labels(frames, num_classes, seed=seed, pca_dims=pca_dims, seed_labels=seed_labels)
    if method == "umap":
        return umap_labels(frames, num_classes, seed=seed, pca_dims=pca_dims, seed_labels=seed_labels)
    if method in SEQUENCE_METHODS:
        raise ValueError(f"warm start {method!r} needs sequences: use gaussian_hmm_labels")
    if method != "ward":
        raise ValueError(f"unknown clustering method {method!r}; expected one of {METHODS}")
    if len(frames) > MAX_WARD_FRAMES:
        raise ValueError(f"Ward clustering of {len(frames)} frames needs O(N²) memory (limit {MAX_WARD_FRAMES} "
                         f"frames): use the k-means warm start for data this large")
    x = _features(frames, num_classes, seed, pca_dims)
    return AgglomerativeClustering(num_classes, linkage="ward").fit_predict(x).astype(np.int32)


def kmeans_labels(frames: np.ndarray, num_classes: int, seed: int = 0, pca_dims: int | None = 50,
                  seed_labels: np.ndarray | None = None) -> np.ndarray:
    """k-means cluster indices of frames, a label-free (or seeded) warm start.

    Args:
      frames: ``[N, *event]`` frames (any shape; flattened).
      num_classes: K, the number of clusters.
      seed: random seed of PCA and k-means.
      pca_dims: project onto this many principal components first (None: raw pixels); PCA removes
        pixel noise that otherwise dominates distances in 784 or 3072 dimensions.
      seed_labels: optional ``[N]`` int labels in 0..K−1, −1 = unknown. When every class has at least one
        labelled frame, k-means starts from the class means of the labelled frames ("seeded k-means",
        Basu et al., 2002), so cluster k starts at label k. Otherwise it is ignored.

    Returns:
      ``[N]`` int32 cluster indices in 0..K−1.
    """
    x = _features(frames, num_classes, seed, pca_dims)
    means = _seeded_means(x, seed_labels, num_classes)
    if means is not None:
        return KMeans(num_classes, init=means, n_init=1, random_state=seed).fit_predict(x).astype(np.int32)
    return KMeans(num_classes, n_init=10, random_state=seed).fit_predict(x).astype(np.int32)


UMAP_DIMS = 10  # the embedding's dimension: enough for K ≤ 10 clusters to separate, few for a full-covariance GMM
UMAP_NEIGHBORS = 15  # umap-learn's default: the local scale of the manifold
GMM_RESTARTS = 3  # the Gaussian mixture on the embedding keeps the best of these by training likelihood


def _seeded_means(x: np.ndarray, seed_labels: np.ndarray | None, num_classes: int) -> np.ndarray | None:
    """``[K, d]`` class means of the labelled rows of ``x`` when every class has one (seeded clustering), else None."""
    if seed_labels is None:
        return None
    seed_labels = np.asarray(seed_labels).reshape(-1)
    if seed_labels.shape != (len(x),):
        raise ValueError(f"seed_labels must have one entry per frame ({len(x)}), got shape {seed_labels.shape}")
    if not all((seed_labels == k).any() for k in range(num_classes)):
        return None
    return np.stack([x[seed_labels == k].mean(0) for k in range(num_classes)])


def umap_labels(frames: np.ndarray, num_classes: int, seed: int = 0, pca_dims: int | None = 50,
                seed_labels: np.ndarray | None = None) -> np.ndarray:
    """Gaussian-mixture clusters of a UMAP embedding of the frames: a label-free start that follows the
    frames' manifold where k-means and Ward cut across it (McInnes et al., 2018; the classical pipeline
    PCA → UMAP → GMM).

    The distinct frames are embedded and clustered once each: sequences reuse images, and exact duplicates
    would make cliques of the nearest-neighbour graph that UMAP then tears apart. The embedding (``UMAP_DIMS``
    dimensions, ``min_dist = 0`` to keep clusters compact) is clustered by a full-covariance Gaussian
    mixture, the best of ``GMM_RESTARTS`` by training likelihood, or started from the class means of
    ``seed_labels`` when every class has one.

    Args:
      frames: ``[N, *event]`` frames (flattened, PCA-projected to ``pca_dims`` first).
      num_classes: K.
      seed: random seed of PCA, UMAP and the mixture.
      seed_labels: optional ``[N]`` labels in 0..K−1, −1 = unknown.

    Returns:
      ``[N]`` int32 cluster indices in 0..K−1.
    """
    import umap  # umap-learn compiles with numba on first use: only this start pays for it

    x = _features(frames, num_classes, seed, pca_dims).astype(np.float32)
    distinct, inverse = np.unique(x, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(distinct) <= max(UMAP_NEIGHBORS, UMAP_DIMS + 1, num_classes):
        raise ValueError(f"the UMAP warm start needs more than {max(UMAP_NEIGHBORS, UMAP_DIMS + 1, num_classes)} "
                         f"distinct frames, got {len(distinct)}: use kmeans")
    with warnings.catch_warnings():  # a fixed random_state makes UMAP single-threaded, and it says so
        warnings.filterwarnings("ignore", message=".*random_state.*", category=UserWarning)
        embedding = umap.UMAP(n_components=UMAP_DIMS, n_neighbors=UMAP_NEIGHBORS, min_dist=0.0,
                              random_state=seed).fit_transform(distinct).astype(np.float64)
    means = _seeded_means(embedding[inverse], seed_labels, num_classes)
    gmm = GaussianMixture(num_classes, covariance_type="full", reg_covar=1e-4, random_state=seed,
                          n_init=GMM_RESTARTS if means is None else 1, means_init=means)
    return gmm.fit(embedding).predict(embedding)[inverse].astype(np.int32)


def gaussian_hmm_labels(sequences: np.ndarray, mask: np.ndarray, num_classes: int, seed: int = 0
                        ) -> tuple[np.ndarray, dict]:
    """The Viterbi states of a Gaussian HMM fitted to the sequences without labels, and what the fit decided.

    The fit is the tuned classical model (:func:`gaussian_hmm.fit_gaussian_hmm` with its defaults: the PCA
    dimension chosen by held-out likelihood on a share of these sequences, restarts chosen by training
    likelihood), so the warm start is as good as the classical HMM on the same data.

    Args:
      sequences: ``[N, n, *event]`` frames; mask: ``[N, n]`` bool valid frames.

    Returns:
      ``([N, n] int32 states in 0..K−1, −1 at padding, record)``: the record is JSON-ready (the chosen PCA
      dimension, the held-out score of every candidate, the restarts' training scores).
    """
    frames = np.asarray(sequences, np.float32)
    frames = frames.reshape(frames.shape[:2] + (-1,))
    fit = gaussian_hmm.fit_gaussian_hmm(frames, np.asarray(mask, bool), num_classes, seed=seed)
    states = gaussian_hmm.decode(fit.model, frames, mask).astype(np.int32)
    record = {"method": "ghmm", "pca_dim": int(fit.pca_dim),
              "dim_scores": {str(d): float(v) for d, v in fit.dim_scores.items()},
              "restart_scores": [float(v) for v in fit.restart_scores], "best_restart": int(fit.best_restart),
              "log_likelihood_per_frame": float(fit.log_likelihood_per_frame)}
    return states, record


def describe(record: dict) -> str:
    """One log line saying what a :func:`gaussian_hmm_labels` fit decided and why (its ``record``)."""
    dims = ", ".join(f"{d}: {v:.2f}" for d, v in record["dim_scores"].items())
    restarts = ", ".join(f"{v:.2f}" for v in record["restart_scores"])
    return (f"warm start: Gaussian HMM on PCA-{record['pca_dim']} (chosen by held-out log-likelihood per frame: "
            f"{dims}), restart {record['best_restart']} of {restarts} (training log-likelihood per frame)")
