"""A Gaussian-emission hidden Markov model fitted by Baum–Welch, with a label-free choice of PCA dimension.

What it is for: the classical baseline a competent user would run on the same sequences as the
diffusion models (and a warm start for them), so it has to be tuned without labels rather than run
once with fixed settings.

About 650 lines on purpose: the model, Baum–Welch, the PCA with its residual density and the two
label-free selections (dimension, restart) are one fit; the inference itself is :mod:`hmdm_jax.hmm`'s.

Model
-----
Frames ``y [D]`` (flattened) are modelled in the full space ``R^D``. A PCA basis fitted on the
training frames, ``components [d, D]`` (orthonormal rows) around ``mean [D]``, splits every frame into
coordinates ``z = components (y − mean) [d]`` and a residual ``r = (y − mean) − components^T z`` in
the ``D − d``-dimensional orthogonal complement. State ``k`` emits

    p(y | x = k) = N(z; means[k], covariances[k]) · N(r; 0, residual_variance · I_{D−d}),

a full- (or diagonal-) covariance Gaussian in the retained coordinates and the probabilistic-PCA
isotropic Gaussian on the residual, whose variance is the mean of the discarded eigenvalues (floored).
The residual factor is the same for every state, so it does not change posteriors or decoding, but
it makes the likelihood a density on ``R^D`` for every ``d``: held-out likelihoods of different
``d`` are comparable, and that is how :func:`fit_gaussian_hmm` chooses ``d`` without labels.
With ``d = D`` there is no residual factor (``residual_variance = 0``).

Conventions follow :mod:`hmdm_jax.hmm`: ``log_A[i, j] = log p(x_{l+1} = j | x_l = i)``, sequences
``[N, n, D]`` (or ``[N, n, *frame]``, flattened) with a mask ``[N, n]`` of valid frames (padding at
the end only; padded frames may hold anything, NaN included). Decoded states are ``−1`` at padding.

Numerics
--------
Everything ``D``-dimensional (PCA, projection, residual norms) is done once per fit in NumPy float64;
EM runs in the ``d``-dimensional coordinates. Emission log-densities and the M-step are float64
NumPy; the E-step (forward–backward, :func:`hmdm_jax.hmm.smooth` / :func:`hmdm_jax.hmm.expected_counts`
vmapped over sequences and jitted) gets each frame's log-densities shifted by their maximum over
states (in float64) before the float32 cast, and the shifts are added back in float64, so the
float32 E-step only handles numbers of the size of the gaps between states.

The M-step is closed form: responsibility-weighted means and covariances plus a ridge
``reg_covar · s`` on the diagonal, ``s`` the average per-dimension variance of the training frames in
the full space (one scale for every ``d``, so the ridge does not favour one ``d``); Dirichlet
pseudo-counts on ``π`` and every row of ``A`` (the MAP estimate under a symmetric Dirichlet
``1 + pseudocount`` prior), so a state never entered or never left still has a valid distribution.
A state with (numerically) no responsibility keeps its previous mean and covariance.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import solve_triangular
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from hmdm_jax import hmm

__all__ = [
    "DEFAULT_PCA_DIMS",
    "GaussianHMM",
    "GaussianHMMFit",
    "fit_gaussian_hmm",
    "log_emissions",
    "log_likelihood",
    "decode",
    "posteriors",
]

# Candidate PCA dimensions tried by default (clipped to what the data allow).
DEFAULT_PCA_DIMS = (5, 10, 20, 30, 50)
_COVARIANCE_TYPES = ("full", "diag")
_LOG_2PI = math.log(2.0 * math.pi)
_EMPTY_STATE = 1e-8  # a state with less total responsibility keeps its previous emission parameters


class GaussianHMM(NamedTuple):
    """A fitted Gaussian HMM (NumPy float64 arrays).

    Attributes:
      mean: ``[D]`` centre of the PCA basis.
      components: ``[d, D]`` orthonormal rows spanning the modelled subspace.
      residual_variance: variance of the isotropic Gaussian on the ``D − d`` residual dimensions
        (0.0 when ``d = D``).
      means: ``[K, d]`` state means in PCA coordinates.
      covariances: ``[K, d, d]`` state covariances in PCA coordinates (diagonal matrices for
        ``covariance_type="diag"``).
      log_pi: ``[K]`` log initial distribution.
      log_A: ``[K, K]``, ``log_A[i, j] = log p(x_{l+1} = j | x_l = i)``.
    """

    mean: np.ndarray
    components: np.ndarray
    residual_variance: float
    means: np.ndarray
    covariances: np.ndarray
    log_pi: np.ndarray
    log_A: np.ndarray


class GaussianHMMFit(NamedTuple):
    """The result of :func:`fit_gaussian_hmm`: the model and what was decided on the way, and why.

    Attributes:
      model: the kept :class:`GaussianHMM`, fitted on all training sequences.
      pca_dim: the chosen ``d``.
      candidate_dims: the candidates actually tried (after clipping to the data), ascending.
      dim_scores: ``{d: held-out log-likelihood per valid frame}`` of the model fitted on the fit
        share with ``d`` components (full-space densities, so comparable across ``d``); empty when
        there was a single candidate and nothing to choose.
      restart_scores: ``[num_restarts]`` training log-likelihood per valid frame of each restart's
        final model on all training sequences.
      best_restart: index of the kept restart (the arg-max of ``restart_scores``).
      log_likelihood_per_frame: training log-likelihood per valid frame of ``model``.
      log_likelihood_trace: ``[iterations + 1]`` per-frame training log-likelihood of the kept
        restart before each M-step and at the end (EM never decreases it beyond rounding).
      converged: whether the kept restart stopped on the tolerance rather than at ``num_iters``.
      num_iters_run: M-steps run by the kept restart.
      explained_variance_ratio: share of the training frames' total variance in the ``d``
        retained components.
      heldout_sequences: indices of the training sequences held out to choose ``d`` (empty when
        there was nothing to choose).
      reg: the absolute ridge added to covariance diagonals (``reg_covar`` times the data scale).
    """

    model: GaussianHMM
    pca_dim: int
    candidate_dims: tuple
    dim_scores: dict
    restart_scores: tuple
    best_restart: int
    log_likelihood_per_frame: float
    log_likelihood_trace: np.ndarray
    converged: bool
    num_iters_run: int
    explained_variance_ratio: float
    heldout_sequences: np.ndarray
    reg: float


# ----------------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------------


def _check_sequences(sequences, mask, name: str = "sequences") -> tuple[np.ndarray, np.ndarray]:
    """Returns (float64 [N, n, D] with padded frames zeroed, bool mask [N, n]) or raises ValueError."""
    x = np.asarray(sequences)
    if x.ndim < 3:
        raise ValueError(f"{name} must have shape [N, n, D] (or [N, n, *frame]), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {x.shape} (need N >= 1 sequences of n >= 1 frames)")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    x = x.reshape(x.shape[0], x.shape[1], -1).astype(np.float64)
    if x.shape[2] == 0:
        raise ValueError(f"{name} frames are empty (D = 0), shape {np.shape(sequences)}")
    if mask is None:
        m = np.ones(x.shape[:2], bool)
    else:
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            raise ValueError(f"mask must be a bool array (True = valid frame), got dtype {m.dtype}")
        if m.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape [N, n] = {list(x.shape[:2])} to match {name}, got {m.shape}")
    lengths = m.sum(axis=1)
    if np.any(m != (np.arange(m.shape[1])[None, :] < lengths[:, None])):
        raise ValueError("mask must mark a prefix of each sequence (padding only at the end)")
    if not m.any():
        raise ValueError(f"{name} has no valid frame (mask is all False)")
    valid = x[m]
    if not np.all(np.isfinite(valid)):
        bad = np.argwhere(~np.isfinite(x) & m[..., None])[0]
        raise ValueError(f"{name} contains NaN or inf at a valid frame (sequence {bad[0]}, frame {bad[1]})")
    x = np.where(m[..., None], x, 0.0)
    return x, m


def _check_model(model: GaussianHMM, num_features: int) -> None:
    if not isinstance(model, GaussianHMM):
        raise ValueError(f"model must be a GaussianHMM, got {type(model).__name__}")
    components = np.asarray(model.components)
    if components.ndim != 2 or components.shape[1] != num_features:
        raise ValueError(f"model.components has shape {components.shape}, frames have D = {num_features}")


# ----------------------------------------------------------------------------------------------
# PCA in the full space
# ----------------------------------------------------------------------------------------------


class _Basis(NamedTuple):
    """PCA of a set of frames: all that is needed to build the ``d``-dim projection for any ``d``."""

    mean: np.ndarray  # [D]
    vectors: np.ndarray  # [r, D] principal directions, descending variance (r = min(D, M))
    eigenvalues: np.ndarray  # [r]
    total_variance: float  # trace of the covariance
    num_features: int  # D
    identity: bool  # pca_dims=None: the raw coordinates, no rotation


def _pca(frames: np.ndarray, identity: bool = False) -> _Basis:
    """Eigen-decomposition of the (MLE) covariance of ``frames [M, D]``, through the Gram matrix if M < D."""
    num_frames, num_features = frames.shape
    mean = frames.mean(axis=0)
    centred = frames - mean
    total = float(np.sum(centred ** 2) / num_frames)
    if identity:
        return _Basis(mean, np.eye(num_features), np.sum(centred ** 2, axis=0) / num_frames, total, num_features, True)
    if num_frames >= num_features:
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred / num_frames)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, vectors = np.maximum(eigenvalues[order], 0.0), vectors[:, order].T
    else:
        eigenvalues, u = np.linalg.eigh(centred @ centred.T / num_frames)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, u = np.maximum(eigenvalues[order], 0.0), u[:, order]
        keep = eigenvalues > eigenvalues[0] * 1e-12 if eigenvalues[0] > 0 else np.zeros_like(eigenvalues, bool)
        vectors = (centred.T @ u[:, keep] / np.sqrt(eigenvalues[keep] * num_frames)).T
        eigenvalues = eigenvalues[keep]
        if vectors.shape[0] == 0:  # all frames equal: any orthonormal directions do
            vectors, eigenvalues = np.eye(num_features)[:1], np.zeros(1)
    # A deterministic sign per direction (largest entry positive), so refits give the same basis.
    signs = np.sign(vectors[np.arange(vectors.shape[0]), np.argmax(np.abs(vectors), axis=1)])
    vectors = vectors * np.where(signs == 0, 1.0, signs)[:, None]
    return _Basis(mean, vectors, eigenvalues, total, num_features, False)


def _max_dim(basis: _Basis) -> int:
    return basis.num_features if basis.identity else basis.vectors.shape[0]


def _components(basis: _Basis, dim: int, floor: float) -> tuple[np.ndarray, float]:
    """``components [d, D]`` and the residual variance (mean discarded eigenvalue, at least ``floor``)."""
    components = basis.vectors[:dim]
    residual_dims = basis.num_features - dim
    if residual_dims == 0:
        return components, 0.0
    retained = float(np.sum(basis.eigenvalues[:dim]))
    return components, max((basis.total_variance - retained) / residual_dims, floor)


def _project(frames: np.ndarray, mean: np.ndarray, components: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PCA coordinates ``[M, d]`` and squared residual norms ``[M]`` of frames ``[M, D]``."""
    centred = frames - mean
    z = centred @ components.T
    if components.shape[0] == components.shape[1]:
        return z, np.zeros(frames.shape[0])
    residual = centred - z @ components
    return z, np.einsum("md,md->m", residual, residual)


