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
taken when the best gain is positive and exceeds the smallest loss, by a margin the frames make
significant: the net gain is a sum of per-frame differences in log-density, and it must be ``min_z``
standard errors above zero (a paired z-test over the frames of the three states involved). A small gain
beside a large loss is noise of the proxy, and such moves undid good states (RESULTS.md, stops 26–27).
Each state's likelihood includes the
complete-data term n_k log(n_k / N) of its weight, without which splitting even one round cluster in
two would gain (its halves would each be scored as if they held all its frames). A dead state (no
frames) merges at no loss, so the move also revives dead states.

Which pair to merge is better asked of the diffusion model than of the proxy: two states that share one
digit score its frames alike, while a pixel-space Gaussian may find two different but similar digits
cheaper to merge. Given the frames' emission scores, :func:`swap_costs` ranks the pairs and the proxy only
decides whether the move gains.

Both are held-out (two-fold) log-likelihoods: the Gaussians and the 2-means split are fitted on one half
of the frames and scored on the other, then the halves swap. In-sample, any split gains and any merge
loses (more parameters always fit better), so a state with two styles of one digit and a pair sharing
one digit look alike and the move flips back and forth between them; held out, a split gains only where
the state really is two clusters, and a merge of one cluster's two halves costs nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

__all__ = ["MIN_Z", "SplitMerge", "paired_z", "gaussian_log_densities", "gaussian_log_likelihood", "heldout_log_densities",
           "heldout_log_likelihood", "split_merge_move", "swap_costs"]

MIN_FRAMES = 8  # a state with fewer frames is not split (2-means halves too small for a covariance)
MIN_Z = 2.0  # a move's net gain must be this many standard errors above 0 (one-sided, about 2 %)


class SplitMerge(NamedTuple):
    """A proposed split–merge move and the log-likelihoods (nats, summed over frames) behind it.

    Attributes:
      split: the state split in two; its first half keeps the index.
      merge: ``(i, j)``: state j's frames join state i; j then takes the second half of ``split``.
      gain: held-out log-likelihood gain of the split (> 0).
      loss: held-out log-likelihood lost by the merge (negative when the merged state fits better).
      z: the net gain ``gain − loss`` in standard errors of its per-frame differences.
      states: ``[N]`` the assignment after the move.
    """

    split: int
    merge: tuple[int, int]
    gain: float
    loss: float
    z: float
    states: np.ndarray

    @property
    def net_per_frame(self) -> float:
        return (self.gain - self.loss) / max(len(self.states), 1)


def gaussian_log_densities(x: np.ndarray, ridge: float, fit: np.ndarray | None = None) -> np.ndarray:
    """``[n]`` log N(x_i; μ̂, Σ̂ + ridge·I) of frames ``x [n, d]`` under the ML mean and covariance of ``fit``
    (default: of ``x`` itself). An empty ``fit`` scores −inf (nothing to fit)."""
    n, d = x.shape
    fit = x if fit is None else fit
    if n == 0 or len(fit) == 0:
        return np.full(n, -np.inf)
    mean = fit.mean(0)
    cov = (fit - mean).T @ (fit - mean) / len(fit) + ridge * np.eye(d)
    centred = x - mean
    sign, logdet = np.linalg.slogdet(cov)
    mahalanobis = np.sum(centred * np.linalg.solve(cov, centred.T).T, axis=1)
    return -0.5 * (logdet + mahalanobis + d * np.log(2 * np.pi))


def gaussian_log_likelihood(x: np.ndarray, ridge: float, fit: np.ndarray | None = None) -> float:
    """Σ_i of :func:`gaussian_log_densities`; an empty ``x`` scores 0."""
    return float(gaussian_log_densities(x, ridge, fit).sum()) if len(x) else 0.0


def heldout_log_densities(z: np.ndarray, group: np.ndarray, fold: np.ndarray, ridge: float) -> np.ndarray:
    """``[len(group)]`` two-fold held-out log-densities of the frames ``z[group]`` under one Gaussian: each
    fold's frames scored under the fit on the group's other fold."""
    out = np.empty(len(group))
    for f in (0, 1):
        scored = fold[group] == f
        out[scored] = gaussian_log_densities(z[group[scored]], ridge, fit=z[group[~scored]])
    return out


def heldout_log_likelihood(z: np.ndarray, groups: list[np.ndarray], fold: np.ndarray, ridge: float) -> float:
    """Two-fold held-out log-likelihood of the frames ``z [N, d]`` partitioned into ``groups`` (index arrays),
    one Gaussian per group (the sum of :func:`heldout_log_densities`)."""
    return float(sum(heldout_log_densities(z, g, fold, ridge).sum() for g in groups))


def swap_costs(log_emissions: np.ndarray, states: np.ndarray, num_classes: int) -> np.ndarray:
    """``[K, K]`` how much the model itself tells states i and j apart: the mean over their frames of the
    score a frame loses when it is scored by the other state of the pair,

        c_ij = (Σ_{y∈i} (log b_i(y) − log b_j(y)) + Σ_{y∈j} (log b_j(y) − log b_i(y))) / (n_i + n_j),

    from the frames' emissions ``log_emissions [F, K]`` and ``states [F]``. Two states that share one cluster
    score its frames alike (c_ij ≈ 0); two that hold different clusters do not. ``inf`` on the diagonal.
    """
    log_b = np.asarray(log_emissions, np.float64).reshape(-1, num_classes)
    states = np.asarray(states).reshape(-1)
    one_hot = np.eye(num_classes)[states]  # [F, K]
    # S[i, j] = Σ_{y∈i} (log b_i(y) − log b_j(y))
    own = (one_hot * log_b).sum(1)  # log b_{state(y)}(y)
    sums = one_hot.T @ (own[:, None] - log_b)
    counts = one_hot.sum(0)
    total = counts[:, None] + counts[None, :]
    costs = (sums + sums.T) / np.maximum(total, 1.0)
    np.fill_diagonal(costs, np.inf)
    return costs


