"""Data for hmdm_jax experiments: image sets, Markov sequences of images, users' ``.npz`` files.

NumPy only (scikit-learn for the bundled digits; tensorflow-datasets imported lazily by ``load_tfds``).
Used by experiments and metrics; the core modules never import this package.

Conventions: images ``[N, H, W, C]`` float32 in [−1, 1] (C = 1 or 3), labels int32 with −1 = unknown;
sequences ``[N, n, H, W, C]`` with mask ``[N, n]`` (padding at the end) and labels ``[N, n]``.
"""
from hmdm_jax.data.batching import iterate_batches, num_examples, shard_for_process, take
from hmdm_jax.data.idx import load_idx, parse_idx, read_idx, read_md5sums, write_idx
from hmdm_jax.data.images import (
    ImageDataset,
    PoolSplit,
    check_image_dataset,
    load_digits,
    load_images_npz,
    parse_classes,
    select_classes,
    split_images,
    split_indices,
)
from hmdm_jax.data.sequences import (
    TRANSITION_KINDS,
    SequenceDataset,
    check_sequence_dataset,
    flatten_frames,
    load_sequences_npz,
    markov_sequences,
    save_sequences_npz,
    transition_matrix,
    validate_transition_matrix,
)
from hmdm_jax.data.sources import SOURCE_HELP, SOURCE_SCHEMES, load_source
from hmdm_jax.data.tfds_loader import TFDS_DATASETS, load_tfds

__all__ = [
    "ImageDataset", "PoolSplit", "SequenceDataset",
    "load_digits", "load_idx", "load_tfds", "load_images_npz", "load_source",
    "read_idx", "write_idx", "parse_idx", "read_md5sums",
    "split_images", "split_indices", "check_image_dataset", "parse_classes", "select_classes",
    "transition_matrix", "validate_transition_matrix", "TRANSITION_KINDS",
    "markov_sequences", "load_sequences_npz", "save_sequences_npz", "check_sequence_dataset",
    "flatten_frames", "iterate_batches", "shard_for_process", "num_examples", "take",
    "SOURCE_SCHEMES", "SOURCE_HELP", "TFDS_DATASETS",
]
