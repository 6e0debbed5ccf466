"""Restarts chosen by the model's own bound: the pieces the loop composes (``restarts`` in the config).

EM from one warm start settles in one local optimum; on some chains that optimum has two states sharing a
digit and one state holding two, which no later move undoes reliably (RESULTS.md, issue 18). A few short
runs from different starts, compared by the HMDM's likelihood bound on training sequences none of them
trained on, choose the optimum with the model's own criterion: no labels, and the same criterion as the
classical anchor's restarts (training likelihood), but held out, because a bound on the sequences a
candidate trained on rewards fitting them rather than finding the states.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import numpy as np

from hmdm_jax import hmdm
from hmdm_jax.run.batches import Clamp, TrainData
from hmdm_jax.run.config import RunConfig
from hmdm_jax.run.parts import RunParts
from hmdm_jax.state import TrainState

__all__ = ["Split", "candidate_config", "candidate_seed", "heldout_bound", "split_sequences", "widen_clamp"]

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


def candidate_config(config: RunConfig, r: int) -> RunConfig:
    """Candidate ``r``'s config: its seed and warm start (``restarts.methods[r % len]``), no restarts of its own."""
    methods = config.restarts.methods
    ws = config.warm_start if not methods else dataclasses.replace(config.warm_start, method=methods[r % len(methods)])
    return config.replace(seed=candidate_seed(config.seed, r), warm_start=ws,
                          restarts=dataclasses.replace(config.restarts, count=1))


_BOUNDS: dict = {}


def heldout_bound(config: RunConfig, parts: RunParts, state: TrainState, heldout: TrainData, key: jax.Array) -> float:
    """The HMDM's likelihood bound on ``heldout`` in nats per valid frame (EMA parameters, the state's π and
    A, ``restarts.num_t`` ELBO terms): higher is better; not finite when the candidate diverged. Every
    candidate is scored with the same ``key``, so their difference is not the ELBO draws' noise."""
    num_t = config.restarts.num_t
    cache_key = (id(parts.eps_fn), num_t)
    if cache_key not in _BOUNDS:
        _BOUNDS[cache_key] = jax.jit(lambda params, schedule, log_pi, log_A, images, mask, key: hmdm.log_likelihood_bound(
            parts.eps_fn, params, schedule, log_pi, log_A, images, mask, key, num_t=num_t))
    fn = _BOUNDS[cache_key]
    total, batch = 0.0, config.evaluation.batch_size
    for start in range(0, len(heldout.images), batch):
        sl = slice(start, start + batch)
        bound = fn(state.ema_params, parts.schedule, state.log_pi, state.log_A, heldout.images[sl], heldout.mask[sl],
                   jax.random.fold_in(key, start))
        total += float(np.sum(np.asarray(bound, np.float64)))
    return total / max(int(heldout.mask.sum()), 1)


def widen_clamp(clamp: Clamp | None, train_index: np.ndarray, full_shape: tuple[int, ...]) -> Clamp | None:
    """A candidate's clamp (shaped like its share of the sequences) onto all of them; the held-out ones free."""
    if clamp is None:
        return None
    labels = np.full(full_shape, -1, np.int32)
    labels[train_index] = clamp.labels
    return Clamp(clamp.until, labels)
