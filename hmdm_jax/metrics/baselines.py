"""Classical baselines on the same frames and splits as the diffusion models: k-means, a Gaussian
mixture, and a Gaussian HMM (hmmlearn).

All three work on PCA-reduced frames: each frame ``[*frame]`` (e.g. ``[H, W, C]``) is flattened and
projected on the top ``pca_dim`` principal components fitted on the *training* frames only (valid
frames only for sequences). Choices, made to be fair and honest rather than tuned on test labels:

* k-means (k-means++, ``n_init=10``) on PCA-50: the projection keeps the Euclidean geometry that
  k-means uses almost unchanged (MNIST: 50 components carry ~83% of the variance) and is much faster
  than raw pixels.
* GMM: full covariances on PCA-50 with ``reg_covar=1e-2`` (data variance per retained component is
  O(1) for images in [−1, 1]) and k-means initialisation. Full covariances on raw pixels are
  degenerate (constant border pixels) and diagonal covariances ignore the pixel correlations
  that make a digit class; a low-dimensional full-covariance model is the standard compromise.
* Gaussian HMM: the same emission model (full covariance, PCA-50) with a learned transition matrix,
  fitted by EM (Baum–Welch; means and covariances initialised from k-means with 10 restarts)
  on the training sequences with their lengths and decoded by Viterbi on the held-out sequences. Dirichlet pseudo-counts on the transition rows and initial distribution
  (``transmat_prior = startprob_prior = 1 + pseudocount``) keep every row of ``transmat_`` a
  distribution even when a state is never visited — the cause of hmmlearn's "rows of transmat_
  must sum to 1" failure.

Every baseline returns a JSON-ready dict:

* ``accuracy``: Hungarian-matched accuracy on the test split (matching learned on the test split);
* ``accuracy_train_matching``: test accuracy with the matching learned on the training split (None
  when no training labels were given), the number comparable with a deployed classifier;
* ``train_accuracy``: Hungarian-matched accuracy on the training split (None without train labels);
* ``ari``, ``nmi``: on the test split; ``class_usage``: ``[K]`` fraction of test frames per state;
* ``mapping``: ``[K]`` state → class learned on the test split; ``wall_time_s``: fit + predict time;
* ``method``, ``num_states``, ``pca_dim``, ``seed`` and method-specific settings; the HMM adds
  ``transmat`` ``[K, K]`` and ``startprob`` ``[K]`` in state order, plus ``transmat_matched``: the
  transition matrix reordered into class order with the test matching (NaN rows/columns for
  classes with no state).

Labels use ``-1`` for unknown/padding and are ignored in scoring.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from hmdm_jax.matching import (accuracy_with_mapping, class_usage,
                                       clustering_scores, matched_accuracy)

__all__ = ["kmeans_baseline", "gmm_baseline", "gaussian_hmm_baseline", "matched_transition_matrix"]


def _flatten_frames(frames, name: str) -> np.ndarray:
    x = np.asarray(frames, np.float64)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, *frame] with N > 0, got {x.shape}")
    x = x.reshape(x.shape[0], -1)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contain NaN or inf")
    return x


def _labels(labels, n: int, name: str) -> np.ndarray | None:
    if labels is None:
        return None
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries for {n} frames")
    return y


def _fit_pca(train_x: np.ndarray, pca_dim: int | None, seed: int):
    if pca_dim is None:
        return None
    dim = int(min(pca_dim, train_x.shape[0], train_x.shape[1]))
    return PCA(n_components=dim, random_state=seed).fit(train_x)


def _project(pca, x):
    return x if pca is None else pca.transform(x)


def _scores(result: dict, train_true, train_pred, test_true, test_pred, num_states: int,
            num_classes: int) -> dict:
    """Adds the common accuracy/clustering entries to ``result``."""
    acc, mapping = matched_accuracy(test_true, test_pred, num_classes, num_states)
    result["accuracy"] = acc
    result["mapping"] = mapping.tolist()
    if train_true is not None:
        train_acc, train_mapping = matched_accuracy(train_true, train_pred, num_classes, num_states)
        result["train_accuracy"] = train_acc
        result["accuracy_train_matching"] = accuracy_with_mapping(test_true, test_pred, train_mapping)
        result["mapping_train"] = train_mapping.tolist()
    else:
        result["train_accuracy"] = None
        result["accuracy_train_matching"] = None
    result.update(clustering_scores(test_true, test_pred))
    result["class_usage"] = class_usage(test_pred, num_states).tolist()
    return result


def _num_classes(*label_arrays) -> int:
    present = [int(y.max()) for y in label_arrays if y is not None and y.size and y.max() >= 0]
    if not present:
        raise ValueError("no labelled test entries to score")
    return max(present) + 1


def kmeans_baseline(train_frames, train_labels, test_frames, test_labels, K: int, seed: int = 0,
                    pca_dim: int | None = 50, n_init: int = 10) -> dict:
    """k-means on PCA-reduced frames, fitted on train, scored on test.

    Args:
      train_frames: ``[N_train, *frame]`` (images in [−1, 1] or vectors).
      train_labels: ``[N_train]`` int (``-1`` = unknown) or None (then no train-matched accuracy).
      test_frames: ``[N_test, *frame]``; test_labels: ``[N_test]`` int.
      K: number of clusters. seed: random seed. pca_dim: PCA components (None = raw features).
      n_init: k-means restarts.

    Returns:
      the result dict described in the module docstring (``method="kmeans"``).
    """
    start = time.perf_counter()
    train_x, test_x = _flatten_frames(train_frames, "train_frames"), _flatten_frames(test_frames, "test_frames")
    train_y = _labels(train_labels, train_x.shape[0], "train_labels")
    test_y = _labels(test_labels, test_x.shape[0], "test_labels")
    pca = _fit_pca(train_x, pca_dim, seed)
    km = KMeans(n_clusters=K, n_init=n_init, random_state=seed).fit(_project(pca, train_x))
    train_pred = km.labels_
    test_pred = km.predict(_project(pca, test_x))
    wall = time.perf_counter() - start
    result = {"method": "kmeans", "num_states": K, "pca_dim": None if pca is None else pca.n_components_,
              "seed": seed, "n_init": n_init}
    _scores(result, train_y, train_pred, test_y, test_pred, K, _num_classes(train_y, test_y))
    result["wall_time_s"] = wall
    return result


def gmm_baseline(train_frames, train_labels, test_frames, test_labels, K: int, seed: int = 0,
                 pca_dim: int | None = 50, covariance_type: str = "full", reg_covar: float = 1e-2,
                 n_init: int = 1, max_iter: int = 200) -> dict:
    """Gaussian mixture (sklearn) on PCA-reduced frames, fitted on train, scored on test.

    Args: as :func:`kmeans_baseline`, plus ``covariance_type`` ("full", "diag", "tied", "spherical"),
    ``reg_covar`` (added to covariance diagonals), ``n_init`` EM restarts and ``max_iter``.

    Returns:
      the result dict described in the module docstring (``method="gmm"``), plus ``converged`` and
      ``test_log_likelihood_per_frame`` (nats in PCA space; not comparable with image NLLs).
    """
    start = time.perf_counter()
    train_x, test_x = _flatten_frames(train_frames, "train_frames"), _flatten_frames(test_frames, "test_frames")
    train_y = _labels(train_labels, train_x.shape[0], "train_labels")
    test_y = _labels(test_labels, test_x.shape[0], "test_labels")
    pca = _fit_pca(train_x, pca_dim, seed)
    train_p, test_p = _project(pca, train_x), _project(pca, test_x)
    gmm = GaussianMixture(n_components=K, covariance_type=covariance_type, reg_covar=reg_covar,
                          n_init=n_init, max_iter=max_iter, init_params="k-means++", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # non-convergence is reported below
        gmm.fit(train_p)
    train_pred = gmm.predict(train_p)
    test_pred = gmm.predict(test_p)
    wall = time.perf_counter() - start
    result = {"method": "gmm", "num_states": K, "pca_dim": None if pca is None else pca.n_components_,
              "seed": seed, "covariance_type": covariance_type, "reg_covar": reg_covar,
              "converged": bool(gmm.converged_), "test_log_likelihood_per_frame": float(gmm.score(test_p))}
    _scores(result, train_y, train_pred, test_y, test_pred, K, _num_classes(train_y, test_y))
    result["wall_time_s"] = wall
    return result


def _valid_frames(sequences, mask, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (frames of valid positions [M, D], lengths [N], mask [N, n]) checking padding-at-end."""
    seq = np.asarray(sequences, np.float64)
    m = np.asarray(mask)
    if seq.ndim < 3:
        raise ValueError(f"{name} must have shape [N, n, *frame], got {seq.shape}")
    if m.dtype != bool or m.shape != seq.shape[:2]:
        raise ValueError(f"{name} mask must be boolean with shape {seq.shape[:2]}, got {m.dtype} {m.shape}")
    lengths = m.sum(axis=1)
    if np.any(m != (np.arange(m.shape[1])[None, :] < lengths[:, None])):
        raise ValueError(f"{name} mask must mark a prefix of each sequence (padding only at the end)")
    keep = lengths > 0
    frames = seq.reshape(seq.shape[0], seq.shape[1], -1)[m]
    if not np.all(np.isfinite(frames)):
        raise ValueError(f"{name} contain NaN or inf")
    return frames, lengths[keep], m


