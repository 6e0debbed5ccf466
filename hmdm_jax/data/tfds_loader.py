"""Image classification sets from TensorFlow Datasets (``mnist``, ``fashion_mnist``, ``cifar10``).

The real path on a machine with a network or a prepared ``data_dir``. ``tensorflow_datasets`` (and
TensorFlow, which it needs to read the files) are optional: ``pip install hmdm_jax[data]``.
"""
from __future__ import annotations

import numpy as np

from hmdm_jax.data.images import ImageDataset, check_labels, unit_images_to_model_range

__all__ = [
    "import_tfds", "load_tfds", "TFDS_DATASETS",
]

TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
_READ_BATCH = 8192  # examples per tf.data batch while converting to NumPy


def import_tfds():
    """Imports ``tensorflow_datasets`` or raises an ImportError saying how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "loading TFDS data sets needs tensorflow-datasets and tensorflow: "
            "pip install 'hmdm_jax[data]'  (or: pip install tensorflow-datasets tensorflow-cpu)"
        ) from err
    return tfds


def load_tfds(name: str, split: str = "train", data_dir=None, *, shard_by_process: bool = True,
              download: bool = True, process_index: int | None = None,
              process_count: int | None = None) -> ImageDataset:
    """Loads a TFDS image classification set (features ``image`` and ``label``) into memory.

    Args:
      name: a TFDS name; ``mnist``, ``fashion_mnist`` and ``cifar10`` are the supported ones (other
        sets with ``image``/``label`` features and supervised keys also work).
      split: a TFDS split string (``"train"``, ``"test"``, ``"train[:10%]"``...).
      data_dir: TFDS data directory (None = TFDS default, ``~/tensorflow_datasets``).
      shard_by_process: with several JAX processes, each process loads only its part of ``split``
        (``tfds.even_splits``: contiguous, sizes differing by at most one).
      download: let TFDS download and prepare the set when it is not in ``data_dir``.
      process_index, process_count: override ``jax.process_index()`` / ``jax.process_count()``.

    Returns:
      ImageDataset: images ``[N, H, W, C]`` (uint8 mapped by x / 127.5 − 1 to [−1, 1]; C = 1 for the
      MNISTs, 3 for CIFAR-10), labels ``[N]`` int32, num_classes from the TFDS metadata, name
      ``"<name>-<split>"`` (plus ``-shard<i>of<P>`` when sharded).

    Raises:
      ImportError: tensorflow-datasets missing. ValueError: a set without image/label features, or an
      empty split/shard.
    """
    tfds = import_tfds()
    description = f"{name}-{split}"
    tfds_split = split
    if shard_by_process:
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
        if process_count > 1:
            tfds_split = tfds.even_splits(split, n=process_count)[process_index]
            description += f"-shard{process_index}of{process_count}"
    dataset, info = tfds.load(name, split=tfds_split, data_dir=data_dir, download=download,
                              with_info=True, as_supervised=True)
    features = info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"TFDS set {name!r} has features {list(features.keys())}; "
                         "expected 'image' and 'label'")
    num_classes = int(features["label"].num_classes)
    image_batches, label_batches = [], []
    # ds.batch rather than tfds.load(batch_size=-1): the latter builds one giant tensor in TF first.
    for images, labels in tfds.as_numpy(dataset.batch(_READ_BATCH)):
        image_batches.append(np.asarray(images))
        label_batches.append(np.asarray(labels))
    if not image_batches:
        raise ValueError(f"TFDS split {tfds_split!r} of {name!r} is empty")
    images = np.concatenate(image_batches)
    labels = np.concatenate(label_batches)
    if images.ndim == 3:
        images = images[..., None]
    return ImageDataset(
        unit_images_to_model_range(images, f"TFDS {name} images"),
        check_labels(labels, (images.shape[0],), num_classes, f"TFDS {name} labels"),
        num_classes,
        description,
    )
