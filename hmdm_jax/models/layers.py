"""Building blocks shared by the U-Net and the MLP: time embedding, class embedding, GroupNorm sizing."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "ConditioningEmbedding", "num_groups_for", "select_class", "sinusoidal_embedding",
]

Array = jax.Array


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """Transformer-style sinusoidal features of a (float) diffusion time.

    Args:
      t: ``[B]`` diffusion times (ints 1..T are cast to float32; no rescaling).
      dim: even number of features.
      max_period: the slowest frequency is ``1 / max_period``.

    Returns:
      ``[B, dim]`` float32, ``[sin(t ω_0..ω_{dim/2-1}), cos(t ω_0..)]`` with ``ω_i`` geometric from 1
      down to ``1 / max_period``.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding needs an even dim, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """GroupNorm group count for ``channels``: the largest divisor ``<= min(max_groups, channels // 2)``.

    At least two channels per group (a one-channel group normalises each feature map on its own,
    which erases per-channel scale on small maps); one group when ``channels == 1``.
    """
    bound = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, bound + 1) if channels % g == 0)


class ConditioningEmbedding(nn.Module):
    """Embedding of (t, k): MLP(sinusoidal(t)) + Embed(k), with ``num_classes + 1`` class rows.

    Row ``num_classes`` is the "null" class of classifier-free guidance / label dropout.

    Attributes:
      dim: output width.
      num_classes: K, the number of real classes.
      class_conditioned: add the class row. False for the trunk of a multi-head network, which sees t
        only (its class heads carry the class); it then has no class table and ignores ``k``.
    """

    dim: int
    num_classes: int
    class_conditioned: bool = True

    @nn.compact
    def __call__(self, t: Array, k: Array | None) -> Array:
        """``t``: ``[B]`` int or float times; ``k``: ``[B]`` int32 in ``0..num_classes``. Returns ``[B, dim]``.

        An out-of-range ``k`` (including ``-1``, the "unknown label" of the data convention) gives NaN
        rows rather than silently wrapping to the null class; shapes are checked by the caller.
        """
        temb = sinusoidal_embedding(t, self.dim)
        temb = nn.Dense(self.dim, name="time_dense_0")(temb)
        temb = nn.Dense(self.dim, name="time_dense_1")(nn.silu(temb))
        if not self.class_conditioned:
            return temb
        table = self.param("class_embed", nn.initializers.normal(stddev=1.0),
                           (self.num_classes + 1, self.dim), jnp.float32)
        k = jnp.asarray(k, jnp.int32)
        in_range = (k >= 0) & (k <= self.num_classes)
        cemb = jnp.where(in_range[:, None], table[jnp.clip(k, 0, self.num_classes)], jnp.nan)
        return temb + cemb


def select_class(k: Array, num_classes: int, heads: Array) -> Array:
    """Row ``k[b]`` of ``heads[b]`` for each b: ``heads [B, K + 1, ...]``, ``k [B]`` → ``[B, ...]``.

    The multi-head networks' way to pick one class's prediction out of all of them: a one-hot
    contraction, whose gradient is a dense product (a gather's scatter-add gradient is slower on CPU).
    Like the class table, an out-of-range ``k`` (e.g. −1, an unknown label) gives NaN instead of
    wrapping around.
    """
    k = jnp.asarray(k, jnp.int32)
    picked = jnp.einsum("bk...,bk->b...", heads, jax.nn.one_hot(k, num_classes + 1, dtype=heads.dtype))
    in_range = (k >= 0) & (k <= num_classes)
    return jnp.where(in_range.reshape((-1,) + (1,) * (picked.ndim - 1)), picked, jnp.nan)