def matched_transition_matrix(transmat, mapping, num_classes: int) -> np.ndarray:
    """Reorders a learned state transition matrix into class order using a state→class matching.

    Args:
      transmat: ``[K, K]`` over states. mapping: ``[K]`` state → class (``-1`` = none).
      num_classes: K_true.

    Returns:
      ``[K_true, K_true]`` with entry (c, c') = transmat[s(c), s(c')] for the states matched to c and
      c'; rows/columns of classes without a state are NaN. (With K_pred > K_true, mass moving to
      unmatched states is not shown, so rows may sum to less than 1.)
    """
    transmat = np.asarray(transmat, np.float64)
    mapping = np.asarray(mapping, np.int64)
    state_of = np.full(num_classes, -1)
    for s, c in enumerate(mapping):
        if c >= 0:
            state_of[c] = s
    out = np.full((num_classes, num_classes), np.nan)
    have = state_of >= 0
    out[np.ix_(have, have)] = transmat[np.ix_(state_of[have], state_of[have])]
    return out


def _kmeans_emission_init(x: np.ndarray, num_states: int, seed: int, covariance_type: str,
                          min_covar: float) -> tuple[np.ndarray, np.ndarray]:
    """Means ``[K, D]`` and covariances in hmmlearn's internal layout for ``covariance_type``."""
    km = KMeans(n_clusters=num_states, n_init=10, random_state=seed).fit(x)
    dim = x.shape[1]
    global_cov = np.atleast_2d(np.cov(x, rowvar=False))
    covs = np.empty((num_states, dim, dim))
    for k in range(num_states):
        members = x[km.labels_ == k]
        cov = np.atleast_2d(np.cov(members, rowvar=False)) if members.shape[0] > dim else global_cov
        covs[k] = cov + min_covar * np.eye(dim)
    if covariance_type == "full":
        return km.cluster_centers_, covs
    if covariance_type == "diag":
        return km.cluster_centers_, np.diagonal(covs, axis1=1, axis2=2).copy()
    if covariance_type == "spherical":
        return km.cluster_centers_, np.trace(covs, axis1=1, axis2=2) / dim
    if covariance_type == "tied":
        weights = np.bincount(km.labels_, minlength=num_states) / x.shape[0]
        return km.cluster_centers_, np.einsum("k,kij->ij", weights, covs)
    raise ValueError(f"covariance_type must be full, diag, spherical or tied, got {covariance_type!r}")


