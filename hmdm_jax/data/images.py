"""Labelled image datasets in the project's convention, and the checks shared by every loader.

Convention: images ``[N, H, W, C]`` float32 scaled to [−1, 1] with an explicit channel axis (C = 1 or
3), labels ``[N]`` int32 with −1 = unknown. Everything here is NumPy; nothing is put on a device.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "check_image_dataset", "check_labels", "IMAGE_CHANNELS", "ImageDataset", "IMAGES_NPZ_KEYS",
    "load_digits", "load_images_npz", "parse_classes", "PoolSplit", "read_npz", "resolve_num_classes",
    "select_classes", "split_images", "split_indices", "unit_images_to_model_range",
]

IMAGE_CHANNELS = (1, 3)
IMAGES_NPZ_KEYS = ("images", "labels", "num_classes")


class ImageDataset(NamedTuple):
    """A labelled image set.

    Attributes:
      images: ``[N, H, W, C]`` float32 in [−1, 1] (C = 1 or 3).
      labels: ``[N]`` int32 class indices in 0..num_classes−1, −1 = unknown.
      num_classes: K, the number of classes (0 when unknown: an unlabelled set with no declared K).
      name: a short human-readable description of where the data came from.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str


class PoolSplit(NamedTuple):
    """Two disjoint parts of one :class:`ImageDataset` (see :func:`split_images`).

    Attributes:
      train: the images used to build training sequences / fit models.
      heldout: the images kept apart for evaluation.
    """

    train: ImageDataset
    heldout: ImageDataset


# ---------------------------------------------------------------------------------------------------
# Shared validation and scaling (also used by the sequence and IDX loaders).


def unit_images_to_model_range(images: np.ndarray, what: str) -> np.ndarray:
    """Validates raw pixel values and maps them to float32 in [−1, 1].

    Args:
      images: any shape; uint8 in 0..255 (mapped by x / 127.5 − 1) or floating in [0, 1] (mapped by
        2x − 1). Other dtypes are rejected rather than guessed at.
      what: a name for the array used in error messages (e.g. ``"images in foo.npz"``).

    Returns:
      float32 array of the same shape in [−1, 1].
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return (images.astype(np.float32) / np.float32(127.5)) - np.float32(1.0)
    if np.issubdtype(images.dtype, np.floating):
        if not np.all(np.isfinite(images)):
            bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
            raise ValueError(f"{what} contain {bad} NaN/inf values")
        if images.size and (images.min() < 0.0 or images.max() > 1.0):
            raise ValueError(
                f"{what} are floating point with values in [{float(images.min()):.4g}, "
                f"{float(images.max()):.4g}]; float images must lie in [0, 1] (or store uint8 0..255)"
            )
        return images.astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    raise ValueError(
        f"{what} have dtype {images.dtype}; expected uint8 (0..255) or float (0..1) — "
        "convert with .astype(np.uint8) or scale to [0, 1] as float32"
    )


def check_labels(labels, shape: tuple, num_classes: int | None, what: str) -> np.ndarray:
    """Validates integer labels (−1 = unknown) and returns them as int32.

    Args:
      labels: integer array of exactly ``shape``.
      shape: the expected shape, e.g. ``(N,)`` or ``(N, n)``.
      num_classes: K; labels must be < K. None skips the upper check.
      what: a name for error messages.
    """
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise ValueError(f"{what} have shape {labels.shape}; expected {tuple(shape)}")
    if not np.issubdtype(labels.dtype, np.integer):  # bool is not an integer dtype here
        raise ValueError(f"{what} have dtype {labels.dtype}; expected an integer dtype (−1 = unknown)")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < -1:
            raise ValueError(f"{what} contain {low}; labels must be ≥ −1 (−1 = unknown)")
        if num_classes is not None and high >= num_classes:
            raise ValueError(f"{what} contain {high} but num_classes is {num_classes} (labels must be < K)")
    return labels.astype(np.int32)


def resolve_num_classes(labels: np.ndarray, declared: int | None, what: str) -> int:
    """K from an explicit value, else max label + 1, else 0 (unknown); checks labels < K."""
    max_label = int(labels.max()) if labels.size else -1
    if declared is None:
        return max_label + 1
    declared = int(declared)
    if declared < 1:
        raise ValueError(f"num_classes for {what} must be ≥ 1, got {declared}")
    if max_label >= declared:
        raise ValueError(f"{what} contain label {max_label} but num_classes is {declared}")
    return declared


def check_image_dataset(dataset: ImageDataset) -> None:
    """Raises ValueError when ``dataset`` breaks the :class:`ImageDataset` convention."""
    images, labels = np.asarray(dataset.images), np.asarray(dataset.labels)
    if images.ndim != 4 or images.shape[-1] not in IMAGE_CHANNELS:
        raise ValueError(f"images must be [N, H, W, C] with C in {IMAGE_CHANNELS}, got {images.shape}")
    check_labels(labels, (images.shape[0],), dataset.num_classes or None, "labels")


def _subset(dataset: ImageDataset, index: np.ndarray, suffix: str) -> ImageDataset:
    return ImageDataset(dataset.images[index], dataset.labels[index], dataset.num_classes,
                        f"{dataset.name}{suffix}")


# ---------------------------------------------------------------------------------------------------
# Loaders.


def load_digits() -> ImageDataset:
    """scikit-learn's bundled 8×8 handwritten digits (no download): the embedded default data set.

    Returns:
      ImageDataset with images ``[1797, 8, 8, 1]`` (pixel values 0..16 mapped by x / 8 − 1 to [−1, 1]),
      labels ``[1797]`` in 0..9, num_classes 10, name ``"digits"``.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = (bunch.images.astype(np.float32) / np.float32(8.0) - np.float32(1.0))[..., None]
    return ImageDataset(images, bunch.target.astype(np.int32), 10, "digits")


