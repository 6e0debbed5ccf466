"""Tests of hmdm_jax.data: image loaders, IDX parsing, Markov sequences, users' npz files, batching."""
from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hmdm_jax.data import (
    ImageDataset,
    SequenceDataset,
    flatten_frames,
    iterate_batches,
    load_digits,
    load_idx,
    load_images_npz,
    load_sequences_npz,
    load_source,
    markov_sequences,
    read_idx,
    save_sequences_npz,
    shard_for_process,
    split_images,
    split_indices,
    transition_matrix,
    write_idx,
)

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits()


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file built by hand from the format description (independent of write_idx)."""
    big_endian = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    return (bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
            + array.astype(big_endian).tobytes())


def write_tiny_idx_dir(directory: Path, images: np.ndarray, labels: np.ndarray, compress: bool,
                       prefix: str = "t10k") -> None:
    for stem, content in ((f"{prefix}-images-idx3-ubyte", idx_bytes(images, 0x08)),
                          (f"{prefix}-labels-idx1-ubyte", idx_bytes(labels, 0x08))):
        if compress:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(content))
        else:
            (directory / stem).write_bytes(content)


def tiny_images(seed: int = 0, n: int = 6):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 4, 3), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Digits.


def test_digits_shapes_range_and_labels(digits):
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    assert digits.images.shape == (1797, 8, 8, 1) and digits.images.dtype == np.float32
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0
    np.testing.assert_array_equal(digits.images[..., 0] * 8 + 8, raw.images)  # 0..16 -> [-1, 1]
    assert digits.labels.dtype == np.int32 and digits.num_classes == 10
    np.testing.assert_array_equal(np.bincount(digits.labels),
                                  [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])


def test_importing_data_package_pulls_in_neither_jax_nor_tfds():
    code = ("import sys, hmdm_jax.data; "
            "print(any(m == 'jax' or m.startswith(('tensorflow', 'jax.')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------
# IDX files.


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "raw"])
def test_idx_round_trip_tiny_files(tmp_path, compress):
    images, labels = tiny_images()
    write_tiny_idx_dir(tmp_path, images, labels, compress)
    dataset = load_idx(tmp_path, split="test")
    assert dataset.images.shape == (6, 4, 3, 1) and dataset.images.dtype == np.float32
    np.testing.assert_allclose(dataset.images[..., 0], images / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(dataset.labels, labels)
    assert dataset.labels.dtype == np.int32 and dataset.num_classes == 10
    np.testing.assert_array_equal(read_idx(tmp_path / ("t10k-labels-idx1-ubyte" + ".gz" * compress)), labels)


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.float32, 0x0D)])
def test_write_idx_matches_hand_built_bytes(tmp_path, dtype, code):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != np.uint8 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", array)
    assert (tmp_path / "a.idx").read_bytes() == idx_bytes(array, code)
    write_idx(tmp_path / "a.idx.gz", array)
    back = read_idx(tmp_path / "a.idx.gz")
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("content,match", [
    (b"\x08\x03\x00\x00" + bytes(12), "magic number"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + bytes(2), "dtype code 0x07"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00", "too short"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated inside its header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + bytes(3), "is truncated"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + bytes(3), "trailing bytes"),
])
def test_idx_corrupt_header_errors(tmp_path, content, match):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_idx(tmp_path / "t10k-images-idx3-ubyte")
    _, labels = tiny_images()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 0x08))
    with pytest.raises(ValueError, match=match):
        load_idx(tmp_path)


def test_idx_corrupt_gzip_and_wrong_layout(tmp_path):
    images, labels = tiny_images()
    write_tiny_idx_dir(tmp_path, images, labels, compress=True)
    good = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt gzip"):
        load_idx(tmp_path)
    write_tiny_idx_dir(tmp_path, images, labels[:5], compress=True)  # 6 images, 5 labels
    with pytest.raises(ValueError, match="match the 6 images"):
        load_idx(tmp_path)
    write_tiny_idx_dir(tmp_path, images, labels, compress=True)
    with pytest.raises(ValueError, match="num_classes is 3"):
        load_idx(tmp_path, num_classes=3)


def test_idx_missing_file_names_file_and_directory(tmp_path):
    images, labels = tiny_images()
    write_tiny_idx_dir(tmp_path, images, labels, compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        load_idx(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_idx(tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_idx(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_idx(tmp_path, split="validation")


def test_idx_md5_verification(tmp_path):
    images, labels = tiny_images()
    write_tiny_idx_dir(tmp_path, images, labels, compress=True)
    names = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    digests = {n: hashlib.md5((tmp_path / n).read_bytes()).hexdigest() for n in names}
    (tmp_path / "MD5SUMS").write_text("".join(f"{digests[n]}  {n}\n" for n in names))
    assert load_idx(tmp_path).images.shape == (6, 4, 3, 1)
    wrong = "0" * 32
    (tmp_path / "MD5SUMS").write_text(f"{digests[names[0]]}  {names[0]}\n{wrong} *{names[1]}\n")
    with pytest.raises(ValueError, match="MD5 mismatch for .*t10k-labels-idx1-ubyte.gz"):
        load_idx(tmp_path)
    assert load_idx(tmp_path, verify_md5=False).labels.shape == (6,)
    (tmp_path / "MD5SUMS").write_text(f"{digests[names[0]]}  {names[0]}\n")
    with pytest.raises(ValueError, match="no checksum for t10k-labels"):
        load_idx(tmp_path)
    (tmp_path / "MD5SUMS").write_text("not a checksum line\n")
    with pytest.raises(ValueError, match="line 1"):
        load_idx(tmp_path)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST test set not present")
def test_genuine_mnist_test_set(tmp_path):
    md5sums = dict(reversed(line.split()) for line in (SHARED_MNIST / "MD5SUMS").read_text().splitlines())
    for name, digest in md5sums.items():  # independent check of what load_idx verifies
        assert hashlib.md5((SHARED_MNIST / name).read_bytes()).hexdigest() == digest
    mnist = load_idx(SHARED_MNIST, split="test", verify_md5=True)
    assert mnist.images.shape == (10000, 28, 28, 1) and mnist.num_classes == 10
    assert mnist.images.min() == -1.0 and mnist.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(mnist.labels), MNIST_TEST_LABEL_COUNTS)
    np.testing.assert_array_equal(mnist.labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    # A one-byte corruption of a copy is caught by the checksum.
    for name in ["MD5SUMS", *md5sums]:
        shutil.copy(SHARED_MNIST / name, tmp_path / name)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="MD5 mismatch"):
        load_idx(tmp_path)


@pytest.mark.skipif(not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    fashion = load_idx(FASHION_MNIST, split="test")  # no MD5SUMS in the package
    assert fashion.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(fashion.labels), [1000] * 10)


# ---------------------------------------------------------------------------------------------------
# Users' image npz files and SOURCE strings.


def test_load_images_npz(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.array([0, 2, -1, 1, 2]))
    dataset = load_images_npz(tmp_path / "a.npz")
    assert dataset.images.shape == (5, 4, 4, 1) and dataset.num_classes == 3
    np.testing.assert_allclose(dataset.images[..., 0], images / 127.5 - 1, atol=1e-6)
    np.savez(tmp_path / "b.npz", images=np.full((2, 3, 3, 3), 0.25, np.float32))
    rgb = load_images_npz(tmp_path / "b.npz", num_classes=4)
    assert rgb.images.shape == (2, 3, 3, 3) and np.allclose(rgb.images, -0.5)
    assert rgb.num_classes == 4 and np.all(rgb.labels == -1)
    for bad, match in [(dict(images=np.zeros((2, 3))), "rank 2"), (dict(pixels=images), "no 'images'"),
                       (dict(images=images, label=np.zeros(5)), "unexpected keys"),
                       (dict(images=images.astype(np.int64)), "dtype int64"),
                       (dict(images=images, labels=np.zeros(4, int)), r"shape \(4,\)")]:
        np.savez(tmp_path / "bad.npz", **bad)
        with pytest.raises(ValueError, match=match):
            load_images_npz(tmp_path / "bad.npz")


def test_load_source_schemes(tmp_path, digits, monkeypatch):
    assert load_source("digits").images.shape == digits.images.shape
    images, labels = tiny_images()
    write_tiny_idx_dir(tmp_path, images, labels, compress=False)
    assert load_source(f"idx:{tmp_path}").images.shape == (6, 4, 3, 1)
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_source(f"idx:{tmp_path}", split="train")
    np.savez(tmp_path / "u.npz", images=images)
    assert load_source(f"npz:{tmp_path / 'u.npz'}").images.shape == (6, 4, 3, 1)
    for spec in ["mnist", "hdf5:/x", "digits:foo"]:
        with pytest.raises(ValueError, match="unknown data source"):
            load_source(spec)
    with pytest.raises(ValueError, match="needs an argument"):
        load_source("idx:")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'hmdm_jax\[data\]'"):
        load_source("tfds:mnist")


# ---------------------------------------------------------------------------------------------------
# Transition matrices.


def test_transition_matrices_builtin():
    for kind in ["sticky", "cyclic"]:
        matrix = transition_matrix(kind, 10)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)
    cyclic = transition_matrix("cyclic", 10)
    for k in range(10):
        assert cyclic[k, (k + 1) % 10] == 0.8
        others = np.delete(cyclic[k], (k + 1) % 10)
        np.testing.assert_allclose(others, 0.2 / 9, rtol=1e-12)
    sticky = transition_matrix("sticky", 4, stay=0.7)
    np.testing.assert_allclose(sticky, np.where(np.eye(4, dtype=bool), 0.7, 0.1), rtol=1e-12)
    first = transition_matrix("dirichlet", 5, rng=3, concentration=0.5)
    np.testing.assert_allclose(first.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(first, transition_matrix("dirichlet", 5, rng=3, concentration=0.5))
    assert not np.allclose(first, transition_matrix("dirichlet", 5, rng=4, concentration=0.5))
    with pytest.raises(ValueError, match="needs rng"):
        transition_matrix("dirichlet", 5)
    with pytest.raises(ValueError, match="unknown transition kind"):
        transition_matrix("sticki", 5)
    with pytest.raises(ValueError, match="num_classes ≥ 2"):
        transition_matrix("cyclic", 1)


def test_transition_matrix_from_npy(tmp_path):
    good = transition_matrix("dirichlet", 3, rng=0)
    np.save(tmp_path / "good.npy", good)
    np.testing.assert_allclose(transition_matrix(str(tmp_path / "good.npy"), 3), good, atol=1e-12)
    cases = [(np.ones((3, 4)) / 4, "square"), (np.eye(4), "num_classes is 3"),
             (np.full((3, 3), 0.5), "row 0 sums to 1.5"),
             (np.array([[1.2, -0.2, 0], [0, 1, 0], [0, 0, 1]]), "negative"),
             (np.array([[np.nan, 1, 0], [0, 1, 0], [0, 0, 1]]), "NaN")]
    for matrix, match in cases:
        np.save(tmp_path / "bad.npy", matrix)
        with pytest.raises(ValueError, match=match):
            transition_matrix(str(tmp_path / "bad.npy"), 3)
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        transition_matrix(str(tmp_path / "missing.npy"), 3)


# ---------------------------------------------------------------------------------------------------
# Pools and Markov sequences.


def test_split_images_disjoint_and_stratified(digits):
    train_index, heldout_index = split_indices(digits.labels, 0.25, seed=0)
    assert np.intersect1d(train_index, heldout_index).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_index, heldout_index])), np.arange(1797))
    counts = np.bincount(digits.labels)
    np.testing.assert_array_equal(np.bincount(digits.labels[heldout_index]), np.floor(0.25 * counts + 0.5))
    pools = split_images(digits, 0.25, seed=0)
    train_keys = {image.tobytes() for image in pools.train.images}  # digits' images are all distinct
    assert not any(image.tobytes() in train_keys for image in pools.heldout.images)
    np.testing.assert_array_equal(pools.heldout.images, digits.images[heldout_index])
    np.testing.assert_array_equal(split_images(digits, 0.25, seed=0).train.labels, pools.train.labels)
    assert not np.array_equal(split_indices(digits.labels, 0.25, seed=1)[1], heldout_index)


def empirical_transitions(dataset: SequenceDataset, num_classes: int) -> np.ndarray:
    labels, mask = dataset.labels, dataset.mask
    valid = mask[:, :-1] & mask[:, 1:]
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (labels[:, :-1][valid], labels[:, 1:][valid]), 1)
    return counts / counts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["cyclic", "dirichlet"])
def test_markov_sequences_follow_the_chain(digits, kind):
    pool = split_images(digits, 0.2, seed=0).train
    matrix = transition_matrix(kind, 10, rng=7, concentration=0.3)
    sequences = markov_sequences(123, pool, None, matrix, num_sequences=400, length=25)
    assert sequences.images.shape == (400, 25, 8, 8, 1) and sequences.mask.all()
    empirical = empirical_transitions(sequences, 10)
    # ~960 transitions per row: the 0.8 entries have s.d. ≈ 0.013, so 0.06 is > 4 s.d.
    assert np.abs(empirical - matrix).max() < 0.06
    assert np.abs(empirical - matrix.T).max() > 0.3  # the transposed (wrong-convention) chain fails
    first_counts = np.bincount(sequences.labels[:, 0], minlength=10)
    assert first_counts.min() > 15 and first_counts.max() < 65  # uniform initial: 40 ± 3.8 s.d.
    # Every frame is a pool image of the frame's label.
    label_of = {image.tobytes(): label for image, label in zip(pool.images, pool.labels)}
    frame_labels = [label_of[frame.tobytes()] for frame in sequences.images.reshape(-1, 8, 8, 1)]
    np.testing.assert_array_equal(frame_labels, sequences.labels.ravel())


def test_markov_sequences_initial_distribution_and_reuse(digits):
    pool = split_images(digits, 0.5, seed=0).train  # ~90 images per class
    initial = np.zeros(10)
    initial[3] = 1.0
    sticky = transition_matrix("sticky", 10, stay=1.0)  # the chain never leaves state 3
    small = markov_sequences(0, pool, initial, sticky, num_sequences=8, length=10)
    assert np.all(small.labels == 3)
    frames = small.images.reshape(80, -1)
    assert len({f.tobytes() for f in frames}) == 80  # 80 ≤ pool size: no image repeats
    members = pool.images[pool.labels == 3].reshape(-1, 64)
    big = markov_sequences(0, pool, initial, sticky, num_sequences=30, length=10)  # 300 frames
    uses = [np.sum(np.all(big.images.reshape(300, 64) == m, axis=1)) for m in members]
    low = 300 // len(members)
    assert sum(uses) == 300 and set(uses) <= {low, low + 1}  # as even as possible
    one_class_pool = ImageDataset(pool.images[pool.labels == 3], pool.labels[pool.labels == 3], 10, "3s")
    markov_sequences(0, one_class_pool, initial, sticky, 2, 4)  # unreachable classes may be empty
    with pytest.raises(ValueError, match="no images of them"):
        markov_sequences(0, one_class_pool, None, sticky, 2, 4)


def test_markov_sequences_variable_lengths_and_determinism(digits):
    pool = digits
    matrix = transition_matrix("cyclic", 10)
    sequences = markov_sequences(5, pool, None, matrix, num_sequences=200, length=(3, 7))
    lengths = sequences.mask.sum(axis=1)
    assert sequences.images.shape[1] == 7 and set(lengths) == {3, 4, 5, 6, 7}
    np.testing.assert_array_equal(sequences.mask, np.arange(7)[None] < lengths[:, None])
    assert np.all(sequences.labels[~sequences.mask] == -1)
    assert np.all(sequences.labels[sequences.mask] >= 0)
    assert np.all(sequences.images[~sequences.mask] == 0)
    again = markov_sequences(5, pool, None, matrix, num_sequences=200, length=(3, 7))
    for field, other in zip(sequences, again):
        np.testing.assert_array_equal(field, other)
    different = markov_sequences(6, pool, None, matrix, num_sequences=200, length=(3, 7))
    assert not np.array_equal(different.labels, sequences.labels)
    rng_based = markov_sequences(np.random.default_rng(5), pool, None, matrix, 200, (3, 7))
    np.testing.assert_array_equal(rng_based.images, sequences.images)
    for bad_length in [0, (5, 3), "long"]:
        with pytest.raises(ValueError, match="length"):
            markov_sequences(0, pool, None, matrix, 2, bad_length)
    with pytest.raises(ValueError, match="num_classes is 10"):
        markov_sequences(0, pool, None, transition_matrix("cyclic", 3), 2, 4)


def test_flatten_frames(digits):
    sequences = markov_sequences(1, digits, None, transition_matrix("sticky", 10), 20, (2, 5))
    frames = flatten_frames(sequences)
    assert frames.images.shape == (sequences.mask.sum(), 8, 8, 1)
    np.testing.assert_array_equal(frames.labels, sequences.labels[sequences.mask])
    length0 = sequences.mask[0].sum()
    np.testing.assert_array_equal(frames.images[:length0], sequences.images[0, :length0])
    assert np.all(frames.labels >= 0) and frames.num_classes == 10


# ---------------------------------------------------------------------------------------------------
# Users' sequence npz files.


def test_sequences_npz_load_and_padding(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 4, 5, 5), dtype=np.uint8)
    labels = np.array([[0, 1, 2, 7], [1, -1, 0, 0], [2, 2, 2, 2]])  # 7 sits on a padding frame
    np.savez(tmp_path / "s.npz", images=images, lengths=np.array([3, 4, 1]), labels=labels)
    dataset = load_sequences_npz(tmp_path / "s.npz")
    assert dataset.images.shape == (3, 4, 5, 5, 1) and dataset.num_classes == 3
    np.testing.assert_array_equal(dataset.mask, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(dataset.labels, [[0, 1, 2, -1], [1, -1, 0, 0], [2, -1, -1, -1]])
    np.testing.assert_allclose(dataset.images[1, :, ..., 0], images[1] / 127.5 - 1, atol=1e-6)
    assert np.all(dataset.images[~dataset.mask] == 0)
    assert load_sequences_npz(tmp_path / "s.npz", num_classes=10).num_classes == 10
    np.savez(tmp_path / "rgb.npz", images=np.full((2, 3, 4, 4, 3), 1.0, np.float32))
    rgb = load_sequences_npz(tmp_path / "rgb.npz")
    assert rgb.mask.all() and np.all(rgb.labels == -1) and np.all(rgb.images == 1.0) and rgb.num_classes == 0


def _bad_sequence_files():
    images = np.zeros((2, 3, 4, 4), np.uint8)
    floats = np.full((2, 3, 4, 4), 0.5, np.float32)
    with_nan, with_inf, too_big, negative = (floats.copy() for _ in range(4))
    with_nan[0, 0, 0, 0], with_inf[1, 2, 3, 3], too_big[0, 1, 0, 0], negative[1, 0, 2, 2] = \
        np.nan, np.inf, 1.5, -0.1
    return [
        ("missing_key", dict(frames=images), "no 'images'"),
        ("unexpected_key", dict(images=images, length=np.array([1, 2])), "unexpected keys"),
        ("rank3", dict(images=np.zeros((2, 3, 4), np.uint8)), "rank 3"),
        ("rank6", dict(images=np.zeros((2, 3, 4, 4, 1, 1), np.uint8)), "rank 6"),
        ("channels", dict(images=np.zeros((2, 3, 4, 4, 2), np.uint8)), "2 channels"),
        ("length_too_long", dict(images=images, lengths=np.array([3, 4])), r"1\.\.3"),
        ("length_zero", dict(images=images, lengths=np.array([0, 2])), r"1\.\.3"),
        ("lengths_shape", dict(images=images, lengths=np.array([1, 2, 3])), "lengths"),
        ("lengths_float", dict(images=images, lengths=np.array([1.0, 2.0])), "lengths"),
        ("label_too_big", dict(images=images, labels=np.full((2, 3), 3), num_classes=np.int64(3)),
         "num_classes is 3"),
        ("label_below_minus_one", dict(images=images, labels=np.full((2, 3), -2)), "≥ −1"),
        ("labels_float", dict(images=images, labels=np.zeros((2, 3))), "integer dtype"),
        ("labels_shape", dict(images=images, labels=np.zeros((2, 2), int)), r"expected \(2, 3\)"),
        ("nan", dict(images=with_nan), "NaN/inf"),
        ("inf", dict(images=with_inf), "NaN/inf"),
        ("float_above_one", dict(images=too_big), r"\[0, 1\]"),
        ("float_below_zero", dict(images=negative), r"\[0, 1\]"),
        ("int_dtype", dict(images=images.astype(np.int32)), "dtype int32"),
        ("bool_dtype", dict(images=images.astype(bool)), "dtype bool"),
        ("empty", dict(images=np.zeros((0, 3, 4, 4), np.uint8)), "empty"),
    ]


@pytest.mark.parametrize("name,content,match", _bad_sequence_files(), ids=[c[0] for c in _bad_sequence_files()])
def test_sequences_npz_validation_errors(tmp_path, name, content, match):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **content)
    with pytest.raises(ValueError, match=match):
        load_sequences_npz(path)


def test_sequences_npz_unreadable_files(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="is not an .npz file"):
        load_sequences_npz(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="single array"):
        load_sequences_npz(tmp_path / "single.npy")
    np.savez(tmp_path / "obj.npz", images=np.array([None, 1], dtype=object))
    with pytest.raises(ValueError, match="object arrays"):
        load_sequences_npz(tmp_path / "obj.npz")
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_sequences_npz(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="num_classes is 2"):
        np.savez(tmp_path / "k.npz", images=np.zeros((1, 2, 3, 3), np.uint8), labels=np.array([[0, 2]]))
        load_sequences_npz(tmp_path / "k.npz", num_classes=2)


def test_sequences_npz_round_trip(tmp_path, digits):
    sequences = markov_sequences(2, digits, None, transition_matrix("cyclic", 10), 6, (2, 5))
    save_sequences_npz(tmp_path / "seqs", sequences)  # exact path, no ".npz" appended
    loaded = load_sequences_npz(tmp_path / "seqs")
    np.testing.assert_allclose(loaded.images, sequences.images, atol=1e-6)
    np.testing.assert_array_equal(loaded.mask, sequences.mask)
    np.testing.assert_array_equal(loaded.labels, sequences.labels)
    assert loaded.num_classes == 10
    holes = sequences._replace(mask=sequences.mask.copy())
    holes.mask[0, 0] = False
    with pytest.raises(ValueError, match="prefix"):
        save_sequences_npz(tmp_path / "bad.npz", holes)


# ---------------------------------------------------------------------------------------------------
# Batching and sharding.


def test_iterate_batches(digits):
    batches = list(iterate_batches(digits, 500))
    assert [b.images.shape[0] for b in batches] == [500, 500, 500, 297]
    assert all(isinstance(b, ImageDataset) and b.num_classes == 10 for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), digits.labels)
    shuffled = list(iterate_batches(digits, 500, seed=3, drop_remainder=True))
    assert [b.images.shape[0] for b in shuffled] == [500, 500, 500]
    keys = np.concatenate([b.images.reshape(500, -1)[:, :] for b in shuffled])
    assert len({k.tobytes() for k in keys}) == 1500  # a permutation: no example twice
    order = np.concatenate(list(iterate_batches(digits.labels, 100, seed=3)))  # plain arrays too
    assert not np.array_equal(order, digits.labels)
    np.testing.assert_array_equal(np.sort(order), np.sort(digits.labels))
    np.testing.assert_array_equal(
        order, np.concatenate(list(iterate_batches(digits.labels, 100, seed=3))))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(digits, 0))


def test_shard_for_process():
    data = np.arange(10)
    shards = [shard_for_process(data, i, 3) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), data)  # contiguous partition
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    equal = [shard_for_process(data, i, 3, drop_remainder=True) for i in range(3)]
    assert [len(s) for s in equal] == [3, 3, 3] and len(set(np.concatenate(equal))) == 9
    sequences = SequenceDataset(np.zeros((4, 2, 1, 1, 1), np.float32), np.ones((4, 2), bool),
                                np.arange(8, dtype=np.int32).reshape(4, 2), 8)
    part = shard_for_process(sequences, 1, 2)
    assert isinstance(part, SequenceDataset) and part.num_classes == 8
    np.testing.assert_array_equal(part.labels, [[4, 5], [6, 7]])
    with pytest.raises(ValueError, match="process_index"):
        shard_for_process(data, 3, 3)


# ---------------------------------------------------------------------------------------------------
# TensorFlow Datasets (offline: tfds.testing.mock_data generates examples from the features spec).


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
def test_load_tfds_with_mock_data(name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")  # mock_data needs TF
    from hmdm_jax.data import load_tfds

    with tfds.testing.mock_data(num_examples=12):
        dataset = load_tfds(name, split="train", shard_by_process=False)
        raw = list(tfds.as_numpy(tfds.load(name, split="train", as_supervised=True)))
    assert dataset.images.shape == (12, *shape) and dataset.images.dtype == np.float32
    assert dataset.num_classes == 10 and dataset.labels.dtype == np.int32
    np.testing.assert_allclose(dataset.images, np.stack([r[0] for r in raw]) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(dataset.labels, [r[1] for r in raw])


def test_load_tfds_shards_by_process(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    from hmdm_jax.data import load_tfds

    with tfds.testing.mock_data(num_examples=6):  # the mock ignores split slicing: record the split
        real_load, requested = tfds.load, []

        def recording_load(name, *, split, **kwargs):
            requested.append(split)
            return real_load(name, split=split, **kwargs)

        monkeypatch.setattr(tfds, "load", recording_load)
        sharded = load_tfds("mnist", split="test", process_index=1, process_count=3)
        load_tfds("mnist", split="test")  # one JAX process: the whole split
    assert requested[0] == tfds.even_splits("test", n=3)[1] and requested[1] == "test"
    assert sharded.name == "mnist-test-shard1of3"
    with pytest.raises(ValueError, match="process_index"):
        load_tfds("mnist", process_index=3, process_count=3)


def test_select_classes_keeps_and_relabels_in_the_given_order(digits):
    from hmdm_jax.data import parse_classes, select_classes
    sub = select_classes(digits, parse_classes("7,2"))
    assert sub.num_classes == 2 and set(np.unique(sub.labels)) == {0, 1}
    assert len(sub.images) == int(((digits.labels == 7) | (digits.labels == 2)).sum())
    np.testing.assert_array_equal(sub.images[sub.labels == 0], digits.images[digits.labels == 7])
    np.testing.assert_array_equal(sub.images[sub.labels == 1], digits.images[digits.labels == 2])
    for bad, message in (("7,7", "distinct"), ("-1,2", "non-negative"), ("1;2", "comma-separated")):
        with pytest.raises(ValueError, match=message):
            parse_classes(bad)
    with pytest.raises(ValueError, match="no class 10"):
        select_classes(digits, (1, 10))
