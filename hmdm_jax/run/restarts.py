"""Restarts chosen by the model's own bound: the pieces the loop composes (``restarts`` in the config).

EM from one warm start settles in one local optimum; on some chains that optimum has two states sharing a
digit and one state holding two, which no later move undoes reliably (RESULTS.md, issue 18). A few short
runs from different starts, compared on training sequences none of them trained on, choose the optimum
with the model's own criterion, no labels: by default the chain's share of the HMDM's likelihood bound
(:class:`Scores`), or the bound itself. Held out, because a bound on the sequences a candidate trained on
rewards fitting them rather than finding the states.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hmdm_jax import em, emission, hmm
from hmdm_jax.run.batches import Clamp, TrainData
from hmdm_jax.run.config import HELD, RunConfig
from hmdm_jax.run.parts import RunParts
from hmdm_jax.state import TrainState

__all__ = ["Scores", "Split", "candidate_config", "candidate_seed", "criterion_per_sequence", "heldout_scores", "is_held",
           "per_frame", "sequence_scores", "split_sequences", "stationary_log_distribution", "widen_clamp"]

SEED_STRIDE = 0x9E3779B1  # candidate r > 0 runs with seed + r * stride (mod 2**32): distinct, far apart streams
BOUND_STREAM = 0xB0B0  # folded into the run's eval stream: the ELBO draws of the bound, one key for all candidates


class Split(NamedTuple):
    """The sequences the candidates train on and the held-out share they are compared on.

    Attributes:
      train_index: ``[N − m]`` indices into the full training data.
      train: the candidates' training data; heldout: the ``m`` held-out sequences.
    """

    train_index: np.ndarray
    train: TrainData
    heldout: TrainData


def _take(data: TrainData, idx: np.ndarray) -> TrainData:
    return TrainData(data.images[idx], data.labels[idx], data.observed[idx], None if data.mask is None else data.mask[idx])


def split_sequences(config: RunConfig, data: TrainData) -> Split:
    """A seeded share ``restarts.heldout_fraction`` of the training sequences (at least one, and enough left for
    a batch) held out for the choice; a ``ValueError`` when there are too few sequences for both."""
    n = len(data.images)
    held = max(1, int(round(config.restarts.heldout_fraction * n)))
    if n - held < config.loop.batch_size:
        raise ValueError(f"restarts hold out {held} of the {n} training sequences, which leaves fewer than "
                         f"loop.batch_size = {config.loop.batch_size} to train the candidates on: lower "
                         f"restarts.heldout_fraction or the batch size, or set restarts.count=1")
    perm = np.random.default_rng([config.seed, n, BOUND_STREAM]).permutation(n)
    train_index, heldout_index = np.sort(perm[held:]), np.sort(perm[:held])
    return Split(train_index, _take(data, train_index), _take(data, heldout_index))


def candidate_seed(seed: int, r: int) -> int:
    """The seed of candidate ``r``: the run's own for r = 0."""
    return (seed + r * SEED_STRIDE) % 2**32


def is_held(config: RunConfig, r: int) -> bool:
    """Whether candidate ``r`` keeps its warm start clamped for all its steps (a ``":held"`` method)."""
    methods = config.restarts.methods
    return bool(methods) and methods[r % len(methods)].endswith(HELD)


def candidate_config(config: RunConfig, r: int) -> RunConfig:
    """Candidate ``r``'s config: its seed and warm start (``restarts.methods[r % len]``; a held one lasts all
    the candidate's steps), no restarts or snapshots of its own."""
    methods = config.restarts.methods
    ws = config.warm_start
    if methods:
        ws = dataclasses.replace(ws, method=methods[r % len(methods)].removesuffix(HELD))
    if is_held(config, r):
        ws = dataclasses.replace(ws, steps=config.restarts.candidate_steps(config.loop.train_steps))
    return config.replace(seed=candidate_seed(config.seed, r), warm_start=ws,
                          restarts=dataclasses.replace(config.restarts, count=1, snapshot_every=0))


class Scores(NamedTuple):
    """A candidate's scores on the held-out sequences, in nats per valid frame (higher is better), from ELBO
    emissions with the Gaussian decoder (a density of the frames as continuous values; the discretized
    bound of ``hmdm.log_likelihood_bound`` differs from it by the decoder term alone).

    Attributes:
      bound: the HMDM's likelihood bound, log p(y_1..y_n) through the learned π and A.
      framewise: the same ELBO emissions with the frames independent, each state drawn from the chain's
        stationary distribution: the bound of the frame-wise mixture the HMDM contains.
      chain: ``bound − framewise``, what the learned chain explains beyond the frames. A state that holds
        half of a digit, or two digits, makes the states less predictable from their neighbours and lowers
        it, while the network's density quality, which dominates ``bound`` and differs between candidates
        by more than a clustering's worth, largely cancels.
    """

    bound: float
    framewise: float
    chain: float


