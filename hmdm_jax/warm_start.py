"""Warm starts for the class assignment: k-means on the frames, used as clamped labels for a few hundred
steps before EM runs free (measured: EM from a random start leaves dead or merged classes)."""
from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA


def kmeans_labels(frames: np.ndarray, num_classes: int, seed: int = 0, pca_dims: int | None = 50) -> np.ndarray:
    """k-means cluster indices of frames, a label-free warm start.

    Args:
      frames: ``[N, *event]`` frames (any shape; flattened).
      num_classes: K, the number of clusters.
      pca_dims: project onto this many principal components first (None: raw pixels); PCA removes
        pixel noise that otherwise dominates distances in 784 or 3072 dimensions.

    Returns:
      ``[N]`` int32 cluster indices in 0..K−1.
    """
    x = np.asarray(frames, np.float64).reshape(len(frames), -1)
    if len(x) < num_classes:
        raise ValueError(f"k-means needs at least K = {num_classes} frames, got {len(x)}")
    if pca_dims is not None and pca_dims < x.shape[1]:
        x = PCA(n_components=min(pca_dims, len(x)), random_state=seed).fit_transform(x)
    return KMeans(num_classes, n_init=10, random_state=seed).fit_predict(x).astype(np.int32)
