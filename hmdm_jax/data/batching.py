"""Batching and per-host sharding of in-memory data sets (ImageDataset, SequenceDataset or arrays).

A data set here is either one NumPy array (examples on axis 0) or a NamedTuple whose array fields share
their leading axis N; other fields (num_classes, name) are carried along unchanged.
"""
from __future__ import annotations

from typing import Iterator, TypeVar

import numpy as np

__all__ = [
    "iterate_batches", "num_examples", "shard_for_process", "take",
]

Data = TypeVar("Data")


def num_examples(data) -> int:
    """N, the shared leading size of the array fields of ``data`` (or of the array itself)."""
    if isinstance(data, np.ndarray):
        return data.shape[0]
    sizes = {np.shape(value)[0] for value in data if isinstance(value, np.ndarray)}
    if len(sizes) != 1:
        raise ValueError(f"the array fields of {type(data).__name__} must share one leading size, got {sizes}")
    return sizes.pop()


def take(data: Data, index) -> Data:
    """``data`` restricted to examples ``index`` (an int array or a slice) along axis 0."""
    if isinstance(data, np.ndarray):
        return data[index]
    return type(data)(*(value[index] if isinstance(value, np.ndarray) else value for value in data))


def iterate_batches(data: Data, batch_size: int, *, seed=None, drop_remainder: bool = False) -> Iterator[Data]:
    """One pass over ``data`` in batches of ``batch_size`` examples.

    Args:
      data: an array or a data set NamedTuple (see module docstring).
      batch_size: examples per batch, ≥ 1.
      seed: None = in order; an int or ``np.random.Generator`` = a random permutation (the same seed
        gives the same order; use a different seed per epoch).
      drop_remainder: drop the last batch when it is smaller than ``batch_size`` (fixed shapes for jit).

    Yields:
      Batches of the same type as ``data``, every array field cut to ``[B, ...]``.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    batch_size = int(batch_size)
    total = num_examples(data)
    order = np.arange(total) if seed is None else np.random.default_rng(seed).permutation(total)
    stop = total - total % batch_size if drop_remainder else total
    for start in range(0, stop, batch_size):
        yield take(data, order[start:start + batch_size])


def shard_for_process(data: Data, process_index: int, process_count: int, *,
                      drop_remainder: bool = False) -> Data:
    """The contiguous part of ``data`` that host ``process_index`` of ``process_count`` should use.

    Shards are contiguous and partition the examples, sizes differing by at most one. With
    ``drop_remainder`` every shard has exactly N // process_count examples (the last N % P are dropped),
    which keeps the number of steps equal on every host.

    Args:
      data: an array or a data set NamedTuple.
      process_index: this host's index (``jax.process_index()``), 0..process_count − 1.
      process_count: number of hosts (``jax.process_count()``), ≥ 1.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 ≤ process_index < process_count, got {process_index}, {process_count}")
    total = num_examples(data)
    if drop_remainder:
        size = total // process_count
        start, stop = process_index * size, (process_index + 1) * size
    else:
        start, stop = process_index * total // process_count, (process_index + 1) * total // process_count
    return take(data, slice(start, stop))