def gaussian_hmm_baseline(train_sequences, train_mask, test_sequences, test_mask, test_labels, K: int,
                          seed: int = 0, train_labels=None, pca_dim: int | None = 50,
                          covariance_type: str = "full", n_iter: int = 50, tol: float = 1e-2,
                          pseudocount: float = 1e-2, min_covar: float = 1e-2) -> dict:
    """Gaussian HMM (hmmlearn) on PCA-reduced frames: Baum–Welch on train, Viterbi on test.

    Args:
      train_sequences: ``[N, n, *frame]``; train_mask: ``[N, n]`` bool (True = valid, padding at the end).
      test_sequences: ``[N', n', *frame]``; test_mask: ``[N', n']`` bool.
      test_labels: ``[N', n']`` int (``-1`` = unknown/padding).
      K: number of hidden states. seed: random seed (PCA and hmmlearn's k-means initialisation).
      train_labels: optional ``[N, n]`` int for the train-matched accuracy.
      pca_dim: PCA components fitted on the valid training frames (None = raw features).
      covariance_type: hmmlearn covariance type ("full", "diag", "spherical", "tied").
      n_iter, tol: EM iterations and log-likelihood tolerance.
      pseudocount: Dirichlet pseudo-count added to every transition row and to the initial distribution.
      min_covar: floor on covariance diagonals.

    Returns:
      the result dict of the module docstring (``method="gaussian_hmm"``) with ``transmat`` ``[K, K]``,
      ``startprob`` ``[K]``, ``transmat_matched`` and ``converged``.
    """
    from hmmlearn.hmm import GaussianHMM  # optional dependency: imported only when this baseline runs

    if pseudocount <= 0:
        raise ValueError(f"pseudocount must be > 0 to keep transition rows normalisable, got {pseudocount}")
    start = time.perf_counter()
    train_x, train_len, train_m = _valid_frames(train_sequences, train_mask, "train_sequences")
    test_x, test_len, test_m = _valid_frames(test_sequences, test_mask, "test_sequences")
    test_y_full = np.asarray(test_labels).astype(np.int64)
    if test_y_full.shape != test_m.shape:
        raise ValueError(f"test_labels {test_y_full.shape} must have the mask's shape {test_m.shape}")
    train_y = None
    if train_labels is not None:
        train_y_full = np.asarray(train_labels).astype(np.int64)
        if train_y_full.shape != train_m.shape:
            raise ValueError(f"train_labels {train_y_full.shape} must have the mask's shape {train_m.shape}")
        train_y = train_y_full[train_m]
    test_y = test_y_full[test_m]

    pca = _fit_pca(train_x, pca_dim, seed)
    train_p, test_p = _project(pca, train_x), _project(pca, test_x)
    model = GaussianHMM(n_components=K, covariance_type=covariance_type, min_covar=min_covar,
                        startprob_prior=1.0 + pseudocount, transmat_prior=1.0 + pseudocount,
                        n_iter=n_iter, tol=tol, random_state=seed, algorithm="viterbi",
                        implementation="log", init_params="st")
    # Emissions start from a restarted k-means fit (means *and* within-cluster covariances).
    # hmmlearn's default starts every state at the global data covariance, from which EM can slide
    # into a poor optimum where two states alternate over a merged pair of clusters.
    model.means_, model.covars_ = _kmeans_emission_init(train_p, K, seed, covariance_type, min_covar)
    model.fit(train_p, lengths=train_len)
    train_pred = model.predict(train_p, lengths=train_len)
    test_pred = model.predict(test_p, lengths=test_len)
    wall = time.perf_counter() - start

    num_classes = _num_classes(train_y, test_y)
    result = {"method": "gaussian_hmm", "num_states": K, "pca_dim": None if pca is None else pca.n_components_,
              "seed": seed, "covariance_type": covariance_type, "pseudocount": pseudocount,
              "converged": bool(model.monitor_.converged), "n_iter_run": int(model.monitor_.iter)}
    _scores(result, train_y, train_pred, test_y, test_pred, K, num_classes)
    result["transmat"] = model.transmat_.tolist()
    result["startprob"] = model.startprob_.tolist()
    result["transmat_matched"] = matched_transition_matrix(model.transmat_, result["mapping"], num_classes).tolist()
    result["wall_time_s"] = wall
    return result
