"""A label-free split–merge move on a class assignment (Ueda et al., 2000, "SMEM"), for EM that has
settled with two classes sharing one cluster and one class holding two.

EM on a mixture or an HMM only moves the assignment locally: a state that holds two clusters and a pair
of states that share one are a fixed point (the pair switches back and forth, the double state never
splits). The move below proposes the one change EM cannot make: split state ``s`` in two and merge the
pair ``(i, j)`` into ``i``, freeing ``j`` for the second half of ``s``. K stays the same, so the two
partitions have the same number of parameters and their likelihoods compare directly, without a penalty.

The likelihood is a proxy that needs no network: every state's frames are modelled by one full-covariance
Gaussian in a PCA space of the frames (its maximum-likelihood fit, with a small ridge). The split of
``s`` is 2-means on its frames; its gain is the log-likelihood of the two halves minus that of ``s``; the
loss of merging ``(i, j)`` is the log-likelihood of the two states minus that of their union. The move is
taken when the best gain exceeds the smallest loss. A dead state (no frames) merges at no loss, so the
move also revives dead states.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

__all__ = ["SplitMerge", "gaussian_log_likelihood", "split_merge_move"]

MIN_FRAMES = 8  # a state with fewer frames is not split (2-means halves too small for a covariance)


class SplitMerge(NamedTuple):
    """A proposed split–merge move and the log-likelihoods (nats, summed over frames) behind it.

    Attributes:
      split: the state split in two; its first half keeps the index.
      merge: ``(i, j)``: state j's frames join state i; j then takes the second half of ``split``.
      gain: log-likelihood gain of the split (≥ 0).
      loss: log-likelihood lost by the merge (≥ 0 up to the ridge).
      states: ``[N]`` the assignment after the move.
    """

    split: int
    merge: tuple[int, int]
    gain: float
    loss: float
    states: np.ndarray

    @property
    def net_per_frame(self) -> float:
        return (self.gain - self.loss) / max(len(self.states), 1)


def gaussian_log_likelihood(x: np.ndarray, ridge: float) -> float:
    """Σ_i log N(x_i; μ̂, Σ̂ + ridge·I) of frames ``x [n, d]`` under their own ML mean and covariance."""
    n, d = x.shape
    if n == 0:
        return 0.0
    centred = x - x.mean(0)
    scatter = centred.T @ centred / n
    cov = scatter + ridge * np.eye(d)
    sign, logdet = np.linalg.slogdet(cov)
    trace = float(np.trace(np.linalg.solve(cov, scatter)))
    return -0.5 * n * (logdet + trace + d * np.log(2 * np.pi))


def split_merge_move(frames: np.ndarray, states: np.ndarray, num_classes: int, *, pca_dims: int = 10,
                     ridge: float = 1e-2, seed: int = 0) -> SplitMerge | None:
    """The best split–merge move of the assignment ``states`` of ``frames``, or None when none gains.

    Args:
      frames: ``[N, *event]`` the (valid) frames.
      states: ``[N]`` int their states in 0..K−1.
      num_classes: K (≥ 3: a split and a merge of two other states).
      pca_dims: dimension of the PCA space of the Gaussian proxy (clipped to the data).
      ridge: added to the diagonal of every covariance, relative to the mean per-dimension variance.
      seed: of PCA and 2-means.

    Returns:
      A :class:`SplitMerge` with ``gain > loss`` (the most gainful split, the cheapest merge of two other
      states), or None.
    """
    x = np.asarray(frames, np.float64).reshape(len(frames), -1)
    states = np.asarray(states).reshape(-1)
    if states.shape != (len(x),):
        raise ValueError(f"states must have one entry per frame ({len(x)}), got shape {states.shape}")
    if num_classes < 3 or np.any((states < 0) | (states >= num_classes)):
        raise ValueError(f"need K >= 3 and states in 0..K-1 (K = {num_classes})")
    dims = int(min(pca_dims, x.shape[1], max(len(x) - 1, 1)))
    z = PCA(n_components=dims, random_state=seed).fit_transform(x) if dims < x.shape[1] else x - x.mean(0)
    r = ridge * float(np.mean(np.var(z, axis=0)))
    members = [np.flatnonzero(states == k) for k in range(num_classes)]
    own = np.array([gaussian_log_likelihood(z[m], r) for m in members])

    halves, gains = {}, np.full(num_classes, -np.inf)
    for k, m in enumerate(members):
        if len(m) < 2 * MIN_FRAMES:
            continue
        half = KMeans(2, n_init=3, random_state=seed).fit_predict(z[m])
        if min(np.bincount(half, minlength=2)) < MIN_FRAMES:
            continue
        halves[k] = half
        gains[k] = sum(gaussian_log_likelihood(z[m[half == h]], r) for h in (0, 1)) - own[k]
    if not halves:
        return None
    split = int(np.argmax(gains))
    best_loss, merge = np.inf, None
    for i in range(num_classes):
        for j in range(i + 1, num_classes):
            if split in (i, j):
                continue
            union = np.concatenate([members[i], members[j]])
            loss = own[i] + own[j] - gaussian_log_likelihood(z[union], r)
            if loss < best_loss:
                best_loss, merge = loss, (i, j) if len(members[i]) >= len(members[j]) else (j, i)
    if merge is None or not gains[split] > best_loss:
        return None
    keep, free = merge
    moved = states.copy()
    moved[members[free]] = keep
    second = members[split][halves[split] != halves[split][0]]  # the half without the state's first frame
    moved[second] = free
    return SplitMerge(split, (keep, free), float(gains[split]), float(best_loss), moved.astype(np.int32))
