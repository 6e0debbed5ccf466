"""Exact inference in a discrete hidden Markov model, in log space, one sequence per call.

One module of ~700 lines on purpose: the seven public algorithms share one forward pass, its masks, the
time-varying A and the shape-based formulation choices, and dynamax keeps them together the same way.

Conventions
-----------
* ``K`` hidden states (classes), ``n`` frames; frames are 0-based in code (frame ``i`` of the
  docstrings below is row ``i`` of the arrays, and ``y_1..y_i`` means rows ``0..i``).
* Argument order follows dynamax ``(initial, transition, log_likelihoods)``, but everything is a
  log-probability:

  - ``log_pi: [K]``, ``log_pi[k] = log p(x_1 = k)``;
  - ``log_A: [K, K]``, ``log_A[i, j] = log p(x_{l+1} = j | x_l = i)`` (rows sum to one), or a
    time-varying ``[n − 1, K, K]`` where ``log_A[l]`` is the transition from frame ``l`` to frame
    ``l + 1`` (0-based);
  - ``log_b: [n, K]``, ``log_b[i, k] = log p(y_i | x_i = k)``. Diffusion-sized values (≈ −1e5, with
    gaps of thousands between classes) are ordinary, and ``−inf`` is legal: a frame whose label is
    observed ("clamped") has ``−inf`` everywhere except the observed class. A row must not be
    entirely ``−inf`` (that observation would have probability zero).
  - ``mask: [n]`` bool, True = valid frame. Padding only at the end. Padded frames change nothing
    for the valid prefix: every result on the prefix equals the result on the truncated sequence.
    Decoded/sampled states at padded frames are ``−1``; their marginals and counts are 0.

* Batch with ``jax.vmap``; every function is jitted. Shapes are checked at trace time, so bad shapes
  raise ``ValueError`` also inside ``jit``/``vmap``. Values are *not* checked inside ``jit`` (they
  are tracers): call :func:`check_hmm_params` outside ``jit`` to validate parameters. Unnormalised
  ``log_pi``/``log_A`` are not an error inside ``jit``: the recursions then compute the same sums
  and maxima with the weights given (e.g. ``log_marginal`` becomes the log of the unnormalised
  total mass), which is what you get from the formulas, not a probability.

Numerics
--------
The forward recursion is a max-shifted matrix–vector product in probability space, not a
``logsumexp`` over a broadcast ``[K, K]`` sum (4–5× slower on CPU). Each frame's largest emission is
subtracted first (exact in floating point), ``exp(log_A)`` is precomputed once with every column
scaled to a maximum of one (``−inf`` gives probability 0; a rarely entered state with a whole
column of, say, ``e^−200`` does not underflow), the filtered distribution is renormalised at every
step and the log-normaliser is carried separately. Log-quantities returned (``log_alpha``, the
smoothed marginals) are rebuilt in log space from the per-step factors, so entries ``e^−1000``
below their frame's maximum are exact, not flushed to ``−inf``. ``0 · (−inf)`` is never formed.

The results are exact up to float32 rounding whenever every within-column ratio of transition
probabilities is above ≈1e−30 (all usual transition matrices, whatever the emissions). With exact
zeros in ``log_A`` a probability ratio below float32's range (≈1e−38) is flushed to zero; this can
only matter when later evidence makes such a flushed path the only possible one.

Note on ``log_alpha`` precision: ``log_alpha[i]`` is unnormalised, ≈ the sum of ``i`` emission
log-likelihoods; at −1e7 float32 resolves it only to ±1, so differences within a row lose
precision. :func:`ffbs`, :func:`smooth` and :func:`expected_counts` therefore work from the
normalised filtered distribution internally; :func:`backward_sample` samples from whatever rows it
is given (any per-row shift of ``log_alpha`` gives the same draw).

Peer bug avoided
----------------
dynamax's sequential posterior sampler ``hmm_posterior_sample`` paired ``filtered_probs[t − 1]``
with ``A[t]`` for time-varying transitions (``jnp.arange(1, num_timesteps)`` zipped with
``filtered_probs[:-1]``, e.g. probml/dynamax commit c7e1cc4), an off-by-one that its tests did not
catch because the brute-force sampler test is commented out; it was fixed by
https://github.com/probml/dynamax/pull/436 (see https://github.com/probml/dynamax/issues/438).
Here ``log_A[l]`` always connects frames ``l`` and ``l + 1``, and tests/test_hmm.py checks every
sampler against the exact path posterior, time-varying case included, and shows that the shifted
variant fails that test.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Bool, Float, Int, PRNGKeyArray

Array = jax.Array
_In = jax.Array | np.ndarray  # inputs may be NumPy arrays; outputs are JAX arrays
LogPi = Float[_In, " K"]
LogA = Float[_In, "*steps K K"]  # [K, K], or [n − 1, K, K] for a time-varying chain
LogB = Float[_In, "n K"]
Mask = Bool[_In, " n"] | None

__all__ = [
    "ForwardResult",
    "PosteriorSample",
    "ViterbiPath",
    "Counts",
    "forward_filter",
    "backward_sample",
    "ffbs",
    "viterbi",
    "smooth",
    "expected_counts",
    "path_counts",
    "check_hmm_params",
]

# Static, shape-based choices of formulation, all measured with benchmarks/hmm_bench.py on CPU:
# matrix-vector products inside scans are unrolled elementwise chains up to this K (see _vecmat).
_SMALL_K = 16
# The backward sampler's cdf is an unrolled sequential sum (monotone) up to this K.
_SEQUENTIAL_CDF_MAX_K = 64
# Viterbi stores K x K back-pointers up to this K and recomputes them while backtracking above it:
# XLA's CPU argmax over [K, K] is cheap for small K and 3-4x slower than a max for K >= 20.
_VITERBI_POINTER_MAX_K = 16


class ForwardResult(NamedTuple):
    """Result of :func:`forward_filter`.

    Attributes:
      log_alpha: ``[n, K]``, ``log p(y_1..y_i, x_i = k)`` (joint, not normalised); ``−inf`` rows at
        padded frames.
      log_marginal: ``[]``, ``log p(y_1..y_n)`` over the valid frames.
    """

    log_alpha: Array
    log_marginal: Array


class PosteriorSample(NamedTuple):
    """Result of :func:`ffbs`.

    Attributes:
      states: ``[n]`` int32, one exact draw of ``x_1..x_n`` from ``p(x | y)``; ``−1`` at padded frames.
      log_marginal: ``[]``, ``log p(y_1..y_n)``.
    """

    states: Array
    log_marginal: Array


class ViterbiPath(NamedTuple):
    """Result of :func:`viterbi`.

    Attributes:
      states: ``[n]`` int32, ``argmax_x p(x_1..x_n, y_1..y_n)``; ``−1`` at padded frames.
      log_joint: ``[]``, ``log p(states, y_1..y_n) = max_x log p(x, y)``.
    """

    states: Array
    log_joint: Array


class Counts(NamedTuple):
    """Sufficient statistics of the Markov chain for an M-step (expected or from one path).

    Attributes:
      initial: ``[K]``, ``E[1(x_1 = k)]``.
      transitions: ``[K, K]``, ``Σ_l E[1(x_l = i, x_{l+1} = j)]`` over pairs of valid frames
        (summed over ``l`` also for a time-varying ``log_A``).
    """

    initial: Array
    transitions: Array


# ----------------------------------------------------------------------------------------------
# Input checking (trace time: shapes and dtypes are static)
# ----------------------------------------------------------------------------------------------


def _float_dtype(*arrays):
    dtype = jnp.result_type(*arrays)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _check_transitions(log_A, num_frames: int, num_states: int, what: str) -> bool:
    """Validates the shape of ``log_A``; returns True when it is time-varying."""
    if log_A.ndim == 2:
        if log_A.shape != (num_states, num_states):
            raise ValueError(
                f"log_A must have shape [K, K] = [{num_states}, {num_states}] to match {what}, "
                f"got {tuple(log_A.shape)}"
            )
        return False
    if log_A.ndim == 3:
        expected = (num_frames - 1, num_states, num_states)
        if log_A.shape[1:] != expected[1:]:
            raise ValueError(
                f"time-varying log_A must have shape [n - 1, K, K] = {list(expected)} to match {what}, "
                f"got {tuple(log_A.shape)} (K mismatch)"
            )
        if log_A.shape[0] != num_frames - 1:
            raise ValueError(
                f"time-varying log_A must hold n - 1 = {num_frames - 1} transition matrices for "
                f"n = {num_frames} frames (log_A[l] goes from frame l to l + 1), got {log_A.shape[0]}"
            )
        return True
    raise ValueError(f"log_A must have rank 2 [K, K] or 3 [n - 1, K, K], got shape {tuple(log_A.shape)}")


def _check_mask(mask, num_frames: int):
    """Validates ``mask``; returns None (no padding) or a ``[n]`` bool array."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a bool array (True = valid frame), got dtype {mask.dtype}")
    if mask.shape != (num_frames,):
        raise ValueError(f"mask must have shape [n] = [{num_frames}], got {tuple(mask.shape)}")
    return mask