def load_images_npz(path, num_classes: int | None = None) -> ImageDataset:
    """The user's own images from an ``.npz`` file.

    File keys: ``images`` ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1 or 3), uint8 0..255 or float in
    [0, 1]; optional ``labels`` ``[N]`` int (−1 = unknown); optional scalar ``num_classes``. Any other
    key is an error (it is usually a misspelling).

    Args:
      path: the ``.npz`` file.
      num_classes: K; overrides the file's ``num_classes``. When neither is given, K = max label + 1
        (0 for a file without labels).

    Raises:
      FileNotFoundError: no such file. ValueError: anything malformed, with the reason.
    """
    arrays = read_npz(path, IMAGES_NPZ_KEYS + ("lengths",), required=("images",))
    shape = arrays["images"].shape
    sequence_labels = "labels" in arrays and np.ndim(arrays["labels"]) == 2
    if "lengths" in arrays or len(shape) == 5 or sequence_labels:
        raise ValueError(f"{path} holds sequences (images {shape}{', lengths' if 'lengths' in arrays else ''}"
                         f"{', labels [N, n]' if sequence_labels else ''}), not images: train it with "
                         f"experiments/hmdm.py, or give the mixture images [N, H, W(, C)]")
    if len(shape) == 4 and shape[-1] not in IMAGE_CHANNELS:
        # [N, H, W, C] with C not 1 or 3 is no image set; [N, n, H, W] sequences (the loaders' other layout) are
        raise ValueError(f"{path} looks like a sequence file: images {shape} read as [N, n, H, W] sequences of "
                         f"{shape[2]}x{shape[3]} frames (as images [N, H, W, C], its last axis would be {shape[-1]} "
                         f"colour channels, not 1 or 3); train sequences with experiments/hmdm.py, or give the "
                         f"mixture images [N, H, W(, C)]")
    what = f"images in {path}"
    images = arrays["images"]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{what} have rank {arrays['images'].ndim} (shape {arrays['images'].shape}); "
                         "expected [N, H, W] or [N, H, W, C]")
    if images.shape[-1] not in IMAGE_CHANNELS:
        raise ValueError(f"{what} have {images.shape[-1]} channels (shape {images.shape}); expected 1 or 3")
    if images.shape[0] == 0:
        raise ValueError(f"{what} are empty (N = 0)")
    scaled = unit_images_to_model_range(images, what)
    n = images.shape[0]
    labels = (check_labels(arrays["labels"], (n,), None, f"labels in {path}") if "labels" in arrays
              else np.full((n,), -1, np.int32))
    declared = num_classes if num_classes is not None else _scalar_int(arrays, "num_classes", path)
    k = resolve_num_classes(labels, declared, f"labels in {path}")
    return ImageDataset(scaled, labels, k, f"npz:{os.path.basename(str(path))}")


