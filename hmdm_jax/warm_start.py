"""Warm starts for the class assignment: k-means on the frames, used as clamped labels for a few hundred
steps before EM runs free (measured: EM from a random start leaves dead or merged classes)."""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA


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
        Basu et al., 2002), so cluster k starts at label k. Measured on the 8×8 digits with 10 % labels:
        0.86–0.87 on the unlabelled frames, against 0.79 for unseeded k-means. Otherwise it is ignored.

    Returns:
      ``[N]`` int32 cluster indices in 0..K−1.
    """
    x = np.asarray(frames, np.float64).reshape(len(frames), -1)
    if len(x) < num_classes:
        raise ValueError(f"k-means needs at least K = {num_classes} frames, got {len(x)}")
    if pca_dims is not None and pca_dims < x.shape[1]:
        x = PCA(n_components=min(pca_dims, len(x)), random_state=seed).fit_transform(x)
    if seed_labels is not None:
        seed_labels = np.asarray(seed_labels).reshape(-1)
        if seed_labels.shape != (len(x),):
            raise ValueError(f"seed_labels must have one entry per frame ({len(x)}), got shape {seed_labels.shape}")
        if all((seed_labels == k).any() for k in range(num_classes)):
            means = np.stack([x[seed_labels == k].mean(0) for k in range(num_classes)])
            return KMeans(num_classes, init=means, n_init=1, random_state=seed).fit_predict(x).astype(np.int32)
    return KMeans(num_classes, n_init=10, random_state=seed).fit_predict(x).astype(np.int32)