def _residual_log_density(residual_sq: np.ndarray, residual_dims: int, residual_variance: float) -> np.ndarray:
    """``log N(r; 0, σ² I_{D−d})`` from ``||r||² [M]``; 0 when there is no residual."""
    if residual_dims == 0:
        return np.zeros_like(residual_sq)
    return -0.5 * (residual_dims * (_LOG_2PI + math.log(residual_variance)) + residual_sq / residual_variance)


# ----------------------------------------------------------------------------------------------
# Emissions in the d-dimensional coordinates
# ----------------------------------------------------------------------------------------------


def _gaussian_log_densities(z: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """``log N(z_m; means[k], covariances[k])`` for ``z [M, d]``: ``[M, K]`` float64."""
    num_states, dim = means.shape
    out = np.empty((z.shape[0], num_states))
    for k in range(num_states):
        try:
            chol = np.linalg.cholesky(covariances[k])
        except np.linalg.LinAlgError as err:
            raise ValueError(f"covariance of state {k} is not positive definite") from err
        precision_chol = solve_triangular(chol, np.eye(dim), lower=True).T  # Σ⁻¹ = P Pᵀ
        y = z @ precision_chol - means[k] @ precision_chol
        log_det = 2.0 * np.sum(np.log(np.diag(chol)))
        out[:, k] = -0.5 * (dim * _LOG_2PI + log_det + np.einsum("md,md->m", y, y))
    return out


def log_emissions(model: GaussianHMM, frames) -> np.ndarray:
    """Full-space emission log-densities ``log p(y | x = k)`` of frames ``[n, D]`` (or ``[..., D]``): ``[n, K]``.

    The ``d``-dim Gaussian of each state in PCA coordinates plus the isotropic residual Gaussian on
    the ``D − d`` orthogonal dimensions (module docstring): a density on ``R^D``, comparable across
    models with different ``d``.
    """
    y = np.asarray(frames, np.float64)
    if y.ndim < 1:
        raise ValueError(f"frames must have shape [n, D], got {y.shape}")
    _check_model(model, y.shape[-1])
    lead = y.shape[:-1]
    y = y.reshape(-1, y.shape[-1])
    if not np.all(np.isfinite(y)):
        raise ValueError("frames contain NaN or inf")
    components = np.asarray(model.components, np.float64)
    z, residual_sq = _project(y, np.asarray(model.mean, np.float64), components)
    out = _gaussian_log_densities(z, np.asarray(model.means, np.float64), np.asarray(model.covariances, np.float64))
    out += _residual_log_density(residual_sq, components.shape[1] - components.shape[0],
                                 float(model.residual_variance))[:, None]
    return out.reshape(lead + (out.shape[1],))


# ----------------------------------------------------------------------------------------------
# E-step (JAX) and M-step (NumPy)
# ----------------------------------------------------------------------------------------------

_over_sequences = (None, None, 0, 0)


@jax.jit
def _e_step(log_pi, log_A, log_b, mask):
    """Posterior marginals ``[N, n, K]``, summed counts ``([K], [K, K])`` and log marginals ``[N]``.

    Sequences without a valid frame (the padding rows of :func:`_batch`) contribute zero counts and
    a zero log marginal.
    """
    gamma = jax.vmap(hmm.smooth, _over_sequences)(log_pi, log_A, log_b, mask)
    counts = jax.vmap(hmm.expected_counts, _over_sequences)(log_pi, log_A, log_b, mask)
    log_marginal = jax.vmap(hmm.forward_filter, _over_sequences)(log_pi, log_A, log_b, mask).log_marginal
    return gamma, counts.initial.sum(0), counts.transitions.sum(0), log_marginal


@jax.jit
def _viterbi(log_pi, log_A, log_b, mask):
    return jax.vmap(hmm.viterbi, _over_sequences)(log_pi, log_A, log_b, mask).states


def _bucket(num_sequences: int) -> int:
    """Batch size the jitted functions see: the next power of two, so that few shapes get compiled."""
    return 1 << max(num_sequences - 1, 0).bit_length()


def _batch(log_b: np.ndarray, mask: np.ndarray, rows: int) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """float32 ``log_b − max_k log_b`` and the mask, padded with empty sequences to ``rows``; float64 shifts ``[N, n]``.

    The shift is taken in float64 before the cast, so the float32 E-step only sees gaps between states.
    """
    shift = log_b.max(axis=-1)
    pad = ((0, rows - log_b.shape[0]), (0, 0))
    shifted = np.pad((log_b - shift[..., None]).astype(np.float32), pad + ((0, 0),))
    return jnp.asarray(shifted), jnp.asarray(np.pad(mask, pad)), shift


def _chain(log_pi, log_A) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(log_pi, jnp.float32), jnp.asarray(log_A, jnp.float32)


def _single_threaded():
    """One BLAS/OpenMP thread for the NumPy and k-means work, which alternates with JAX calls.

    The d-dimensional products are too small to gain from threads, and on a busy machine
    multi-threaded OpenBLAS (and k-means' OpenMP loops) can stall each of them for far longer
    than the work takes on one thread.
    """
    return threadpool_limits(limits=1)


class _Data(NamedTuple):
    """One training set in PCA coordinates, laid out for the E-step."""

    z: np.ndarray  # [N, n, d] (0 at padding)
    mask: np.ndarray  # [N, n]
    residual: np.ndarray  # [N, n] residual log-density (0 at padding)
    num_frames: int


def _layout(x: np.ndarray, mask: np.ndarray, mean, components, residual_variance: float) -> _Data:
    frames = x[mask]
    z_valid, residual_sq = _project(frames, mean, components)
    z = np.zeros(mask.shape + (components.shape[0],))
    z[mask] = z_valid
    residual = np.zeros(mask.shape)
    residual[mask] = _residual_log_density(residual_sq, components.shape[1] - components.shape[0], residual_variance)
    return _Data(z, mask, residual, int(mask.sum()))


def _state_log_b(data: _Data, means, covariances) -> np.ndarray:
    """``[N, n, K]`` d-space emission log-densities (0 at padding; the residual term excluded)."""
    log_b = np.zeros(data.mask.shape + (means.shape[0],))
    log_b[data.mask] = _gaussian_log_densities(data.z[data.mask], means, covariances)
    return log_b


def _total_log_likelihood(data: _Data, log_marginal, shift) -> float:
    """Full-space training log-likelihood: float32 E-step marginals + float64 shifts and residual terms."""
    return float(np.sum(np.asarray(log_marginal, np.float64)) + np.sum(shift[data.mask])
                 + np.sum(data.residual[data.mask]))


def _m_step(data: _Data, gamma: np.ndarray, initial: np.ndarray, transitions: np.ndarray, previous: tuple,
            reg: float, pseudocount: float, diagonal: bool) -> tuple:
    """Closed-form MAP update of (means, covariances, log_pi, log_A); see the module docstring."""
    old_means, old_covariances = previous[:2]
    z = data.z[data.mask]  # [M, d]
    weights = gamma[data.mask]  # [M, K]
    num_states, dim = old_means.shape
    totals = weights.sum(axis=0)
    means, covariances = old_means.copy(), old_covariances.copy()
    for k in range(num_states):
        if totals[k] < _EMPTY_STATE:
            continue
        means[k] = weights[:, k] @ z / totals[k]
        centred = (z - means[k]) * np.sqrt(weights[:, k])[:, None]
        cov = centred.T @ centred / totals[k]
        if diagonal:
            cov = np.diag(np.diag(cov))
        covariances[k] = cov + reg * np.eye(dim)
    pi = initial + pseudocount
    A = transitions + pseudocount
    log_pi = np.log(pi / pi.sum())
    log_A = np.log(A / A.sum(axis=1, keepdims=True))
    return means, covariances, log_pi, log_A


def _kmeans_init(data: _Data, num_states: int, seed: int, reg: float, diagonal: bool, n_init: int) -> tuple:
    """Means and within-cluster covariances from k-means on the valid frames; π and A from label counts."""
    z = data.z[data.mask]
    dim = z.shape[1]
    km = KMeans(n_clusters=num_states, n_init=n_init, random_state=seed).fit(z)
    labels = km.labels_
    centred_all = z - z.mean(axis=0)
    global_cov = centred_all.T @ centred_all / z.shape[0]
    covariances = np.empty((num_states, dim, dim))
    for k in range(num_states):
        members = z[labels == k]
        if members.shape[0] >= 2:
            c = members - members.mean(axis=0)
            cov = c.T @ c / members.shape[0]
        else:
            cov = global_cov
        if diagonal:
            cov = np.diag(np.diag(cov))
        covariances[k] = cov + reg * np.eye(dim)
    paths = np.full(data.mask.shape, -1)
    paths[data.mask] = labels
    first = paths[:, 0]
    initial = np.bincount(first[first >= 0], minlength=num_states).astype(np.float64)
    frm, to = paths[:, :-1].reshape(-1), paths[:, 1:].reshape(-1)
    both = (frm >= 0) & (to >= 0)
    transitions = np.zeros((num_states, num_states))
    np.add.at(transitions, (frm[both], to[both]), 1.0)
    pi = initial + 1.0
    A = transitions + 1.0  # Laplace smoothing: every transition stays possible for EM to find
    return (np.asarray(km.cluster_centers_, np.float64), covariances, np.log(pi / pi.sum()),
            np.log(A / A.sum(axis=1, keepdims=True)))


class _Run(NamedTuple):
    params: tuple  # (means, covariances, log_pi, log_A)
    trace: np.ndarray  # per-frame log-likelihood before each M-step and at the end
    converged: bool
    num_iters: int


def _em(data: _Data, params: tuple, rows: int, num_iters: int, tol: float, reg: float, pseudocount: float,
        diagonal: bool) -> _Run:
    """Baum–Welch from ``params``: stops when the per-frame gain is below ``tol`` or after ``num_iters`` M-steps.

    ``rows``: batch size of the jitted E-step (``data`` is padded with empty sequences to it). The
    returned parameters are those whose likelihood is the last entry of the trace.
    """
    trace = []
    converged = False
    for iteration in range(num_iters + 1):
        means, covariances, log_pi, log_A = params
        log_b, mask, shift = _batch(_state_log_b(data, means, covariances), data.mask, rows)
        gamma, initial, transitions, log_marginal = _e_step(*_chain(log_pi, log_A), log_b, mask)
        trace.append(_total_log_likelihood(data, np.asarray(log_marginal)[:data.mask.shape[0]], shift)
                     / data.num_frames)
        if len(trace) > 1 and trace[-1] - trace[-2] < tol:
            converged = True
            break
        if iteration == num_iters:
            break
        gamma = np.asarray(gamma, np.float64)[:data.mask.shape[0]]
        params = _m_step(data, gamma, np.asarray(initial, np.float64), np.asarray(transitions, np.float64),
                         params, reg, pseudocount, diagonal)
    return _Run(params, np.asarray(trace), converged, len(trace) - 1)


def _model(mean, components, residual_variance, params) -> GaussianHMM:
    means, covariances, log_pi, log_A = params
    return GaussianHMM(mean, components, float(residual_variance), means, covariances, log_pi, log_A)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def fit_gaussian_hmm(sequences, mask, num_states: int, *, pca_dims: int | Sequence[int] | None = DEFAULT_PCA_DIMS,
                     num_restarts: int = 3, num_iters: int = 100, tol: float = 1e-4, heldout_fraction: float = 0.2,
                     selection_restarts: int | None = None,
                     covariance_type: str = "full", reg_covar: float = 1e-3, pseudocount: float = 1e-2,
                     kmeans_n_init: int = 3, seed: int = 0) -> GaussianHMMFit:
    """Fits a Gaussian HMM to ``sequences [N, n, D]`` by Baum–Welch, choosing the PCA dimension without labels.

    Procedure (every choice is recorded in the returned :class:`GaussianHMMFit`):

    1. If several candidate dimensions remain after clipping (``d ≤ D`` and ``d`` ≤ the rank of the
       training frames), a random ``heldout_fraction`` of the sequences is held out; for each ``d``,
       PCA and ``selection_restarts`` EM runs (k-means seeds ``seed, seed + 1, …``) are fitted on the
       rest, the run with the highest likelihood on the rest is kept, and its full-space
       log-likelihood per valid frame of the held-out sequences is recorded. The best ``d`` wins
       (the smaller one on a tie).
    2. PCA with the chosen ``d`` is refitted on all training frames, EM is run ``num_restarts``
       times from k-means with seeds ``seed, seed + 1, …``, and the restart with the highest
       training log-likelihood is kept.

    Args:
      sequences: ``[N, n, D]`` (or ``[N, n, *frame]``, flattened) training sequences.
      mask: ``[N, n]`` bool, True = valid frame, padding at the end only; None = all valid.
      num_states: K.
      pca_dims: candidate PCA dimensions (an int = no choice), or None for the raw coordinates
        (``d = D``, no rotation; e.g. with ``covariance_type="diag"`` on raw features).
      num_restarts: EM restarts of the final fit.
      num_iters: maximum M-steps per EM run. tol: stop when the training log-likelihood per valid
        frame improves by less than this.
      heldout_fraction: share of the sequences held out to choose ``d`` (only used with several candidates).
      selection_restarts: EM restarts per candidate ``d`` while choosing (None: ``num_restarts``). A
        single run can land in a poor local optimum and misrank ``d``.
      covariance_type: "full" or "diag" (in PCA coordinates).
      reg_covar: ridge on the covariance diagonals, relative to the average per-dimension variance of
        the training frames; also the floor of the residual variance.
      pseudocount: Dirichlet pseudo-count added to the expected initial and transition counts (> 0).
      kmeans_n_init: k-means restarts inside each initialisation.
      seed: random seed (held-out split and k-means).

    Returns:
      :class:`GaussianHMMFit`.

    Raises:
      ValueError: bad shapes, NaN/inf in valid frames, a bad mask, K < 1, K above the number of
        valid frames, or a setting out of range.
    """
    x, m = _check_sequences(sequences, mask)
    if not isinstance(num_states, (int, np.integer)) or isinstance(num_states, bool) or num_states < 1:
        raise ValueError(f"num_states (K) must be a positive int, got {num_states!r}")
    num_states = int(num_states)
    num_valid = int(m.sum())
    if num_states > num_valid:
        raise ValueError(f"num_states K = {num_states} is larger than the number of valid frames ({num_valid})")
    if covariance_type not in _COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {_COVARIANCE_TYPES}, got {covariance_type!r}")
    selection_restarts = num_restarts if selection_restarts is None else selection_restarts
    if num_restarts < 1 or selection_restarts < 1 or num_iters < 0 or kmeans_n_init < 1:
        raise ValueError(f"need num_restarts >= 1, selection_restarts >= 1, num_iters >= 0, kmeans_n_init >= 1; "
                         f"got {num_restarts}, {selection_restarts}, {num_iters}, {kmeans_n_init}")
    if not (pseudocount > 0) or not (reg_covar > 0) or not (tol >= 0):
        raise ValueError(f"need pseudocount > 0, reg_covar > 0, tol >= 0; got {pseudocount}, {reg_covar}, {tol}")
    identity = pca_dims is None
    if identity:
        candidates = [x.shape[2]]
    else:
        raw = [pca_dims] if isinstance(pca_dims, (int, np.integer)) else list(pca_dims)
        if not raw or any(not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 1 for d in raw):
            raise ValueError(f"pca_dims must be a positive int, a non-empty sequence of them, or None; got {pca_dims!r}")
        candidates = [int(d) for d in raw]
    kept = np.flatnonzero(m.any(axis=1))  # sequences without a valid frame contribute nothing
    x, m = x[kept], m[kept]
    diagonal = covariance_type == "diag"
    rows = _bucket(x.shape[0])  # one batch shape for every E-step of this fit: one compilation
    settings = dict(rows=rows, num_iters=num_iters, tol=tol, pseudocount=pseudocount, diagonal=diagonal)
    with _single_threaded():
        return _fit(x, m, num_states, candidates, identity, kept, heldout_fraction, num_restarts,
                    selection_restarts, reg_covar, kmeans_n_init, seed, settings)


def _fit(x, m, num_states, candidates, identity, kept, heldout_fraction, num_restarts, selection_restarts,
         reg_covar, kmeans_n_init, seed, settings) -> GaussianHMMFit:
    """The procedure of :func:`fit_gaussian_hmm` on checked inputs (all sequences non-empty)."""
    diagonal = settings["diagonal"]
    basis = _pca(x[m], identity)
    scale = basis.total_variance / basis.num_features
    reg = reg_covar * (scale if scale > 0 else 1.0)
    candidates = sorted({min(d, _max_dim(basis)) for d in candidates})

    def fit_once(train_x, train_m, fit_basis, dim, restart_seed):
        components, residual_variance = _components(fit_basis, dim, reg)
        data = _layout(train_x, train_m, fit_basis.mean, components, residual_variance)
        params = _kmeans_init(data, num_states, restart_seed, reg, diagonal, kmeans_n_init)
        run = _em(data, params, reg=reg, **settings)
        return _model(fit_basis.mean, components, residual_variance, run.params), run

    dim_scores, heldout = {}, np.zeros(0, np.int64)
    if len(candidates) > 1:
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"choosing among pca_dims {candidates} needs 0 < heldout_fraction < 1, "
                             f"got {heldout_fraction}")
        num_held = int(round(heldout_fraction * x.shape[0]))
        if num_held < 1 or num_held >= x.shape[0]:
            raise ValueError(f"heldout_fraction = {heldout_fraction} of {x.shape[0]} sequences leaves no held-out "
                             f"or no fit sequence to choose among pca_dims {candidates}; pass a single pca_dims")
        order = np.random.default_rng(seed).permutation(x.shape[0])
        heldout, fit_part = np.sort(order[:num_held]), np.sort(order[num_held:])
        fit_x, fit_m = x[fit_part], m[fit_part]
        if int(fit_m.sum()) < num_states:
            raise ValueError(f"the fit share ({int(fit_m.sum())} valid frames) has fewer frames than K = {num_states}")
        fit_basis = _pca(fit_x[fit_m], identity)
        for dim in candidates:
            runs = [fit_once(fit_x, fit_m, fit_basis, min(dim, _max_dim(fit_basis)), seed + r)
                    for r in range(selection_restarts)]
            model = max(runs, key=lambda run: run[1].trace[-1])[0]
            total = np.sum(_scores(model, x[heldout], m[heldout], settings["rows"]))
            dim_scores[dim] = float(total / m[heldout].sum())
        pca_dim = max(candidates, key=lambda d: (dim_scores[d], -d))
    else:
        pca_dim = candidates[0]

    runs = [fit_once(x, m, basis, pca_dim, seed + r) for r in range(num_restarts)]
    restart_scores = tuple(float(run.trace[-1]) for _, run in runs)
    best = int(np.argmax(restart_scores))
    model, run = runs[best]
    explained = float(np.sum(basis.eigenvalues[:pca_dim]) / basis.total_variance) if basis.total_variance > 0 else 1.0
    return GaussianHMMFit(model=model, pca_dim=pca_dim, candidate_dims=tuple(candidates), dim_scores=dim_scores,
                          restart_scores=restart_scores, best_restart=best,
                          log_likelihood_per_frame=restart_scores[best], log_likelihood_trace=run.trace,
                          converged=run.converged, num_iters_run=run.num_iters,
                          explained_variance_ratio=explained, heldout_sequences=kept[heldout], reg=float(reg))