def _prepare(log_pi, log_A, log_b, mask):
    """Checks shapes; returns float arrays, the mask (or None) and whether log_A is time-varying."""
    log_pi, log_A, log_b = jnp.asarray(log_pi), jnp.asarray(log_A), jnp.asarray(log_b)
    if log_b.ndim != 2:
        raise ValueError(f"log_b must have shape [n, K] (one sequence; vmap for batches), got {tuple(log_b.shape)}")
    num_frames, num_states = log_b.shape
    if num_frames == 0 or num_states == 0:
        raise ValueError(f"log_b must have at least one frame and one state, got shape {tuple(log_b.shape)}")
    if log_pi.ndim != 1:
        raise ValueError(f"log_pi must have shape [K], got {tuple(log_pi.shape)}")
    if log_pi.shape[0] != num_states:
        raise ValueError(
            f"K mismatch: log_pi has {log_pi.shape[0]} states but log_b has {num_states} (shape [n, K])"
        )
    time_varying = _check_transitions(log_A, num_frames, num_states, f"log_b's K = {num_states}")
    mask = _check_mask(mask, num_frames)
    dtype = _float_dtype(log_pi, log_A, log_b)
    log_b = log_b.astype(dtype)
    if mask is not None:
        # Padded frames may hold anything (NaN included): replace them so that nothing can leak.
        log_b = jnp.where(mask[:, None], log_b, 0.0)
    return log_pi.astype(dtype), log_A.astype(dtype), log_b, mask, time_varying


