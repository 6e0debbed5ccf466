"""InceptionV3 feature network for FID on natural images (CIFAR-10), in Flax, with no download.

Architecture: the FID Inception of pytorch-fid (``FIDInceptionA/C/E_1/E_2`` blocks), a port of the
TensorFlow graph "pt_inception-2015-12-05" used by the TTUR reference FID code. Features are the
2048-d pool3 activations (global average pool after ``Mixed_7c``). Differences from torchvision's
InceptionV3 that FID depends on, all reproduced here: average pools exclude padding
(``count_include_pad=False``) and the last block uses a max pool in its pool branch. Input handling as
in pytorch-fid: images are bilinearly resized to 299×299 (half-pixel centres, i.e. PyTorch
``align_corners=False``, no antialiasing) and fed in [−1, 1]. Grayscale images are repeated to 3
channels. pytorch-fid's numbers differ slightly from the TF reference implementation (resize
differences); report ``feature_net="inception-v3-pytorch-fid-pool3"``.

Weights: never downloaded. Supply a file converted once from pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (a PyTorch state dict). Accepted formats:

1. ``.npz`` whose keys are the PyTorch state-dict names, e.g. ``Conv2d_1a_3x3.conv.weight``,
   ``Conv2d_1a_3x3.bn.weight``, ``Conv2d_1a_3x3.bn.bias``, ``Conv2d_1a_3x3.bn.running_mean``,
   ``Conv2d_1a_3x3.bn.running_var``, ``Mixed_5b.branch1x1.conv.weight``, ... (conv weights OIHW as
   in PyTorch; ``fc.*`` and ``*.num_batches_tracked`` are ignored). Made with::

       sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
       np.savez("pt_inception.npz", **{k: v.numpy() for k, v in sd.items()})

2. ``.npz`` of the Flax variables flattened with "/" separators, e.g.
   ``params/Conv2d_1a_3x3/conv/kernel`` (HWIO), ``params/Conv2d_1a_3x3/bn/scale``,
   ``params/Conv2d_1a_3x3/bn/bias``, ``batch_stats/Conv2d_1a_3x3/bn/mean``,
   ``batch_stats/Conv2d_1a_3x3/bn/var`` (as written by :func:`save_inception_variables`).

3. ``.pkl`` / ``.pickle``: a pickled nested dict ``{"params": {...}, "batch_stats": {...}}`` with the
   same tree as 2.

Module names follow torchvision/pytorch-fid (``Conv2d_1a_3x3``, ``Mixed_5b`` ... ``Mixed_7c``, inner
``branch1x1``, ``branch5x5_1``, ...; each BasicConv2d holds ``conv`` and ``bn``), so the conversion is
mechanical (:func:`convert_pytorch_state_dict`). Loading checks every key and shape against the
architecture and fails with a message listing what is missing, unexpected or mis-shaped.
"""
from __future__ import annotations

import os
import pickle
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

__all__ = [
    "FIDInceptionV3",
    "resize_to_inception_input",
    "INCEPTION_FEATURE_DIM",
    "inception_variable_shapes",
    "convert_pytorch_state_dict",
    "load_inception_variables",
    "save_inception_variables",
    "inception_features",
    "inception_feature_extractor",
]

INCEPTION_FEATURE_DIM = 2048
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 1e-3, running statistics) → ReLU, as torchvision's BasicConv2d."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        pad = tuple((p, p) for p in self.padding)
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=pad, use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, momentum=0.9, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x):
    # pytorch-fid: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (``pool="avg"``, Mixed_7b) and FIDInceptionE_2 (``pool="max"``, Mixed_7c)."""

    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        else:  # FIDInceptionE_2: the TF graph has a max pool here (a bug in the original, kept for FID)
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_to_inception_input(images, size: int = INPUT_SIZE):
    """``[B, H, W, C]`` (C ∈ {1, 3}) → ``[B, size, size, 3]`` float32, as pytorch-fid's input stage.

    Bilinear with half-pixel centres and edge clamping, no antialiasing: identical to PyTorch's
    ``F.interpolate(x, (size, size), mode="bilinear", align_corners=False)``. Grayscale is repeated
    to 3 channels. Values are left in [−1, 1] (pytorch-fid maps its [0, 1] input there; resizing is
    linear, so the order does not matter).
    """
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=False)
    return x


class FIDInceptionV3(nn.Module):
    """``__call__(images [B, H, W, C] in [−1, 1], C ∈ {1, 3}) -> pool3 features [B, 2048]``.

    Images are resized to 299×299 inside the network (bilinear, half-pixel centres, as pytorch-fid).
    """

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must have shape [B, H, W, C] with C in (1, 3), got {images.shape}")
        x = resize_to_inception_input(images)
        x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # pool3: adaptive average pool to 1×1


def inception_variable_shapes() -> dict:
    """The expected variables tree ``{"params": ..., "batch_stats": ...}`` as ShapeDtypeStructs (no compute)."""
    model = FIDInceptionV3()
    dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), dummy)
    return dict(shapes)