def _prepared(model: GaussianHMM, sequences, mask):
    """Checked inputs laid out for the jitted functions: (mask [N, n], log_b, padded mask, shifts, residual [N, n])."""
    x, m = _check_sequences(sequences, mask)
    _check_model(model, x.shape[2])
    components = np.asarray(model.components, np.float64)
    data = _layout(x, m, np.asarray(model.mean, np.float64), components, float(model.residual_variance))
    log_b = _state_log_b(data, np.asarray(model.means, np.float64), np.asarray(model.covariances, np.float64))
    log_b, padded_mask, shift = _batch(log_b, m, _bucket(m.shape[0]))
    return m, log_b, padded_mask, shift, data.residual


def _scores(model: GaussianHMM, sequences, mask, rows: int | None = None) -> np.ndarray:
    """Per-sequence full-space log-likelihoods ``[N]`` (E-step batch ``rows``, default the bucket of N)."""
    x, m = _check_sequences(sequences, mask)
    _check_model(model, x.shape[2])
    data = _layout(x, m, np.asarray(model.mean, np.float64), np.asarray(model.components, np.float64),
                   float(model.residual_variance))
    log_b = _state_log_b(data, np.asarray(model.means, np.float64), np.asarray(model.covariances, np.float64))
    log_b, padded_mask, shift = _batch(log_b, m, rows or _bucket(m.shape[0]))
    # The E-step's forward pass (compiled once per batch shape for fitting too) gives the marginals.
    log_marginal = np.asarray(_e_step(*_chain(model.log_pi, model.log_A), log_b, padded_mask)[3], np.float64)
    return log_marginal[:m.shape[0]] + np.sum(np.where(m, shift + data.residual, 0.0), axis=1)