# ----------------------------------------------------------------------------------------------
# Shared numerics
# ----------------------------------------------------------------------------------------------


def _safe(x):
    """Replaces ±inf (a maximum over all −inf entries) by 0, so that ``y − x`` never gives NaN."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def _column_scaled(log_A):
    """``exp(log_A)`` with each column scaled to a maximum of one.

    Returns ``(A_scaled, log_col_max)`` with ``A[.., i, j] = A_scaled[.., i, j] · exp(log_col_max[.., j])``;
    a column that is all ``−inf`` (an unreachable state) gives zeros and ``log_col_max = 0``.
    """
    log_col_max = _safe(jnp.max(log_A, axis=-2))
    return jnp.exp(log_A - log_col_max[..., None, :]), log_col_max


def _shift_rows(x):
    """``x − max(x, axis=-1)`` (exact for the entries that matter) and the max; all-``−inf`` rows stay ``−inf``."""
    row_max = _safe(jnp.max(x, axis=-1, keepdims=True))
    return x - row_max, row_max[..., 0]


def _select(valid, new, old):
    """``where(valid, new, old)``; no-op without a mask (valid is None)."""
    return new if valid is None else jnp.where(valid, new, old)


def _scan_inputs(mask, *arrays):
    """xs for a scan over frames 1..n−1: the arrays, plus the validity flags when there is a mask."""
    return arrays + ((None,) if mask is None else (mask[1:],))


def _normalise_log_rows(x):
    """Rows of probabilities from log-weights; all-``−inf`` rows give zeros."""
    shifted, _ = _shift_rows(x)
    p = jnp.exp(shifted)
    total = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(total > 0, total, 1.0)


def _vecmat(v, M):
    """``v @ M`` for ``v [K]``, ``M [K, K]`` (non-negative, finite).

    Up to K = _SMALL_K an unrolled chain of K multiply-adds, which XLA fuses into one elementwise
    loop: inside a scan step a dot call costs more than its K² flops.
    """
    num_states = M.shape[0]
    if num_states > _SMALL_K:
        return v @ M
    out = v[0] * M[0]
    for k in range(1, num_states):
        out = out + v[k] * M[k]
    return out


def _vecsum(v):
    """``sum(v)`` for ``v [K]``; an unrolled chain for small K (fuses with its producer, see _vecmat)."""
    if v.shape[0] > _SMALL_K:
        return jnp.sum(v)
    out = v[0]
    for k in range(1, v.shape[0]):
        out = out + v[k]
    return out


def _unroll(num_states: int) -> int:
    """lax.scan unroll factor: 1 for small K, 2 above (fastest on CPU in benchmarks/hmm_bench.py).

    Not used by the forward scan, whose body holds the per-frame exp/log: unrolled, XLA's CPU
    backend ran it about 2x slower.
    """
    return 1 if num_states <= _SMALL_K else 2


class _Forward(NamedTuple):
    """The scaled forward recursion, everything in terms of which the public results are written.

    With ``log_w_i = log w_i`` the log of the (unnormalised) scaled weights of frame ``i``:
    ``log_alpha_i = offset_i + log_w_i`` and ``log p(x_i | y_1..y_i) = log_w_i − log_s_i``.
    Only the fields the mode asked for are set (the others are None).
    """

    log_alpha: Array | None  # [n, K] (mode "alpha"), −inf rows at padded frames
    log_w: Array | None  # [n, K] (mode "log")
    offset: Array | None  # [n] (mode "log")
    log_s: Array | None  # [n] (mode "log")
    filtered: Array | None  # [n, K] p(x_i = k | y_1..y_i) as probabilities (mode "probs")
    log_marginal: Array  # []
    A_scaled: Array  # [K, K] or [n − 1, K, K], see _column_scaled
    # [n − 1, K] (mode "log"): frames 1..n−1, log_b[i] + log_col_max of A_{i−1} − a per-frame constant
    log_e: Array | None


def _forward(log_pi, log_A, log_b, mask, time_varying: bool, mode: str) -> _Forward:
    """Forward recursion as a max-shifted, renormalised matrix–vector product (module docstring).

    mode "alpha": log_alpha only; "log": what log-filtered / backward messages need; "probs": the
    filtered probabilities.

    Everything per frame happens inside the one scan (max-shift, exp, log of the result): on CPU
    each separate elementwise pass over ``[B, n, K]`` before or after a vmapped scan costs a
    sizeable fraction of the recursion itself (benchmarks/hmm_bench.py: 0.80x dynamax's filter at
    B = 64, n = 200, K = 10, against ~1.0x with the exp before and the log after the scan). The
    carry is the predicted distribution, so that no step needs a "first frame" branch.
    """
    num_frames, num_states = log_b.shape
    A_scaled, log_col_max = _column_scaled(log_A)

    # Every frame's log-weights are combined in log space before anything is exponentiated: frame 0
    # gets log_pi (its "prediction" is then a vector of ones), frame i > 0 the column scale of
    # A_{i−1}. Each frame's maximum is subtracted before the (small) added term, so neither is lost
    # to rounding at −1e5; the maximum itself only has to be approximately right. ``added`` does
    # not depend on the sequence, so under vmap it stays a small unbatched [n, K] input.
    added = jnp.concatenate([log_pi[None], jnp.broadcast_to(log_col_max, (num_frames - 1, num_states))])

    def step(carry, xs):
        q, c = carry  # predicted distribution of this frame (up to the column scales), log-offset
        b, add, A_l, valid = xs
        A_l = A_scaled if A_l is None else A_l
        frame_max = _safe(jnp.max(b + add))
        log_e = (b - frame_max) + add
        w = q * jnp.exp(log_e)
        s = _vecsum(w)
        f = w / jnp.where(s > 0, s, 1.0)
        a = c + frame_max  # log_alpha_i = a + log q + log_e
        q_next = _vecmat(f, A_l)  # the last frame's is computed and never used
        new = (q_next, a + jnp.log(s))
        carry = new if valid is None else (jnp.where(valid, new[0], q), jnp.where(valid, new[1], c))
        if mode == "alpha":
            log_alpha = a + (jnp.log(q) + log_e)
            out = log_alpha if valid is None else jnp.where(valid, log_alpha, -jnp.inf)
        elif mode == "probs":
            out = f
        else:
            out = (jnp.log(q) + log_e, a, jnp.log(s), log_e)
        return carry, out

    # A time-varying A_l (frame l to l + 1) is used at step l: the last frame gets a dummy matrix.
    A_seq = jnp.concatenate([A_scaled, jnp.zeros_like(A_scaled[:1])]) if time_varying else None
    init = (jnp.ones((num_states,), log_b.dtype), jnp.zeros((), log_b.dtype))
    (_, log_marginal), out = jax.lax.scan(step, init, (log_b, added, A_seq, mask))
    fields = dict(log_alpha=None, log_w=None, offset=None, log_s=None, filtered=None, log_e=None)
    if mode == "alpha":
        fields["log_alpha"] = out
    elif mode == "probs":
        fields["filtered"] = out
    else:
        log_w, offset, log_s, log_e = out
        fields.update(log_w=log_w, offset=offset, log_s=log_s, log_e=log_e[1:])
    return _Forward(log_marginal=log_marginal, A_scaled=A_scaled, **fields)


def _log_filtered(fwd: _Forward, mask) -> Array:
    """``log p(x_i = k | y_1..y_i)``, [n, K], exact also far below each frame's maximum; −inf if padded."""
    log_filtered = fwd.log_w - fwd.log_s[:, None]
    return log_filtered if mask is None else jnp.where(mask[:, None], log_filtered, -jnp.inf)


