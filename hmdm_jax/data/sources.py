"""The CLI's SOURCE strings: ``digits`` (default), ``idx:DIR``, ``tfds:NAME``, ``npz:PATH``."""
from __future__ import annotations

from hmdm_jax.data.idx import load_idx
from hmdm_jax.data.images import ImageDataset, load_digits, load_images_npz

__all__ = [
    "load_source", "SOURCE_HELP", "SOURCE_SCHEMES",
]

SOURCE_SCHEMES = ("digits", "idx", "tfds", "npz")
SOURCE_HELP = ("digits (scikit-learn's 8x8 digits, bundled) | idx:DIR (MNIST-format IDX files) | "
               "tfds:NAME (mnist, fashion_mnist, cifar10 via tensorflow-datasets) | npz:PATH (your images)")


def load_source(spec: str = "digits", *, split: str | None = None, data_dir=None, verify_md5: bool = True,
                num_classes: int | None = None, shard_by_process: bool = True) -> ImageDataset:
    """Loads the image set named by a SOURCE string.

    Args:
      spec: ``"digits"`` | ``"idx:DIR"`` | ``"tfds:NAME"`` | ``"npz:PATH"``.
      split: the split for ``idx`` (default ``"test"``: the only MNIST split available offline) and
        ``tfds`` (default ``"train"``); ``digits`` and ``npz`` have no predefined splits and ignore it
        (use :func:`split_images`).
      data_dir: TFDS data directory (``tfds`` only).
      verify_md5: check ``MD5SUMS`` when present (``idx`` only).
      num_classes: K for ``npz`` files (default from the file); ignored elsewhere.
      shard_by_process: per-host sharding (``tfds`` only; see :func:`load_tfds`).

    Raises:
      ValueError: unknown scheme or a scheme without its argument; plus the loaders' own errors.
    """
    scheme, _, argument = spec.partition(":")
    scheme = scheme.strip().lower()
    if scheme == "digits" and not argument:
        return load_digits()
    if scheme not in SOURCE_SCHEMES or scheme == "digits":
        raise ValueError(f"unknown data source {spec!r}; expected {SOURCE_HELP}")
    if not argument:
        raise ValueError(f"data source {spec!r} needs an argument after '{scheme}:'; expected {SOURCE_HELP}")
    if scheme == "idx":
        return load_idx(argument, split=split or "test", verify_md5=verify_md5)
    if scheme == "tfds":
        from hmdm_jax.data.tfds_loader import load_tfds

        return load_tfds(argument, split=split or "train", data_dir=data_dir,
                         shard_by_process=shard_by_process)
    return load_images_npz(argument, num_classes=num_classes)
