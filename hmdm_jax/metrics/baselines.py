"""Classical baselines on the same frames and splits as the diffusion models: k-means, a Gaussian
mixture, and a Gaussian HMM (:mod:`hmdm_jax.gaussian_hmm`).

All three work on PCA-reduced frames: each frame ``[*frame]`` (e.g. ``[H, W, C]``) is flattened and
projected on principal components fitted on the *training* frames only (valid frames only for
sequences). Choices, made to be fair and honest rather than tuned on test labels:

* k-means (k-means++, ``n_init=10``) on PCA-50: the projection keeps the Euclidean geometry that
  k-means uses almost unchanged (MNIST: 50 components carry ~83% of the variance) and is much faster
  than raw pixels.
* GMM: full covariances on PCA-50 with ``reg_covar=1e-2`` (data variance per retained component is
  O(1) for images in [−1, 1]) and k-means initialisation. Full covariances on raw pixels are
  degenerate (constant border pixels) and diagonal covariances ignore the pixel correlations
  that make a digit class; a low-dimensional full-covariance model is the standard compromise.
* Gaussian HMM: :func:`hmdm_jax.gaussian_hmm.fit_gaussian_hmm`, the tuning a competent user does
  without labels. Emissions are full-covariance Gaussians in ``d`` PCA coordinates times an
  isotropic Gaussian on the discarded residual, a density on the whole frame space, so the
  held-out likelihood of different ``d`` is comparable: ``d`` is chosen among candidates (default
  5, 10, 20, 30, 50) by the log-likelihood of held-out *training* sequences, then the model is
  refitted on all training sequences from several k-means initialisations (Baum–Welch) and the
  restart with the highest training likelihood is kept; Viterbi decodes the test sequences.
  Dirichlet pseudo-counts on the initial distribution and transition rows keep every row a
  distribution even for a state never visited or never left. The result reports the chosen
  ``pca_dim``, the held-out ``dim_scores`` and the ``restart_scores``, so the choices can be audited.

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
  classes with no state), and its fit diagnostics (see :func:`gaussian_hmm_baseline`).

Labels use ``-1`` for unknown/padding and are ignored in scoring.
"""
from __future__ import annotations

import time
import warnings
from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

from hmdm_jax.gaussian_hmm import DEFAULT_PCA_DIMS, decode, fit_gaussian_hmm, log_likelihood
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


def _sequence_labels(labels, mask: np.ndarray, name: str) -> np.ndarray:
    """Labels ``[N, n]`` of the valid frames, flattened to ``[M]``."""
    y = np.asarray(labels).astype(np.int64)
    if y.shape != mask.shape:
        raise ValueError(f"{name} {y.shape} must have the mask's shape {mask.shape}")
    return y[mask]


def gaussian_hmm_baseline(train_sequences, train_mask, test_sequences, test_mask, test_labels, K: int,
                          seed: int = 0, train_labels=None,
                          pca_dim: int | Sequence[int] | None = DEFAULT_PCA_DIMS,
                          covariance_type: str = "full", n_iter: int = 100, tol: float = 1e-4,
                          pseudocount: float = 1e-2, reg_covar: float = 1e-3, num_restarts: int = 3,
                          heldout_fraction: float = 0.2) -> dict:
    """Gaussian HMM (:func:`hmdm_jax.gaussian_hmm.fit_gaussian_hmm`): Baum–Welch on train, Viterbi on test.

    Args:
      train_sequences: ``[N, n, *frame]``; train_mask: ``[N, n]`` bool (True = valid, padding at the end).
      test_sequences: ``[N', n', *frame]``; test_mask: ``[N', n']`` bool.
      test_labels: ``[N', n']`` int (``-1`` = unknown/padding).
      K: number of hidden states. seed: random seed (held-out split and k-means initialisations).
      train_labels: optional ``[N, n]`` int for the train-matched accuracy (never used for fitting).
      pca_dim: candidate PCA dimensions, chosen by held-out likelihood on the training sequences;
        an int fixes ``d``; None = raw features (no PCA).
      covariance_type: "full" or "diag" (in PCA coordinates).
      n_iter, tol: maximum EM iterations and tolerance on the training log-likelihood per frame.
      pseudocount: Dirichlet pseudo-count added to every transition row and to the initial distribution.
      reg_covar: ridge on covariance diagonals, relative to the average per-dimension data variance.
      num_restarts: k-means-initialised EM restarts; the one with the highest training likelihood is kept.
      heldout_fraction: share of the training sequences held out to choose ``pca_dim``.

    Returns:
      the result dict of the module docstring (``method="gaussian_hmm"``) with ``transmat`` ``[K, K]``,
      ``startprob`` ``[K]``, ``transmat_matched``, ``converged``, ``n_iter_run``, the chosen
      ``pca_dim`` (None for raw features), ``candidate_dims``, ``dim_scores`` (``{str(d): held-out
      log-likelihood per frame}``, empty without a choice), ``restart_scores`` and ``best_restart``,
      ``train_log_likelihood_per_frame`` and ``test_log_likelihood_per_frame`` (full-space nats per
      valid frame, comparable across ``pca_dim``), ``explained_variance_ratio``.
    """
    start = time.perf_counter()
    train_m = np.asarray(train_mask)
    test_m = np.asarray(test_mask)
    fit = fit_gaussian_hmm(train_sequences, train_m, K, pca_dims=pca_dim, num_restarts=num_restarts,
                           num_iters=n_iter, tol=tol, heldout_fraction=heldout_fraction,
                           covariance_type=covariance_type, reg_covar=reg_covar, pseudocount=pseudocount,
                           seed=seed)
    train_pred = decode(fit.model, train_sequences, train_m)[train_m]
    test_pred = decode(fit.model, test_sequences, test_m)[test_m]
    wall = time.perf_counter() - start
    test_ll = float(np.sum(log_likelihood(fit.model, test_sequences, test_m)) / test_m.sum())
    test_y = _sequence_labels(test_labels, test_m, "test_labels")
    train_y = None if train_labels is None else _sequence_labels(train_labels, train_m, "train_labels")

    num_classes = _num_classes(train_y, test_y)
    transmat, startprob = np.exp(fit.model.log_A), np.exp(fit.model.log_pi)
    result = {"method": "gaussian_hmm", "num_states": K, "pca_dim": None if pca_dim is None else fit.pca_dim,
              "seed": seed, "covariance_type": covariance_type, "pseudocount": pseudocount,
              "reg_covar": reg_covar, "num_restarts": num_restarts,
              "candidate_dims": None if pca_dim is None else list(fit.candidate_dims),
              "dim_scores": {str(d): v for d, v in fit.dim_scores.items()},
              "restart_scores": list(fit.restart_scores), "best_restart": fit.best_restart,
              "train_log_likelihood_per_frame": fit.log_likelihood_per_frame,
              "test_log_likelihood_per_frame": test_ll,
              "explained_variance_ratio": fit.explained_variance_ratio,
              "converged": bool(fit.converged), "n_iter_run": int(fit.num_iters_run)}
    _scores(result, train_y, train_pred, test_y, test_pred, K, num_classes)
    result["transmat"] = transmat.tolist()
    result["startprob"] = startprob.tolist()
    result["transmat_matched"] = matched_transition_matrix(transmat, result["mapping"], num_classes).tolist()
    result["wall_time_s"] = wall
    return result