def _log_backward(fwd: _Forward, mask, time_varying: bool) -> Array:
    """Normalised backward messages ``log β̃_i(k) = log p(y_{i+1}..y_n | x_i = k) + const_i``, [n, K].

    Carried in log space; each step exponentiates a max-shifted vector (column scales of A folded
    in via log_e) and multiplies by the column-scaled A. The last frame and padded frames get 0.
    """
    num_states = fwd.log_e.shape[1]
    A_scaled_T = jnp.swapaxes(fwd.A_scaled, -1, -2)

    def step(log_beta_next, xs):
        log_e_next, A_T, valid_next = xs
        A_T = A_scaled_T if A_T is None else A_T
        g, _ = _shift_rows(log_e_next + log_beta_next)
        log_beta, _ = _shift_rows(jnp.log(_vecmat(jnp.exp(g), A_T)))  # log(A @ exp(g))
        log_beta = _select(valid_next, log_beta, jnp.zeros_like(log_beta))
        return log_beta, log_beta

    xs = _scan_inputs(mask, fwd.log_e, A_scaled_T if time_varying else None)
    last = jnp.zeros((num_states,), fwd.log_e.dtype)
    _, log_betas = jax.lax.scan(step, last, xs, reverse=True, unroll=_unroll(num_states))
    return jnp.concatenate([log_betas, last[None]], axis=0)


