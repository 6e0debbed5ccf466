"""Sequence data sets: Markov chains of labelled images, and the user's own sequences in ``.npz`` files.

Convention: images ``[N, n, H, W, C]`` float32 in [−1, 1], mask ``[N, n]`` bool (True = valid frame;
padding only at the end), labels ``[N, n]`` int32 (−1 = unknown or padding). Padding frames hold
images 0 and labels −1. Transition matrices follow the HMM convention A[i, j] = p(x_{l+1} = j | x_l = i).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from hmdm_jax.data.images import (
    IMAGE_CHANNELS,
    ImageDataset,
    _scalar_int,
    check_labels,
    read_npz,
    resolve_num_classes,
    unit_images_to_model_range,
)

__all__ = [
    "check_sequence_dataset", "flatten_frames", "load_sequences_npz", "markov_sequences",
    "save_sequences_npz", "SequenceDataset", "SEQUENCES_NPZ_KEYS", "TRANSITION_KINDS",
    "transition_matrix", "validate_transition_matrix",
]

TRANSITION_KINDS = ("sticky", "cyclic", "dirichlet")
SEQUENCES_NPZ_KEYS = ("images", "lengths", "labels", "num_classes")
_PROB_ATOL = 1e-6  # tolerance on probabilities summing to one


class SequenceDataset(NamedTuple):
    """A set of (possibly variable-length, possibly labelled) image sequences.

    Attributes:
      images: ``[N, n, H, W, C]`` float32 in [−1, 1]; padding frames are 0.
      mask: ``[N, n]`` bool, True = valid frame; each row is a prefix of Trues (padding at the end).
      labels: ``[N, n]`` int32 in 0..K−1, −1 = unknown or padding.
      num_classes: K (0 when unknown).
    """

    images: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    num_classes: int


# ---------------------------------------------------------------------------------------------------
# Transition matrices.


def transition_matrix(kind: str, num_classes: int, *, stay: float = 0.8, rng=None,
                      concentration: float = 1.0) -> np.ndarray:
    """A ``[K, K]`` row-stochastic transition matrix, A[i, j] = p(x_{l+1} = j | x_l = i).

    Args:
      kind: ``"sticky"``: A[k, k] = stay, the rest 1 − stay spread uniformly over the other K − 1 states.
        ``"cyclic"`` ("next digit"): A[k, (k + 1) mod K] = stay, the rest spread uniformly over the other
        K − 1 states (k itself included). ``"dirichlet"``: every row drawn from Dirichlet(concentration·1).
        Anything else is read as the path of a ``.npy`` file holding a ``[K, K]`` matrix (validated).
      num_classes: K ≥ 2.
      stay: the favoured probability (sticky: of staying; cyclic: of moving to k + 1), in [0, 1].
      rng: int seed or ``np.random.Generator``; required by ``"dirichlet"`` only.
      concentration: Dirichlet concentration > 0 (small = peaked rows).

    Returns:
      float64 ``[K, K]``, non-negative, rows summing to 1.
    """
    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"a transition matrix needs num_classes ≥ 2, got {num_classes}")
    if kind in ("sticky", "cyclic"):
        if not 0.0 <= stay <= 1.0:
            raise ValueError(f"stay must be a probability in [0, 1], got {stay}")
        matrix = np.full((num_classes, num_classes), (1.0 - stay) / (num_classes - 1))
        states = np.arange(num_classes)
        targets = states if kind == "sticky" else (states + 1) % num_classes
        matrix[states, targets] = stay
        return matrix
    if kind == "dirichlet":
        if rng is None:
            raise ValueError("transition_matrix('dirichlet', ...) needs rng (an int seed or a Generator)")
        if not concentration > 0:
            raise ValueError(f"concentration must be > 0, got {concentration}")
        return np.random.default_rng(rng).dirichlet(np.full(num_classes, float(concentration)),
                                                    size=num_classes)
    path = os.fspath(kind)
    if not (path.endswith(".npy") or os.path.exists(path)):
        raise ValueError(f"unknown transition kind {kind!r}: use one of {list(TRANSITION_KINDS)} "
                         "or the path of a .npy file holding a [K, K] matrix")
    if not os.path.exists(path):
        raise FileNotFoundError(f"transition matrix file {path} does not exist")
    try:
        matrix = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"cannot read {path} as a .npy array: {err}") from err
    return validate_transition_matrix(matrix, num_classes, what=f"transition matrix in {path}")


def validate_transition_matrix(matrix, num_classes: int, what: str = "transition matrix") -> np.ndarray:
    """Checks a ``[K, K]`` transition matrix (square, K matches, finite, ≥ 0, rows sum to 1).

    Returns:
      float64 copy with each row divided by its sum (removes rounding within the tolerance 1e-6).
    """
    matrix = np.asarray(matrix)
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise ValueError(f"{what} has dtype {matrix.dtype}; expected floats")
    matrix = matrix.astype(np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{what} must be square [K, K], got shape {matrix.shape}")
    if matrix.shape[0] != num_classes:
        raise ValueError(f"{what} is {matrix.shape[0]}×{matrix.shape[0]} but num_classes is {num_classes}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{what} contains NaN/inf")
    if np.any(matrix < 0):
        raise ValueError(f"{what} has negative entries (min {matrix.min():.4g})")
    sums = matrix.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _PROB_ATOL)
    if bad.size:
        raise ValueError(f"rows of {what} must sum to 1; row {bad[0]} sums to {sums[bad[0]]:.6g}")
    return matrix / sums[:, None]


def _validate_initial(initial, num_classes: int) -> np.ndarray:
    if initial is None:
        return np.full(num_classes, 1.0 / num_classes)
    initial = np.asarray(initial, dtype=np.float64)
    if initial.shape != (num_classes,):
        raise ValueError(f"initial distribution must have shape [{num_classes}], got {initial.shape}")
    if not np.all(np.isfinite(initial)) or np.any(initial < 0):
        raise ValueError("initial distribution must be finite and non-negative")
    if abs(initial.sum() - 1.0) > _PROB_ATOL:
        raise ValueError(f"initial distribution must sum to 1, sums to {initial.sum():.6g}")
    return initial / initial.sum()


# ---------------------------------------------------------------------------------------------------
# Markov sequences of images.


def markov_sequences(seed_or_rng, pool: ImageDataset, initial, transition, num_sequences: int,
                     length) -> SequenceDataset:
    """Samples label sequences from a Markov chain and fills each frame with a pool image of that label.

    Labels: x_1 ~ initial, x_{l+1} ~ transition[x_l]. Images: for each class, the frames that need it
    take the class's pool images in a random order, without replacement until the class is used up,
    then another random pass (so repeats only happen once a class has fewer images than frames).

    Args:
      seed_or_rng: int seed or ``np.random.Generator``; a fixed seed gives an identical data set.
      pool: labelled images; K = pool.num_classes. Every state the chain can reach must have images.
      initial: ``[K]`` probabilities of x_1 (None = uniform).
      transition: ``[K, K]``, A[i, j] = p(x_{l+1} = j | x_l = i) (see :func:`transition_matrix`).
      num_sequences: N ≥ 1.
      length: n (every sequence n frames) or ``(min, max)``: lengths uniform in min..max inclusive,
        padded at the end to max (mask False, labels −1, images 0).

    Returns:
      SequenceDataset with images ``[N, n_max, H, W, C]``, mask, labels (the chain's states), K.
    """
    rng = np.random.default_rng(seed_or_rng)
    num_classes = int(pool.num_classes)
    if num_classes < 1:
        raise ValueError("the pool must declare num_classes ≥ 1 (it has no classes)")
    initial = _validate_initial(initial, num_classes)
    transition = validate_transition_matrix(transition, num_classes)
    if int(num_sequences) < 1:
        raise ValueError(f"num_sequences must be ≥ 1, got {num_sequences}")
    num_sequences = int(num_sequences)
    min_length, max_length = _parse_length(length)
    pool_labels = np.asarray(pool.labels)
    class_members = [np.flatnonzero(pool_labels == k) for k in range(num_classes)]
    reachable = _reachable_states(initial, transition)
    empty = [k for k in np.flatnonzero(reachable) if class_members[k].size == 0]
    if empty:
        raise ValueError(f"the chain can reach classes {empty} but the pool has no images of them")

    lengths = rng.integers(min_length, max_length + 1, size=num_sequences)
    mask = np.arange(max_length)[None, :] < lengths[:, None]
    states = np.empty((num_sequences, max_length), np.int64)
    states[:, 0] = _sample_rows(rng, np.broadcast_to(initial, (num_sequences, num_classes)))
    for step in range(1, max_length):
        states[:, step] = _sample_rows(rng, transition[states[:, step - 1]])
    labels = np.where(mask, states, -1).astype(np.int32)

    source = np.full((num_sequences, max_length), -1, np.int64)  # pool index of every valid frame
    for k in range(num_classes):
        frames = np.flatnonzero(labels.ravel() == k)  # row-major order: deterministic
        if frames.size == 0:
            continue
        members = class_members[k]
        passes = -(-frames.size // members.size)
        draws = np.concatenate([rng.permutation(members) for _ in range(passes)])[: frames.size]
        source.ravel()[frames] = draws
    pool_images = np.asarray(pool.images, np.float32)
    images = np.zeros((num_sequences, max_length) + pool_images.shape[1:], np.float32)
    images[mask] = pool_images[source[mask]]
    return SequenceDataset(images, mask, labels, num_classes)


def _parse_length(length) -> tuple[int, int]:
    if isinstance(length, (int, np.integer)):
        low = high = int(length)
    else:
        try:
            low, high = (int(v) for v in length)
        except (TypeError, ValueError) as err:
            raise ValueError(f"length must be an int or a (min, max) pair, got {length!r}") from err
    if not 1 <= low <= high:
        raise ValueError(f"lengths must satisfy 1 ≤ min ≤ max, got {length!r}")
    return low, high


def _sample_rows(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of ``probs`` [M, K] by inverse CDF."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    # u < cdf[-1] always; the clip guards the (measure-zero) float edge.
    return np.minimum((cdf <= u[:, None]).sum(axis=1), probs.shape[1] - 1)


def _reachable_states(initial: np.ndarray, transition: np.ndarray) -> np.ndarray:
    reachable = initial > 0
    while True:
        grown = reachable | (transition[reachable] > 0).any(axis=0)
        if np.array_equal(grown, reachable):
            return reachable
        reachable = grown


# ---------------------------------------------------------------------------------------------------
# Users' sequence files.


def load_sequences_npz(path, num_classes: int | None = None) -> SequenceDataset:
    """The user's own sequences from an ``.npz`` file.

    File keys: ``images`` ``[N, n, H, W]`` or ``[N, n, H, W, C]`` (C = 1 or 3), uint8 0..255 or float in
    [0, 1]; optional ``lengths`` ``[N]`` int in 1..n (frames past a length are padding; default n);
    optional ``labels`` ``[N, n]`` int in −1..K−1 (−1 = unknown; ignored on padding frames); optional
    scalar ``num_classes``. Any other key is an error.

    Args:
      path: the ``.npz`` file.
      num_classes: K; overrides the file's ``num_classes``; default max label + 1 (0 without labels).

    Returns:
      SequenceDataset (padding frames set to images 0, labels −1).

    Raises:
      FileNotFoundError: no such file. ValueError: missing key, wrong rank or channels, wrong dtype,
      NaN/inf, float outside [0, 1], length outside 1..n, label < −1 or ≥ K.
    """
    arrays = read_npz(path, SEQUENCES_NPZ_KEYS, required=("images",))
    raw = arrays["images"]
    images = raw[..., None] if raw.ndim == 4 else raw
    if images.ndim != 5:
        raise ValueError(f"images in {path} have rank {raw.ndim} (shape {raw.shape}); "
                         "expected [N, n, H, W] or [N, n, H, W, C]")
    if images.shape[-1] not in IMAGE_CHANNELS:
        raise ValueError(f"images in {path} have {images.shape[-1]} channels (shape {images.shape}); "
                         "expected 1 or 3")
    num_sequences, max_length = images.shape[:2]
    if num_sequences == 0 or max_length == 0:
        raise ValueError(f"images in {path} are empty (shape {images.shape})")
    scaled = unit_images_to_model_range(images, f"images in {path}")

    if "lengths" in arrays:
        lengths = np.asarray(arrays["lengths"])
        if lengths.shape != (num_sequences,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"lengths in {path} must be an integer [{num_sequences}] array, got "
                             f"{lengths.dtype} of shape {lengths.shape}")
        if lengths.min() < 1 or lengths.max() > max_length:
            raise ValueError(f"lengths in {path} must lie in 1..{max_length} (the frame axis), got "
                             f"values in {int(lengths.min())}..{int(lengths.max())}")
    else:
        lengths = np.full((num_sequences,), max_length)
    mask = np.arange(max_length)[None, :] < lengths[:, None]

    if "labels" in arrays:
        labels = check_labels(arrays["labels"], (num_sequences, max_length), None, f"labels in {path}")
        labels = np.where(mask, labels, -1).astype(np.int32)
    else:
        labels = np.full((num_sequences, max_length), -1, np.int32)
    declared = num_classes if num_classes is not None else _scalar_int(arrays, "num_classes", path)
    k = resolve_num_classes(labels, declared, f"labels in {path}")
    scaled[~mask] = 0.0
    return SequenceDataset(scaled, mask, labels, k)


def check_sequence_dataset(dataset: SequenceDataset) -> None:
    """Raises ValueError when ``dataset`` breaks the :class:`SequenceDataset` convention."""
    images, mask, labels = (np.asarray(a) for a in (dataset.images, dataset.mask, dataset.labels))
    if images.ndim != 5 or images.shape[-1] not in IMAGE_CHANNELS:
        raise ValueError(f"images must be [N, n, H, W, C] with C in {IMAGE_CHANNELS}, got {images.shape}")
    if mask.shape != images.shape[:2] or mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool {images.shape[:2]}, got {mask.dtype} {mask.shape}")
    lengths = mask.sum(axis=1)
    if not np.array_equal(mask, np.arange(mask.shape[1])[None, :] < lengths[:, None]):
        raise ValueError("mask rows must be a prefix of Trues (padding only at the end)")
    if lengths.size and lengths.min() < 1:
        raise ValueError("every sequence needs at least one valid frame")
    check_labels(labels, images.shape[:2], dataset.num_classes or None, "labels")
    if not np.all(np.isfinite(images)) or images.size and (images.min() < -1 or images.max() > 1):
        raise ValueError("images must be finite and lie in [-1, 1]")


def save_sequences_npz(path, dataset: SequenceDataset) -> None:
    """Writes ``dataset`` in the format :func:`load_sequences_npz` reads (the exact path given).

    Stored keys: ``images`` float32 ``[N, n, H, W, C]`` in [0, 1], ``lengths`` ``[N]``, ``labels``
    ``[N, n]`` int32, ``num_classes``.
    """
    check_sequence_dataset(dataset)
    images = (np.asarray(dataset.images, np.float32) + np.float32(1.0)) / np.float32(2.0)
    with open(path, "wb") as handle:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(handle, images=np.clip(images, 0.0, 1.0),
                 lengths=np.asarray(dataset.mask).sum(axis=1).astype(np.int32),
                 labels=np.asarray(dataset.labels, np.int32),
                 num_classes=np.int32(dataset.num_classes))


def flatten_frames(dataset: SequenceDataset) -> ImageDataset:
    """The valid frames of every sequence, in row-major (sequence, position) order.

    Returns:
      ImageDataset with images ``[M, H, W, C]`` and labels ``[M]``, M = mask.sum(), name ``"frames"``.
    """
    mask = np.asarray(dataset.mask, bool)
    return ImageDataset(np.asarray(dataset.images)[mask], np.asarray(dataset.labels)[mask],
                        dataset.num_classes, "frames")
