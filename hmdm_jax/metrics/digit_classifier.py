"""A small CNN digit classifier whose penultimate layer serves as the feature network of a "domain FID".

Inception features are poor for 28×28 grayscale digits, so for MNIST-like data the project trains this
classifier on the *training split* and measures FID on its 128-d penultimate features. Such a domain
FID ranks models of this project against each other; it is NOT comparable with Inception FID or with
any number from another paper (a different network gives a different metric). Report it with
:func:`hmdm_jax.metrics.fid.fid_record` and ``feature_net="digit-cnn-128"`` (plus the classifier's
training seed/steps).

Architecture (C ∈ {1, 3}; the parameters fix the image size they were trained on):
conv3×3(32, stride 2) → ReLU → conv3×3(64, stride 2) → ReLU → flatten → dense(128) → ReLU
[= features] → dense(num_classes) [= logits]. About 1.4 M multiply-adds per 28×28 image, so it trains
on a CPU; on 8,000 MNIST test-set digits (1,000 Adam steps of 128) it reaches ~98% on the other 2,000.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

__all__ = [
    "DigitClassifier",
    "TrainedClassifier",
    "train_digit_classifier",
    "classifier_features",
    "classifier_logits",
    "classifier_feature_extractor",
    "FEATURE_DIM",
]

FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """Small CNN; ``__call__(images [B, H, W, C]) -> logits [B, num_classes]``; ``features`` -> ``[B, 128]``."""

    num_classes: int
    feature_dim: int = FEATURE_DIM

    def setup(self):
        self.conv1 = nn.Conv(32, (3, 3), strides=(2, 2))
        self.conv2 = nn.Conv(64, (3, 3), strides=(2, 2))
        self.dense = nn.Dense(self.feature_dim)
        self.head = nn.Dense(self.num_classes)

    def features(self, images):
        x = nn.relu(self.conv1(images))
        x = nn.relu(self.conv2(x))
        x = x.reshape(x.shape[0], -1)  # keep the spatial layout: digits are defined by where strokes are
        return nn.relu(self.dense(x))

    def __call__(self, images):
        return self.head(self.features(images))


class TrainedClassifier(NamedTuple):
    """Result of :func:`train_digit_classifier`.

    Attributes:
      params: Flax parameter pytree of :class:`DigitClassifier` (``{"params": ...}``).
      apply_fn: ``apply_fn(params, images [B, H, W, C]) -> logits [B, num_classes]`` (jitted).
      test_accuracy: accuracy on the given test split, or None when no test split was given.
    """

    params: dict
    apply_fn: Callable
    test_accuracy: float | None


def _check_images(images, name="images") -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must have shape [N, H, W, C] with C in (1, 3), got {images.shape}")
    return images


def _num_classes_of(params) -> int:
    try:
        return int(params["params"]["head"]["bias"].shape[0])
    except (KeyError, TypeError) as err:
        raise ValueError("params are not DigitClassifier parameters (no params/head/bias)") from err


@jax.jit
def classifier_logits(params, images):
    """Logits ``[B, num_classes]`` of a trained :class:`DigitClassifier` for ``images [B, H, W, C]`` in [−1, 1]."""
    return DigitClassifier(_num_classes_of(params)).apply(params, images)


@jax.jit
def classifier_features(params, images):
    """Penultimate-layer features ``[B, 128]`` (post-ReLU) for ``images [B, H, W, C]`` in [−1, 1]."""
    model = DigitClassifier(_num_classes_of(params))
    return model.apply(params, images, method=DigitClassifier.features)


def classifier_feature_extractor(params) -> Callable:
    """A :data:`~hmdm_jax.metrics.fid.FeatureExtractor` (images → ``[B, 128]``) bound to ``params``."""
    return lambda images: classifier_features(params, jnp.asarray(images, jnp.float32))


def train_digit_classifier(key, images, labels, num_classes: int, steps: int = 2000, batch_size: int = 128,
                           learning_rate: float = 1e-3, test_images=None, test_labels=None,
                           eval_batch_size: int = 1000) -> TrainedClassifier:
    """Trains :class:`DigitClassifier` with Adam on (images, labels); evaluates on the test split if given.

    Args:
      key: PRNG key (initialisation and minibatch order).
      images: ``[N, H, W, C]`` float32 in [−1, 1], the training split.
      labels: ``[N]`` int in ``[0, num_classes)``; entries equal to ``-1`` are dropped.
      num_classes: number of classes.
      steps: Adam steps (minibatches with replacement-free epochs).
      batch_size: minibatch size.
      learning_rate: Adam step size (cosine-decayed to 0).
      test_images, test_labels: optional held-out split for the reported accuracy.

    Returns:
      :class:`TrainedClassifier` ``(params, apply_fn, test_accuracy)``.
    """
    images = _check_images(images)
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    keep = labels >= 0
    images, labels = images[keep], labels[keep]
    if labels.size == 0:
        raise ValueError("no labelled training images")
    if labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} out of range for num_classes={num_classes}")
    batch_size = min(batch_size, images.shape[0])

    model = DigitClassifier(num_classes)
    init_key, order_key = jax.random.split(key)
    params = model.init(init_key, jnp.zeros((1,) + images.shape[1:], jnp.float32))
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(int(jax.random.randint(order_key, (), 0, 2**31 - 1)))
    num = images.shape[0]
    perm, pos = rng.permutation(num), 0
    for _ in range(steps):
        if pos + batch_size > num:
            perm, pos = rng.permutation(num), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        params, opt_state, _ = train_step(params, opt_state, images[idx], labels[idx])

    test_accuracy = None
    if test_images is not None:
        if test_labels is None:
            raise ValueError("test_images given without test_labels")
        test_images = _check_images(test_images, "test_images")
        test_labels = np.asarray(test_labels).reshape(-1)
        if test_labels.shape[0] != test_images.shape[0]:
            raise ValueError(f"{test_images.shape[0]} test images but {test_labels.shape[0]} test labels")
        preds = np.concatenate([
            np.asarray(jnp.argmax(classifier_logits(params, test_images[i:i + eval_batch_size]), -1))
            for i in range(0, test_images.shape[0], eval_batch_size)
        ])
        scored = test_labels >= 0
        test_accuracy = float(np.mean(preds[scored] == test_labels[scored]))
    return TrainedClassifier(params, classifier_logits, test_accuracy)