def _sample_backward(key, probs, A_scaled, mask, time_varying: bool) -> Array:
    """Backward sampling by inverse CDF: x_last ~ probs[last], x_l ~ probs[l] ⊙ A_l[:, x_{l+1}].

    ``probs``: ``[n, K]`` non-negative filtered weights (any per-row scale). One uniform per frame,
    drawn for all frames at once; the column scales of A cancel in the conditional.
    """
    num_frames, num_states = probs.shape
    uniforms = jax.random.uniform(key, (num_frames,), probs.dtype)  # in [0, 1 − 2^−23]
    into = jnp.swapaxes(A_scaled, -1, -2)  # into[.., j] = column j of A: weights of x_l given x_{l+1} = j
    last_index = num_states - 1

    def step(x_next, xs):
        p, uniform, into_l, valid = xs
        into_l = into if into_l is None else into_l
        w = jnp.where(x_next >= 0, p * into_l[jnp.maximum(x_next, 0)], p)
        if num_states <= _SEQUENTIAL_CDF_MAX_K:
            # Sequential sums of non-negative terms are monotone, so the state found below has
            # cdf[x − 1] <= t < cdf[x], i.e. w[x] > 0 (t < cdf[K − 1] as uniform < 1).
            cdf = [w[0]]
            for k in range(1, num_states):
                cdf.append(cdf[-1] + w[k])
            threshold = uniform * cdf[-1]
            x = sum((c <= threshold).astype(jnp.int32) for c in cdf)
            x = jnp.minimum(x, last_index)  # only reached when every weight underflowed
        else:
            cdf = jnp.cumsum(w)
            x = jnp.minimum(jnp.sum(cdf <= uniform * cdf[last_index]), last_index).astype(jnp.int32)
            # A tree-ordered cumsum need not be monotone: never return a zero-probability state.
            x = jnp.where(w[x] > 0, x, jnp.argmax(w).astype(jnp.int32))
        x = x if valid is None else jnp.where(valid, x, -1)
        return x, x

    if time_varying:  # the last frame has no successor: a dummy matrix keeps the scan uniform
        into = jnp.concatenate([into, jnp.ones((1, num_states, num_states), into.dtype)])
    xs = (probs, uniforms, into if time_varying else None, mask)
    _, states = jax.lax.scan(step, jnp.int32(-1), xs, reverse=True, unroll=_unroll(num_states))
    return states


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@jax.jit
def forward_filter(log_pi: LogPi, log_A: LogA, log_b: LogB, mask: Mask = None) -> ForwardResult:
    """Forward algorithm: ``log_alpha[i, k] = log p(y_1..y_i, x_i = k)`` and ``log p(y_1..y_n)``.

    Args:
      log_pi: ``[K]`` log initial probabilities.
      log_A: ``[K, K]`` or ``[n − 1, K, K]`` log transition probabilities, ``log_A[.., i, j] = log p(j | i)``.
      log_b: ``[n, K]`` emission log-likelihoods ``log p(y_i | x_i = k)`` (``−inf`` allowed).
      mask: optional ``[n]`` bool, True = valid frame (padding at the end only).

    Returns:
      :class:`ForwardResult` ``(log_alpha [n, K], log_marginal [])``; ``log_alpha`` is ``−inf`` at
      padded frames.
    """
    log_pi, log_A, log_b, mask, time_varying = _prepare(log_pi, log_A, log_b, mask)
    fwd = _forward(log_pi, log_A, log_b, mask, time_varying, "alpha")
    return ForwardResult(fwd.log_alpha, fwd.log_marginal)


