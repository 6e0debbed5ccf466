"""Training data in memory, the clamped labels of each phase, and deterministic batches.

A batch is a function of (seed, step) only, so resume is exact and every host of a multi-host run agrees
on the global batch while reading just its share.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from hmdm_jax import matching, warm_start
from hmdm_jax.run.config import RunConfig

__all__ = ["Clamp", "TrainData", "batch_indices", "check_data", "describe_start", "make_batch", "phase_labels",
           "steps_per_epoch"]

OBSERVED_BATCH_STREAM = 0x0B5  # with seed and step, seeds the draw of a batch's observed items


class TrainData(NamedTuple):
    """Training data in memory.

    Attributes:
      images: ``[N, *event]`` (mixture) or ``[N, n, *event]`` (HMDM), float32 in [−1, 1].
      labels: ``[N]`` / ``[N, n]`` int32 true labels for evaluation (−1 = unknown or padding).
      observed: ``[N]`` / ``[N, n]`` bool, the labels that are clamped in training.
      mask: ``[N, n]`` bool valid frames (HMDM), None for the mixture.
    """

    images: np.ndarray
    labels: np.ndarray
    observed: np.ndarray
    mask: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        """``labels``-shaped bool: the real (unpadded) frames."""
        return np.ones(self.labels.shape, bool) if self.mask is None else self.mask

    @property
    def clamped(self) -> np.ndarray:
        """The observed labels, −1 elsewhere."""
        return np.where(self.observed, self.labels, -1).astype(np.int32)


class Clamp(NamedTuple):
    """Labels clamped in training until step ``until`` (a hook's decision, e.g. re-seeded states)."""

    until: int
    labels: np.ndarray  # shaped like TrainData.labels, −1 = free


def check_data(config: RunConfig, data: TrainData) -> None:
    """A ``ValueError`` naming the problem when ``data`` cannot train ``config`` (before anything is written)."""
    sequences = config.model_type == "hmdm"
    lead = 2 if sequences else 1
    if data.images.ndim != lead + len(config.event_shape) or tuple(data.images.shape[lead:]) != config.event_shape:
        what = "[N, n, *event]" if sequences else "[N, *event]"
        raise ValueError(f"{config.model_type} needs images {what} with event {config.event_shape}, "
                         f"got {data.images.shape}")
    if sequences and (data.mask is None or data.mask.shape != data.images.shape[:2]):
        raise ValueError("HMDM data need a mask [N, n] of valid frames")
    if data.labels.shape != data.images.shape[:lead] or data.observed.shape != data.labels.shape:
        raise ValueError(f"labels {data.labels.shape} and observed {data.observed.shape} must be shaped "
                         f"{data.images.shape[:lead]}")
    if np.any(data.clamped >= config.num_classes):
        raise ValueError(f"an observed label is >= K = {config.num_classes}")
    if config.loop.batch_size > len(data.images):
        raise ValueError(f"loop.batch_size {config.loop.batch_size} exceeds the {len(data.images)} training "
                         f"{'sequences' if sequences else 'images'}")


def steps_per_epoch(config: RunConfig, num_items: int) -> int:
    return num_items // config.loop.batch_size


def batch_indices(seed: int, step: int, num_items: int, batch_size: int) -> np.ndarray:
    """The item indices of the batch at ``step``: a fresh permutation per epoch, a function of (seed, step)."""
    if batch_size > num_items:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_items} training items")
    epoch, within = divmod(step, num_items // batch_size)
    perm = np.random.default_rng([seed, epoch]).permutation(num_items)
    return perm[within * batch_size : (within + 1) * batch_size]


def phase_labels(config: RunConfig, data: TrainData) -> tuple[np.ndarray, dict]:
    """The labels fed to the step (−1 = free): ``[2, *labels.shape]``, row 0 during the warm start (observed
    labels plus the warm start's assignment on the rest), row 1 after (observed labels only); and the warm
    start's record of what it decided (``{}`` for none or a clustering; :func:`describe_start` says it)."""
    clamped = data.clamped
    if not config.warm_start.active:
        return np.stack([clamped, clamped]), {}
    valid, k, method = data.valid, config.num_classes, config.warm_start.method
    clusters = np.full(data.labels.shape, -1, np.int32)
    record = {}
    if method in warm_start.SEQUENCE_METHODS:
        clusters, record = warm_start.gaussian_hmm_labels(data.images, valid, k, seed=config.seed)
    elif method == "mixture":
        from hmdm_jax.run import mixture_start  # it trains with run.loop, which imports this module
        clusters, record = mixture_start.mixture_labels(config, data)
    else:
        # with observed labels of every class, k-means starts from their class means (seeded k-means)
        clusters[valid] = warm_start.cluster_labels(data.images[valid], k, method, seed=config.seed,
                                                    seed_labels=clamped[valid])
    observed = valid & (clamped >= 0)
    if observed.any():
        # observed labels clamp state k to label k: renumber the clusters one-to-one onto them, otherwise
        # the warm start trains a state on one cluster and another label
        renumber = matching.best_matching(clamped[observed], clusters[observed], k, k)
        clusters[valid] = renumber[clusters[valid]]
    return np.stack([np.where(clamped >= 0, clamped, clusters), clamped]), record


def describe_start(record: dict) -> str:
    """One log line saying what a warm start decided and why (its record from :func:`phase_labels`)."""
    if record.get("method") == "mixture":
        band = record.get("t_range")
        return (f"warm start: a frame-wise diffusion mixture, {record['steps']} steps on {record['frames']} frames "
                f"(its start {record['start']}" + (f", band {band[0]:g}–{band[1]:g} of T" if band else "") +
                f"), {record['seconds']:.0f} s; state usage " + " ".join(f"{u:.2f}" for u in record["usage"]))
    return warm_start.describe(record)


def make_batch(config: RunConfig, data: TrainData, labels: np.ndarray, step: int, clamp: Clamp | None = None) -> dict:
    """The global batch at ``step`` (on several hosts, this host's contiguous share of it).

    ``labels`` is :func:`phase_labels`; an active ``clamp`` replaces them until its step.
    """
    idx = batch_indices(config.seed, step, len(data.images), config.loop.batch_size)
    num_observed = round(config.loop.observed_batch_fraction * config.loop.batch_size)
    items = np.flatnonzero(data.observed.reshape(len(data.observed), -1).any(axis=1)) if num_observed else []
    if len(items):
        rng = np.random.default_rng([config.seed, step, OBSERVED_BATCH_STREAM])
        idx = np.concatenate([idx[: len(idx) - num_observed],
                              rng.choice(items, num_observed, replace=num_observed > len(items))])
    if jax.process_count() > 1:
        idx = np.array_split(idx, jax.process_count())[jax.process_index()]
    if clamp is not None and step < clamp.until:
        batch_labels = clamp.labels[idx]
    else:
        batch_labels = labels[0 if step < config.warm_start.steps else 1][idx]
    batch = {"images": data.images[idx], "labels": batch_labels}
    if data.mask is not None:
        batch["mask"] = data.mask[idx]
    return batch