_TORCH_SUFFIX = {  # PyTorch BasicConv2d entry -> (collection, flax path suffix)
    ("conv", "weight"): ("params", ("conv", "kernel")),
    ("bn", "weight"): ("params", ("bn", "scale")),
    ("bn", "bias"): ("params", ("bn", "bias")),
    ("bn", "running_mean"): ("batch_stats", ("bn", "mean")),
    ("bn", "running_var"): ("batch_stats", ("bn", "var")),
}


def convert_pytorch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Converts pytorch-fid's InceptionV3 state dict (names → arrays) to Flax variables.

    Conv weights go from OIHW to HWIO; BatchNorm weight/bias/running_mean/running_var become
    params scale/bias and batch_stats mean/var. ``fc.*`` and ``num_batches_tracked`` are dropped.
    Unknown names raise ValueError. The result is not yet checked against the architecture
    (:func:`load_inception_variables` does that).
    """
    flat = {}
    unknown = []
    for name, value in state_dict.items():
        parts = name.split(".")
        if parts[0] == "fc" or parts[-1] == "num_batches_tracked":
            continue
        suffix = tuple(parts[-2:])
        if len(parts) < 3 or suffix not in _TORCH_SUFFIX:
            unknown.append(name)
            continue
        collection, flax_suffix = _TORCH_SUFFIX[suffix]
        value = np.asarray(value, np.float32)
        if flax_suffix[1] == "kernel":
            if value.ndim != 4:
                raise ValueError(f"{name}: expected a 4-D OIHW conv weight, got shape {value.shape}")
            value = np.transpose(value, (2, 3, 1, 0))
        flat[(collection,) + tuple(parts[:-2]) + flax_suffix] = value
    if unknown:
        raise ValueError(f"unrecognised InceptionV3 state-dict keys (first 10): {unknown[:10]}")
    return traverse_util.unflatten_dict(flat)


def _check_against_architecture(variables) -> dict:
    expected = traverse_util.flatten_dict(inception_variable_shapes())
    try:
        got = traverse_util.flatten_dict(variables)
    except Exception as err:  # not a nested mapping
        raise ValueError(f"Inception weights must be a nested dict of arrays, got {type(variables)}") from err
    missing = sorted("/".join(k) for k in expected.keys() - got.keys())
    unexpected = sorted("/".join(k) for k in got.keys() - expected.keys())
    mis_shaped = sorted(
        f"{'/'.join(k)}: file {tuple(np.shape(got[k]))} vs expected {tuple(expected[k].shape)}"
        for k in expected.keys() & got.keys() if tuple(np.shape(got[k])) != tuple(expected[k].shape)
    )
    if missing or unexpected or mis_shaped:
        raise ValueError(
            "Inception weights do not match the FID InceptionV3 architecture: "
            f"{len(missing)} missing (first 5: {missing[:5]}), {len(unexpected)} unexpected "
            f"(first 5: {unexpected[:5]}), {len(mis_shaped)} with wrong shape (first 5: {mis_shaped[:5]}). "
            "See hmdm_jax/metrics/inception.py for the expected format."
        )
    return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in got.items()})


def load_inception_variables(path) -> dict:
    """Loads and validates FID-Inception weights from ``path`` (.npz or .pkl; formats in the module doc).

    Returns:
      Flax variables ``{"params": ..., "batch_stats": ...}`` of :class:`FIDInceptionV3` (float32).

    Raises:
      FileNotFoundError: the file does not exist (weights are never downloaded).
      ValueError: unknown format, or keys/shapes that do not match the architecture.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights not found at {path!r}. They are never downloaded at run time: convert "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth once on a machine that has it "
            "(np.savez('pt_inception.npz', **{k: v.numpy() for k, v in torch.load(pth).items()})) "
            "and pass that file. See hmdm_jax/metrics/inception.py."
        )
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if any("/" in k for k in arrays):
            variables = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
        else:
            variables = convert_pytorch_state_dict(arrays)
    elif path.endswith((".pkl", ".pickle")):
        with open(path, "rb") as fh:
            variables = pickle.load(fh)
        if isinstance(variables, Mapping) and variables and all("." in str(k) for k in variables):
            variables = convert_pytorch_state_dict(variables)  # a pickled PyTorch-style state dict
        variables = jax.tree_util.tree_map(np.asarray, variables)
    else:
        raise ValueError(f"unsupported Inception weight file {path!r}: use .npz, .pkl or .pickle")
    return _check_against_architecture(variables)


def save_inception_variables(variables, path) -> None:
    """Writes Flax variables as a flat ``.npz`` (format 2 of the module doc)."""
    flat = traverse_util.flatten_dict(variables)
    np.savez(os.fspath(path), **{"/".join(k): np.asarray(v) for k, v in flat.items()})


@jax.jit
def inception_features(variables, images):
    """Pool3 features ``[B, 2048]`` for ``images [B, H, W, C]`` in [−1, 1] (resized to 299×299 inside)."""
    return FIDInceptionV3().apply(variables, images)


def inception_feature_extractor(variables_or_path) -> Callable:
    """A :data:`~hmdm_jax.metrics.fid.FeatureExtractor` bound to Inception weights (variables or a file path)."""
    if isinstance(variables_or_path, (str, os.PathLike)):
        variables = load_inception_variables(variables_or_path)
    else:
        variables = _check_against_architecture(variables_or_path)
    return lambda images: inception_features(variables, jnp.asarray(images, jnp.float32))