_SCORERS: dict = {}


def stationary_log_distribution(log_A: np.ndarray) -> np.ndarray:
    """log π with π A = π (least squares with Σπ = 1, clipped to positive): the chain's long-run state shares."""
    A = np.exp(np.asarray(log_A, np.float64))
    k = len(A)
    system = np.vstack([A.T - np.eye(k), np.ones((1, k))])
    pi, *_ = np.linalg.lstsq(system, np.r_[np.zeros(k), 1.0], rcond=None)
    pi = np.clip(pi, 1e-12, None)
    return np.log(pi / pi.sum()).astype(np.float32)


def heldout_scores(config: RunConfig, parts: RunParts, state: TrainState, heldout: TrainData, key: jax.Array) -> Scores:
    """A candidate's :class:`Scores` on ``heldout`` (EMA parameters, the state's π and A, ``restarts.num_t``
    ELBO terms; not finite when the candidate diverged). Every candidate is scored with the same ``key``,
    so their differences are not the ELBO draws' noise, and both bounds use the same emissions."""
    return per_frame(*sequence_scores(config, parts, state, heldout, key))


def per_frame(bound: np.ndarray, framewise: np.ndarray, frames: np.ndarray) -> Scores:
    """:class:`Scores` per valid frame from :func:`sequence_scores`' per-sequence sums."""
    total = max(int(frames.sum()), 1)
    bound, framewise = bound.sum() / total, framewise.sum() / total
    return Scores(float(bound), float(framewise), float(bound - framewise))


def criterion_per_sequence(config: RunConfig, bound: np.ndarray, framewise: np.ndarray) -> np.ndarray:
    """``restarts.criterion`` per sequence (nats summed over its frames) from :func:`sequence_scores`' bounds."""
    return bound - framewise if config.restarts.criterion == "chain" else bound


def sequence_scores(config: RunConfig, parts: RunParts, state: TrainState, data: TrainData, key: jax.Array
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence of ``data``: the HMDM bound and the frame-wise bound (nats, summed over the sequence's valid
    frames, as in :class:`Scores`) and its number of valid frames; float64 arrays ``[num_sequences]``. A
    paired comparison of two states scored with the same ``key`` reads its noise from their spread."""
    num_t = config.restarts.num_t
    cache_key = (id(parts.eps_fn), num_t)
    if cache_key not in _SCORERS:
        def score(params, schedule, log_pi, log_A, log_stationary, images, mask, key):
            batch, length = images.shape[:2]
            frames = images.reshape((batch * length,) + images.shape[2:])
            elbo = emission.log_emission(parts.eps_fn, params, schedule, frames, em.frame_keys(key, batch * length),
                                         log_pi.shape[0], estimator="elbo", num_t=num_t).reshape(batch, length, -1)
            forward = jax.vmap(hmm.forward_filter, (None, None, 0, 0))
            iid_A = jnp.broadcast_to(log_stationary, log_A.shape)  # every row the stationary distribution
            return (forward(log_pi, log_A, elbo, mask).log_marginal,
                    forward(log_stationary, iid_A, elbo, mask).log_marginal)
        _SCORERS[cache_key] = jax.jit(score)
    fn = _SCORERS[cache_key]
    if data.mask is None:  # the mixture's images: sequences of one frame, whose bound is log Σ_k π_k b_k
        data = TrainData(data.images[:, None], data.labels[:, None], data.observed[:, None],
                         np.ones((len(data.images), 1), bool))
    log_stationary = stationary_log_distribution(state.log_A)
    bound, framewise, batch = [], [], config.evaluation.batch_size
    for start in range(0, len(data.images), batch):
        sl = slice(start, start + batch)
        b, f = fn(state.ema_params, parts.schedule, state.log_pi, state.log_A, log_stationary, data.images[sl],
                  data.mask[sl], jax.random.fold_in(key, start))
        bound.append(np.asarray(b, np.float64))
        framewise.append(np.asarray(f, np.float64))
    return np.concatenate(bound), np.concatenate(framewise), np.asarray(data.mask, bool).sum(axis=1).astype(np.float64)


def widen_clamp(clamp: Clamp | None, train_index: np.ndarray, full_shape: tuple[int, ...]) -> Clamp | None:
    """A candidate's clamp (shaped like its share of the sequences) onto all of them; the held-out ones free."""
    if clamp is None:
        return None
    labels = np.full(full_shape, -1, np.int32)
    labels[train_index] = clamp.labels
    return Clamp(clamp.until, labels)