@jax.jit
def backward_sample(key: PRNGKeyArray | _In, log_alpha: LogB, log_A: LogA, mask: Mask = None) -> Int[Array, " n"]:
    """Draws ``x_1..x_n ~ p(x | y)`` exactly, given the forward messages.

    ``x_n ~ alpha_n``, then ``x_l ~ alpha_l(·) A_l(·, x_{l+1})`` backwards, by inverse CDF with one
    uniform per frame. Only differences within a row of ``log_alpha`` matter, so the log of the
    normalised filtered distribution works too (and is more precise than an unnormalised
    ``log_alpha`` of magnitude ≳ 1e6 in float32; :func:`ffbs` works from the filtered distribution).

    Args:
      key: PRNG key.
      log_alpha: ``[n, K]`` from :func:`forward_filter` (rows at padded frames are ignored).
      log_A: ``[K, K]`` or ``[n − 1, K, K]``, the transitions the filter used.
      mask: optional ``[n]`` bool.

    Returns:
      ``[n]`` int32 states, ``−1`` at padded frames.
    """
    log_alpha, log_A = jnp.asarray(log_alpha), jnp.asarray(log_A)
    if log_alpha.ndim != 2:
        raise ValueError(f"log_alpha must have shape [n, K], got {tuple(log_alpha.shape)}")
    num_frames, num_states = log_alpha.shape
    if num_frames == 0:
        raise ValueError("log_alpha must have at least one frame")
    time_varying = _check_transitions(log_A, num_frames, num_states, f"log_alpha's K = {num_states}")
    mask = _check_mask(mask, num_frames)
    dtype = _float_dtype(log_alpha, log_A)
    log_alpha = log_alpha.astype(dtype)
    if mask is not None:
        log_alpha = jnp.where(mask[:, None], log_alpha, 0.0)
    probs = jnp.exp(_shift_rows(log_alpha)[0])
    A_scaled, _ = _column_scaled(log_A.astype(dtype))
    return _sample_backward(key, probs, A_scaled, mask, time_varying)


@jax.jit
def ffbs(key: PRNGKeyArray | _In, log_pi: LogPi, log_A: LogA, log_b: LogB, mask: Mask = None) -> PosteriorSample:
    """Forward filtering, backward sampling: one exact draw of the hidden path from ``p(x | y)``.

    Args:
      key: PRNG key.
      log_pi, log_A, log_b, mask: as in :func:`forward_filter`.

    Returns:
      :class:`PosteriorSample` ``(states [n] int32 (−1 at padded frames), log_marginal [])``.
    """
    log_pi, log_A, log_b, mask, time_varying = _prepare(log_pi, log_A, log_b, mask)
    fwd = _forward(log_pi, log_A, log_b, mask, time_varying, "probs")
    states = _sample_backward(key, fwd.filtered, fwd.A_scaled, mask, time_varying)
    return PosteriorSample(states, fwd.log_marginal)


@jax.jit
def viterbi(log_pi: LogPi, log_A: LogA, log_b: LogB, mask: Mask = None) -> ViterbiPath:
    """Most probable path by max-product with back-pointers (not the argmax of the marginals).

    The forward max-plus pass keeps each frame's best scores shifted to a maximum of 0 (each
    frame's largest emission and the running maximum are summed separately), so decisions stay
    exact at −1e5-sized emissions. Back-pointers ``argmax_k delta_l(k) + log_A_l(k, j)`` are stored
    for K ≤ 16; for larger K only ``delta_l`` is stored and the one pointer needed per frame is
    recomputed while backtracking (K instead of K² argmax work per frame; the same choice). Ties go
    to the lowest state index.

    Args:
      log_pi, log_A, log_b, mask: as in :func:`forward_filter`.

    Returns:
      :class:`ViterbiPath` ``(states [n] int32 (−1 at padded frames), log_joint [])`` with
      ``log_joint = log p(states, y)``.
    """
    log_pi, log_A, log_b, mask, time_varying = _prepare(log_pi, log_A, log_b, mask)
    num_states = log_b.shape[1]
    store_pointers = num_states <= _VITERBI_POINTER_MAX_K
    log_b_shifted, frame_max = _shift_rows(log_b)
    delta0, offset0 = _shift_rows(log_pi + log_b_shifted[0])
    unroll = _unroll(num_states)

    def step(delta, xs):
        b, A_l, valid = xs
        A_l = log_A if A_l is None else A_l
        scores = delta[:, None] + A_l  # [from, to]
        new_delta, offset = _shift_rows(jnp.max(scores, axis=0) + b)
        kept = new_delta if not store_pointers else jnp.argmax(scores, axis=0).astype(jnp.int32)
        return _select(valid, new_delta, delta), (kept, offset)

    xs = _scan_inputs(mask, log_b_shifted[1:], log_A if time_varying else None)
    delta_last, (kept, offsets) = jax.lax.scan(step, delta0, xs, unroll=unroll)
    offsets = jnp.concatenate([offset0[None], offsets]) + frame_max
    if mask is not None:
        offsets = jnp.where(mask, offsets, 0.0)
    log_joint = jnp.sum(offsets) + jnp.max(delta_last)

    if store_pointers:
        # Pointers at padded frames are never followed: the path starts at the last valid frame.
        pointers = jnp.concatenate([kept, jnp.zeros((1, num_states), jnp.int32)])
        best_last = jnp.argmax(delta_last).astype(jnp.int32)

        def backtrack(x_next, xs):
            pointer_next, valid = xs  # pointer_next = pointers of frame l + 1
            x = jnp.where(x_next >= 0, pointer_next[jnp.maximum(x_next, 0)], best_last)
            x = x if valid is None else jnp.where(valid, x, -1)
            return x, x

        xs = (pointers, mask)
    else:
        deltas = jnp.concatenate([delta0[None], kept])
        into = jnp.swapaxes(log_A, -1, -2)  # into[.., j] = log_A[.., :, j]
        if time_varying:
            into = jnp.concatenate([into, jnp.zeros((1,) + into.shape[1:], into.dtype)])

        def backtrack(x_next, xs):
            delta, into_l, valid = xs
            into_l = into if into_l is None else into_l
            scores = jnp.where(x_next >= 0, delta + into_l[jnp.maximum(x_next, 0)], delta)
            x = jnp.argmax(scores).astype(jnp.int32)
            x = x if valid is None else jnp.where(valid, x, -1)
            return x, x

        xs = (deltas, into if time_varying else None, mask)
    _, states = jax.lax.scan(backtrack, jnp.int32(-1), xs, reverse=True, unroll=unroll)
    return ViterbiPath(states, log_joint)