def log_likelihood(model: GaussianHMM, sequences, mask=None) -> np.ndarray:
    """Full-space log-likelihood ``log p(y_1..y_n)`` of each sequence ``[N, n, D]`` under ``model``: ``[N]`` float64.

    ``mask [N, n]`` bool marks valid frames (None = all); a sequence contributes its valid frames only.
    """
    with _single_threaded():
        return _scores(model, sequences, mask)


def decode(model: GaussianHMM, sequences, mask=None) -> np.ndarray:
    """Viterbi paths of ``sequences [N, n, D]`` under ``model``: ``[N, n]`` int64 (``−1`` at padded frames)."""
    with _single_threaded():
        m, log_b, padded_mask, _, _ = _prepared(model, sequences, mask)
    states = np.asarray(_viterbi(*_chain(model.log_pi, model.log_A), log_b, padded_mask))[:m.shape[0]]
    return np.where(m, states.astype(np.int64), -1)


def posteriors(model: GaussianHMM, sequences, mask=None) -> np.ndarray:
    """Posterior marginals ``p(x_i = k | y)`` ``[N, n, K]`` float64 (rows sum to one; 0 at padded frames)."""
    with _single_threaded():
        m, log_b, padded_mask, _, _ = _prepared(model, sequences, mask)
    gamma = np.asarray(_e_step(*_chain(model.log_pi, model.log_A), log_b, padded_mask)[0], np.float64)
    return np.where(m[..., None], gamma[:m.shape[0]], 0.0)
