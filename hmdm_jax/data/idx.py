"""MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST...), gzip-compressed or raw, with MD5 checks.

IDX layout (big-endian): two zero bytes, a dtype code byte, a byte with the number of dimensions d,
then d uint32 sizes, then the data in C order. The standard file names are
``{train,t10k}-images-idx3-ubyte[.gz]`` (``[N, H, W]`` uint8) and ``{train,t10k}-labels-idx1-ubyte[.gz]``
(``[N]`` uint8).
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from hmdm_jax.data.images import ImageDataset, check_labels, unit_images_to_model_range

__all__ = [
    "GZIP_MAGIC", "IDX_DTYPES", "IDX_SPLIT_PREFIXES", "load_idx", "parse_idx", "read_idx",
    "read_md5sums", "write_idx",
]

# IDX dtype code -> big-endian NumPy dtype.
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(data: bytes, what: str = "IDX data") -> np.ndarray:
    """Parses the (decompressed) bytes of one IDX file.

    Args:
      data: the whole file content.
      what: a name for error messages (usually the file path).

    Returns:
      The array with the header's shape, in native byte order (uint8 stays uint8).

    Raises:
      ValueError: bad magic number, unknown dtype code, zero dimensions, truncated header, or a
        payload whose size does not match the header.
    """
    if len(data) < 4:
        raise ValueError(f"{what} is {len(data)} bytes, too short for an IDX header (4 bytes + sizes)")
    if data[0] != 0 or data[1] != 0:
        magic = struct.unpack(">I", data[:4])[0]
        raise ValueError(f"{what} has magic number 0x{magic:08x}; IDX files start with two zero bytes "
                         "(0x0000TTDD: T = dtype code, D = number of dimensions)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{what} has unknown IDX dtype code 0x{code:02x} "
                         f"(known: {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)})")
    if ndim == 0:
        raise ValueError(f"{what} declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{what} is truncated inside its header ({len(data)} bytes, "
                         f"{ndim} dimensions need {header_size})")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        problem = "is truncated" if actual < expected else "has trailing bytes"
        raise ValueError(f"{what} {problem}: header says shape {shape} of {dtype.name} "
                         f"({expected} bytes) but {actual} bytes follow it")
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_size)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path) -> np.ndarray:
    """Reads one IDX file, gzip-compressed (detected by its magic bytes, not its name) or raw.

    Returns:
      The array (see :func:`parse_idx`). Raises FileNotFoundError or ValueError (corrupt file).
    """
    return parse_idx(_decompress(Path(path).read_bytes(), path), str(path))


def write_idx(path, array) -> None:
    """Writes ``array`` as an IDX file; gzip-compressed (reproducibly, mtime 0) when ``path`` ends in .gz.

    Args:
      path: destination.
      array: any shape with 1..255 dimensions of dtype uint8, int8, int16, int32, float32 or float64.
    """
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of "
                         f"{[d.name for d in IDX_DTYPES.values()]}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX stores 1..255 dimensions, got {array.ndim}")
    code = codes[native]
    payload = (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
               + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes())
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    Path(path).write_bytes(payload)


def read_md5sums(path) -> dict[str, str]:
    """Parses an md5sum-format file (``<hash>  <filename>`` or ``<hash> *<filename>`` per line).

    Returns:
      {filename: lower-case hex digest}. Blank lines and ``#`` comments are skipped.
    """
    sums = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path} line {number} is not '<md5 hex>  <filename>': {line!r}")
        sums[parts[1].lstrip("*").strip()] = digest
    return sums


def load_idx(directory, split: str = "test", verify_md5: bool = True, num_classes: int = 10) -> ImageDataset:
    """Loads one split of an MNIST-format data set from a directory of IDX files.

    Looks for ``{prefix}-images-idx3-ubyte[.gz]`` and ``{prefix}-labels-idx1-ubyte[.gz]`` with prefix
    ``train`` or ``t10k``. When the directory holds an ``MD5SUMS`` file (md5sum format), the files
    read are checked against it — and must be listed in it.

    Args:
      directory: e.g. ``../shared/data/mnist`` or ``/usr/share/datasets/fashion-mnist``.
      split: ``"train"`` or ``"test"``.
      verify_md5: check against ``MD5SUMS`` when that file exists.
      num_classes: K (10 for every MNIST-format set); labels must be < K.

    Returns:
      ImageDataset: images ``[N, H, W, 1]`` (uint8 mapped by x / 127.5 − 1 to [−1, 1]), labels ``[N]``,
      name ``"<directory name>-<split>"``.

    Raises:
      FileNotFoundError: directory or file missing (the message names both). ValueError: corrupt file,
      MD5 mismatch, images/labels disagreeing in count, labels ≥ K.
    """
    directory = Path(directory)
    if split not in IDX_SPLIT_PREFIXES:
        raise ValueError(f"split must be one of {sorted(IDX_SPLIT_PREFIXES)}, got {split!r}")
    if not directory.is_dir():
        raise FileNotFoundError(f"IDX directory {directory} does not exist")
    md5_path = directory / "MD5SUMS"
    md5sums = read_md5sums(md5_path) if verify_md5 and md5_path.exists() else None
    prefix = IDX_SPLIT_PREFIXES[split]
    images = _read_checked(directory, f"{prefix}-images-idx3-ubyte", md5sums)
    labels = _read_checked(directory, f"{prefix}-labels-idx1-ubyte", md5sums)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{prefix}-images in {directory} hold {images.dtype} of shape {images.shape}; "
                         "expected uint8 [N, H, W]")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{prefix}-labels in {directory} have shape {labels.shape}; expected "
                         f"[{images.shape[0]}] to match the {images.shape[0]} images")
    labels = check_labels(labels, labels.shape, num_classes, f"{prefix}-labels in {directory}")
    scaled = unit_images_to_model_range(images[..., None], f"{prefix}-images in {directory}")
    return ImageDataset(scaled, labels, num_classes, f"{directory.name}-{split}")


def _read_checked(directory: Path, stem: str, md5sums: dict | None) -> np.ndarray:
    """Finds ``stem.gz`` or ``stem`` (preferring one listed in MD5SUMS), verifies and parses it."""
    candidates = [f"{stem}.gz", stem]
    present = [name for name in candidates if (directory / name).is_file()]
    if not present:
        raise FileNotFoundError(f"missing {stem}[.gz] in {directory} (looked for {' and '.join(candidates)})")
    name = present[0]
    if md5sums is not None:
        listed = [n for n in present if n in md5sums]
        if not listed:
            raise ValueError(f"{directory / 'MD5SUMS'} lists no checksum for {name}; "
                             "add one or pass verify_md5=False")
        name = listed[0]
    raw = (directory / name).read_bytes()
    if md5sums is not None:
        digest = hashlib.md5(raw).hexdigest()
        if digest != md5sums[name]:
            raise ValueError(f"MD5 mismatch for {directory / name}: file has {digest}, MD5SUMS says "
                             f"{md5sums[name]} (corrupt or different download)")
    return parse_idx(_decompress(raw, directory / name), str(directory / name))


def _decompress(raw: bytes, path) -> bytes:
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise ValueError(f"{os.fspath(path)} is a corrupt gzip file: {err}") from err