@jax.jit
def smooth(log_pi: LogPi, log_A: LogA, log_b: LogB, mask: Mask = None) -> Float[Array, "n K"]:
    """Posterior marginals ``p(x_i = k | y_1..y_n)`` by forward–backward.

    Args:
      log_pi, log_A, log_b, mask: as in :func:`forward_filter`.

    Returns:
      ``[n, K]`` probabilities (rows sum to one); rows at padded frames are 0.
    """
    log_pi, log_A, log_b, mask, time_varying = _prepare(log_pi, log_A, log_b, mask)
    fwd = _forward(log_pi, log_A, log_b, mask, time_varying, "log")
    return _normalise_log_rows(_log_filtered(fwd, mask) + _log_backward(fwd, mask, time_varying))


@jax.jit
def expected_counts(log_pi: LogPi, log_A: LogA, log_b: LogB, mask: Mask = None) -> Counts:
    """Posterior expected counts for an M-step: ``E[1(x_1 = k)]`` and ``Σ_l E[1(x_l = i, x_{l+1} = j)]``.

    Uses ``p(x_l = i, x_{l+1} = j | y) ∝ filtered_l(i) A_l(i, j) p(y_{l+1} | j) β_{l+1}(j)``,
    normalised per pair of frames; only pairs of valid frames count.

    Args:
      log_pi, log_A, log_b, mask: as in :func:`forward_filter`.

    Returns:
      :class:`Counts` ``(initial [K], transitions [K, K])``; ``transitions`` sums to the number of
      valid frames minus one.
    """
    log_pi, log_A, log_b, mask, time_varying = _prepare(log_pi, log_A, log_b, mask)
    fwd = _forward(log_pi, log_A, log_b, mask, time_varying, "log")
    log_filtered = _log_filtered(fwd, mask)
    log_beta = _log_backward(fwd, mask, time_varying)
    initial = _normalise_log_rows(log_filtered[0] + log_beta[0])

    # Pair (l, l + 1): filtered_l ⊗ h_{l+1} ⊙ A_scaled_l / z_l, with h ∝ A's column scale ·
    # p(y_{l+1} | ·) · β_{l+1}, computed in log space and shifted.
    filtered = _normalise_log_rows(log_filtered[:-1])  # [n − 1, K]
    h = jnp.exp(_shift_rows(fwd.log_e + log_beta[1:])[0])  # row max 1
    if time_varying:
        r = jnp.einsum("lij,lj->li", fwd.A_scaled, h)
    else:
        r = h @ fwd.A_scaled.T
    z = jnp.sum(filtered * r, axis=-1)  # per-pair normaliser
    weight = 1.0 / jnp.where(z > 0, z, 1.0)
    if mask is not None:
        weight = jnp.where(mask[1:], weight, 0.0)
    filtered = filtered * weight[:, None]
    if time_varying:
        transitions = jnp.einsum("li,lij,lj->ij", filtered, fwd.A_scaled, h)
    else:
        transitions = (filtered.T @ h) * fwd.A_scaled
    return Counts(initial, transitions)