def read_npz(path, allowed: tuple, required: tuple) -> dict:
    """Reads every array of an ``.npz`` file into memory with clear errors (no pickles)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        magic = f.read(6)
    if not (magic.startswith(b"PK") or magic.startswith(b"\x93NUMPY")):
        raise ValueError(f"{path} is not an .npz file (an .npz is a zip archive of .npy arrays; "
                         f"write one with numpy.savez)")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:  # a pickle, a damaged archive: numpy raises several types
        raise ValueError(f"cannot read {path} as an .npz archive: {err}") from err
    if not hasattr(npz, "files"):
        raise ValueError(f"{path} holds a single array, not an .npz archive of named arrays")
    with npz:
        try:
            arrays = {key: npz[key] for key in npz.files}
        except Exception as err:  # object arrays (need pickles), truncated members
            raise ValueError(f"cannot read the arrays of {path} (object arrays are not allowed): {err}") from err
    for key in required:
        if key not in arrays:
            raise ValueError(f"{path} has no '{key}' array (keys: {sorted(arrays)}; expected {list(allowed)})")
    unexpected = sorted(set(arrays) - set(allowed))
    if unexpected:
        raise ValueError(f"{path} has unexpected keys {unexpected}; allowed keys are {list(allowed)}")
    return arrays


def _scalar_int(arrays: dict, key: str, path) -> int | None:
    if key not in arrays:
        return None
    value = arrays[key]
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"'{key}' in {path} must be a scalar integer, got shape {value.shape} "
                         f"dtype {value.dtype}")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# Stratified train / held-out split.


def split_indices(labels, heldout_fraction: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint stratified split of ``range(N)``.

    Each class (and the unknown label −1, as its own stratum) sends round(fraction · count) of its
    members, chosen at random, to the held-out part.

    Args:
      labels: ``[N]`` int labels.
      heldout_fraction: in [0, 1].
      seed: int or ``np.random.Generator``.

    Returns:
      (train_index, heldout_index): sorted int64 arrays that partition ``range(N)``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be [N], got shape {labels.shape}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    heldout = []
    for label in np.unique(labels):  # sorted, so the draw order is deterministic
        members = np.flatnonzero(labels == label)
        count = int(np.floor(heldout_fraction * members.size + 0.5))
        heldout.append(rng.permutation(members)[:count])
    heldout_index = np.sort(np.concatenate(heldout)) if heldout else np.zeros((0,), np.int64)
    is_heldout = np.zeros(labels.shape[0], bool)
    is_heldout[heldout_index] = True
    return np.flatnonzero(~is_heldout), np.flatnonzero(is_heldout)


def parse_classes(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` → ``(0, 1, 2)``: a comma-separated list of distinct non-negative class indices."""
    try:
        classes = tuple(int(c) for c in str(text).split(","))
    except ValueError:
        raise ValueError(f"classes must be comma-separated integers such as 0,1,2,3,4, got {text!r}") from None
    if len(set(classes)) != len(classes) or min(classes) < 0:
        raise ValueError(f"classes must be distinct non-negative integers, got {text!r}")
    return classes


def select_classes(dataset: ImageDataset, classes: Sequence[int]) -> ImageDataset:
    """The images of ``classes`` only, relabelled 0..len(classes)−1 in the order given (K = len(classes)).

    Raises ValueError for an unlabelled set, fewer than two classes, or a class the set does not have.
    """
    classes = tuple(int(c) for c in classes)
    if dataset.num_classes < 1:
        raise ValueError(f"{dataset.name} has no labels: classes cannot be selected")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"select at least two distinct classes, got {classes}")
    missing = [c for c in classes if not 0 <= c < dataset.num_classes]
    if missing:
        raise ValueError(f"{dataset.name} has classes 0..{dataset.num_classes - 1}; no class {missing[0]}")
    relabel = np.full(dataset.num_classes, -1, np.int32)
    relabel[list(classes)] = np.arange(len(classes), dtype=np.int32)
    keep = (dataset.labels >= 0) & (relabel[np.maximum(dataset.labels, 0)] >= 0)
    name = f"{dataset.name}, classes {','.join(map(str, classes))}"
    return ImageDataset(dataset.images[keep], relabel[dataset.labels[keep]], len(classes), name)


def split_images(dataset: ImageDataset, heldout_fraction: float, seed) -> PoolSplit:
    """Splits a labelled image set into disjoint, stratified train and held-out pools.

    Args:
      dataset: the images to split.
      heldout_fraction: fraction of every class that goes to the held-out pool, in [0, 1].
      seed: int or ``np.random.Generator``; a fixed seed gives the same split.

    Returns:
      PoolSplit(train, heldout), names suffixed ``"/train"`` and ``"/heldout"``.
    """
    train_index, heldout_index = split_indices(dataset.labels, heldout_fraction, seed)
    return PoolSplit(_subset(dataset, train_index, "/train"), _subset(dataset, heldout_index, "/heldout"))