def split_merge_move(frames: np.ndarray, states: np.ndarray, num_classes: int, *, pca_dims: int = 10,
                     ridge: float = 1e-2, seed: int = 0, merge_costs: np.ndarray | None = None,
                     min_z: float = MIN_Z) -> SplitMerge | None:
    """The best split–merge move of the assignment ``states`` of ``frames``, or None when none gains.

    Args:
      frames: ``[N, *event]`` the (valid) frames.
      states: ``[N]`` int their states in 0..K−1.
      num_classes: K (≥ 3: a split and a merge of two other states).
      pca_dims: dimension of the PCA space of the Gaussian proxy (clipped to the data).
      ridge: added to the diagonal of every covariance, relative to the mean per-dimension variance.
      seed: of PCA, the folds and 2-means.
      merge_costs: ``[K, K]`` (e.g. :func:`swap_costs` of the model's emissions): when given, the pair
        merged is the one of lowest cost (the model's own choice of two states that share a cluster), and
        the proxy only decides whether the move gains; otherwise the pair of lowest proxy loss.
      min_z: the least net gain, in standard errors, of a move that is taken.

    Returns:
      A :class:`SplitMerge` with ``gain > max(loss, 0)`` in held-out log-likelihood and ``z >= min_z``
      (the most gainful split, the cheapest merge of two other states), or None. ``states`` of the move split the whole
      state by the 2-means centres of its full fit.
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
    fold = np.random.default_rng(seed).permutation(len(z)) % 2
    members = [np.flatnonzero(states == k) for k in range(num_classes)]

    def prior(n: int) -> float:  # a frame's complete-data term log(n / N) of its state's weight n
        return np.log(n / len(z))

    # every frame's held-out log-density under its state, before and after the move: the move's net gain is
    # their summed difference, and its noise their spread (a paired test over the frames involved)
    own = [heldout_log_densities(z, m, fold, r) + prior(max(len(m), 1)) for m in members]

    halves, split_densities, gains = {}, {}, np.full(num_classes, -np.inf)
    for k, m in enumerate(members):
        if len(m) < 4 * MIN_FRAMES:  # each half of each fold needs frames for a covariance
            continue
        # 2-means fitted on each fold assigns the other fold's frames: the split is held out too
        split_groups = []
        for f in (0, 1):
            fit, score = m[fold[m] != f], m[fold[m] == f]
            km = KMeans(2, n_init=3, random_state=seed).fit(z[fit])
            for h in (0, 1):
                split_groups.append((fit[km.labels_ == h], score[km.predict(z[score]) == h]))
        if min(min(len(a), len(b)) for a, b in split_groups) < MIN_FRAMES // 2:
            continue
        halves[k] = KMeans(2, n_init=3, random_state=seed).fit_predict(z[m])
        position = np.empty(len(z), int)
        position[m] = np.arange(len(m))
        after = np.empty(len(m))
        for a, b in split_groups:
            after[position[b]] = gaussian_log_densities(z[b], r, fit=z[a])
        after += prior(1) + np.log(np.bincount(halves[k], minlength=2)[halves[k]])
        split_densities[k] = after
        gains[k] = float(after.sum() - own[k].sum())
    if not halves:
        return None
    split = int(np.argmax(gains))
    if merge_costs is not None:
        merge_costs = np.asarray(merge_costs, np.float64)
        if merge_costs.shape != (num_classes, num_classes):
            raise ValueError(f"merge_costs must be [K, K] = [{num_classes}, {num_classes}], got {merge_costs.shape}")

    def merged_densities(i: int, j: int) -> np.ndarray:  # the union's frames, in the order of members i then j
        union = np.concatenate([members[i], members[j]])
        return heldout_log_densities(z, union, fold, r) + prior(max(len(union), 1))

    def merge_loss(i: int, j: int) -> float:
        return float(own[i].sum() + own[j].sum() - merged_densities(i, j).sum())

    pairs = [(i, j) for i in range(num_classes) for j in range(i + 1, num_classes) if split not in (i, j)]
    if not pairs:
        return None
    # the model's costs rank the pairs without a fit; otherwise each pair's proxy loss is its rank
    ranks = [merge_loss(i, j) if merge_costs is None else merge_costs[i, j] for i, j in pairs]
    i, j = pairs[int(np.argmin(ranks))]
    best_loss = merge_loss(i, j)
    differences = np.concatenate([split_densities[split] - own[split],
                                  merged_densities(i, j) - np.concatenate([own[i], own[j]])])
    z_score = paired_z(differences)
    if not (gains[split] > max(best_loss, 0.0) and z_score >= min_z):
        return None
    keep, free = (i, j) if len(members[i]) >= len(members[j]) else (j, i)
    moved = states.copy()
    moved[members[free]] = keep
    second = members[split][halves[split] != halves[split][0]]  # the half without the state's first frame
    moved[second] = free
    return SplitMerge(split, (keep, free), float(gains[split]), best_loss, z_score, moved.astype(np.int32))


def paired_z(differences: np.ndarray) -> float:
    """The net gain Σ d over its standard error √n·sd(d) (the d as independent draws); ±inf without spread
    (−inf for a tie: no gain is no evidence)."""
    n, total = len(differences), float(differences.sum())
    spread = float(np.std(differences, ddof=1)) * np.sqrt(n) if n > 1 else 0.0
    if spread == 0.0:
        return np.inf if total > 0 else -np.inf
    return total / spread