@partial(jax.jit, static_argnames="num_classes")
def path_counts(states: Int[_In, " n"], num_classes: int, mask: Mask = None) -> Counts:
    """One-hot counts of a sampled or decoded path, the same statistics as :func:`expected_counts`.

    Args:
      states: ``[n]`` int states in ``0..K−1``; ``−1`` (padding) contributes nothing.
      num_classes: K (static).
      mask: optional ``[n]`` bool; frames with False contribute nothing.

    Returns:
      :class:`Counts` ``(initial [K], transitions [K, K])`` float32: ``initial`` is the one-hot of
      ``states[0]`` and ``transitions[i, j]`` counts consecutive valid pairs ``(i, j)``.
    """
    states = jnp.asarray(states)
    if states.ndim != 1 or states.shape[0] == 0:
        raise ValueError(f"states must have shape [n] with n >= 1, got {tuple(states.shape)}")
    if not jnp.issubdtype(states.dtype, jnp.integer):
        raise ValueError(f"states must be integers, got dtype {states.dtype}")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    mask = _check_mask(mask, states.shape[0])
    if mask is not None:
        states = jnp.where(mask, states, -1)
    one_hot = jax.nn.one_hot(states, num_classes, dtype=jnp.float32)  # −1 -> all-zero row
    return Counts(one_hot[0], one_hot[:-1].T @ one_hot[1:])


def check_hmm_params(log_pi, log_A, atol: float = 1e-4, log_b=None) -> None:
    """Validates parameter *values*; call it outside ``jit`` (inside, values are not available).

    Checks that ``log_pi [K]`` and ``log_A [K, K] / [n − 1, K, K]`` have no NaN or +inf, that
    ``exp(log_pi)`` and every row of ``exp(log_A)`` sum to 1 within ``atol``, and, if ``log_b
    [n, K]`` is given, that it has no NaN or +inf and no frame that is ``−inf`` for every state.

    Raises:
      ValueError naming the offending array and row.
    """
    try:
        log_pi = np.asarray(log_pi, dtype=np.float64)
        log_A = np.asarray(log_A, dtype=np.float64)
        log_b = None if log_b is None else np.asarray(log_b, dtype=np.float64)
    except jax.errors.TracerArrayConversionError as err:
        raise ValueError("check_hmm_params inspects values: call it outside jit/vmap") from err
    if log_pi.ndim != 1:
        raise ValueError(f"log_pi must have shape [K], got {log_pi.shape}")
    num_states = log_pi.shape[0]
    if log_A.ndim not in (2, 3) or log_A.shape[-2:] != (num_states, num_states):
        raise ValueError(
            f"log_A must have shape [K, K] or [n - 1, K, K] with K = {num_states} (from log_pi), got {log_A.shape}"
        )
    for name, x in (("log_pi", log_pi), ("log_A", log_A)):
        if np.isnan(x).any():
            raise ValueError(f"{name} contains NaN at index {tuple(np.argwhere(np.isnan(x))[0])}")
        if np.isposinf(x).any():
            raise ValueError(f"{name} contains +inf at index {tuple(np.argwhere(np.isposinf(x))[0])}")
    total = np.exp(log_pi).sum()
    if abs(total - 1.0) > atol:
        raise ValueError(f"exp(log_pi) must sum to 1 (within atol={atol}), sums to {total:.6g}")
    row_sums = np.exp(log_A).sum(-1)
    bad = np.argwhere(np.abs(row_sums - 1.0) > atol)
    if bad.size:
        index = tuple(int(i) for i in bad[0])
        where = f"row {index[0]}" if log_A.ndim == 2 else f"log_A[{index[0]}], row {index[1]}"
        raise ValueError(
            f"rows of exp(log_A) must sum to 1 (within atol={atol}): {where} sums to {row_sums[index]:.6g}"
            f" ({len(bad)} bad row(s))"
        )
    if log_b is not None:
        if log_b.ndim != 2 or log_b.shape[1] != num_states:
            raise ValueError(f"log_b must have shape [n, K] with K = {num_states}, got {log_b.shape}")
        if log_A.ndim == 3 and log_A.shape[0] != log_b.shape[0] - 1:
            raise ValueError(
                f"time-varying log_A must hold n - 1 = {log_b.shape[0] - 1} matrices, got {log_A.shape[0]}"
            )
        if np.isnan(log_b).any() or np.isposinf(log_b).any():
            bad = np.argwhere(np.isnan(log_b) | np.isposinf(log_b))[0]
            raise ValueError(f"log_b contains NaN or +inf at frame {bad[0]}, state {bad[1]}")
        dead = np.flatnonzero(np.all(np.isneginf(log_b), axis=1))
        if dead.size:
            raise ValueError(f"log_b is -inf for every state at frame {dead[0]} (an impossible observation)")
