"""Class-conditional U-Net ε_θ(z_t, t, k) for images ``[B, H, W, C]`` (DDPM layout, Ho et al. 2020).

Down path: a 3×3 input conv, then per level ``num_res_blocks`` residual blocks (each optionally
followed by self-attention) and, except at the last level, a stride-2 3×3 conv. Middle: residual
block, optional attention, residual block. Up path: per level ``num_res_blocks + 1`` residual blocks
on the concatenation with the matching skip, and a nearest ×2 upsample + 3×3 conv except at level 0.
Output: GroupNorm, SiLU, 3×3 conv to C channels (zero-initialised by default). With
``class_heads="multi_head"`` the blocks see the time embedding alone and the output conv has
(K + 1)·C channels, C per class and C for the null class: one pass gives every class's ε.

Every normalisation is per example (GroupNorm, attention over the H·W positions of one example), so
the leading axis is a true batch axis and the network commutes with ``jax.vmap``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .configs import ModelConfig
from .layers import ConditioningEmbedding, num_groups_for, select_class

__all__ = [
    "AttentionBlock", "check_batch_conditioning", "check_image_input", "ResBlock", "UNet",
]

Array = jax.Array


def _group_norm(channels: int, max_groups: int, name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups_for(channels, max_groups), name=name)


class ResBlock(nn.Module):
    """GN → SiLU → conv → (+ Dense(SiLU(emb))) → GN → SiLU → dropout → conv, plus a (1×1) skip.

    Attributes:
      out_channels: output width.
      max_groups: GroupNorm bound (see :func:`num_groups_for`).
      dropout: dropout rate.
    """

    out_channels: int
    max_groups: int = 32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> Array:
        """``x``: ``[B, H, W, C_in]``, ``emb``: ``[B, E]``. Returns ``[B, H, W, out_channels]``."""
        h = nn.silu(_group_norm(x.shape[-1], self.max_groups)(x))
        h = nn.Conv(self.out_channels, (3, 3))(h)
        h = h + nn.Dense(self.out_channels)(nn.silu(emb))[:, None, None, :]
        h = nn.silu(_group_norm(self.out_channels, self.max_groups)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.out_channels, (3, 3))(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions of each example, with a residual connection.

    Attributes:
      num_heads: heads; must divide the channel count.
      max_groups: GroupNorm bound.
    """

    num_heads: int = 1
    max_groups: int = 32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``x``: ``[B, H, W, C]``. Returns ``[B, H, W, C]``."""
        b, hgt, wid, c = x.shape
        head_dim = c // self.num_heads
        h = _group_norm(c, self.max_groups)(x).reshape(b, hgt * wid, c)
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), name="qkv")(h)  # [B, N, 3, heads, d]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        out = nn.DenseGeneral(c, axis=(-2, -1), name="proj")(out)
        return x + out.reshape(b, hgt, wid, c)


class UNet(nn.Module):
    """Class-conditional ε-network for images.

    Attributes:
      config: a ``kind="unet"`` :class:`ModelConfig`.
      num_classes: K; class index K is the null class.
    """

    config: ModelConfig
    num_classes: int

    @nn.compact
    def __call__(self, z_t: Array, t: Array, k: Array | None, train: bool = False) -> Array:
        """ε_θ(z_t, t, k), or with ``k=None`` ε_θ(z_t, t, k) for every real class k (multi-head only).

        Args:
          z_t: ``[B, H, W, C]`` float32 noisy images; H and W divisible by ``config.spatial_divisor``.
          t: ``[B]`` int32 diffusion times in 1..T (embedded as floats; float t is accepted too).
          k: ``[B]`` int32 classes in 0..K (K = null class), or None: all classes 0..K−1 from one trunk
            pass (needs ``config.class_heads == "multi_head"``).
          train: enable dropout (needs a ``"dropout"`` rng when ``config.dropout > 0``).

        Returns:
          ``[B, H, W, C]`` float32 predicted noise; with ``k=None``, ``[B, K, H, W, C]``.
        """
        cfg = self.config
        multi_head = cfg.class_heads == "multi_head"
        if k is None and not multi_head:
            raise ValueError("all classes in one pass (k=None) needs class_heads='multi_head'")
        check_image_input(cfg, z_t, t, jnp.zeros(jnp.shape(z_t)[:1], jnp.int32) if k is None else k)
        out_channels = z_t.shape[-1]
        emb = ConditioningEmbedding(cfg.embed_dim, self.num_classes, class_conditioned=not multi_head,
                                    name="cond")(t, k)

        def res_block(width: int):
            return ResBlock(width, max_groups=cfg.max_groups, dropout=cfg.dropout)

        def attention():
            return AttentionBlock(num_heads=cfg.num_heads, max_groups=cfg.max_groups)

        h = nn.Conv(cfg.base_width, (3, 3), name="conv_in")(z_t.astype(jnp.float32))
        skips = [h]
        last = len(cfg.channel_mults) - 1
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                h = res_block(cfg.base_width * mult)(h, emb, train)
                if level in cfg.attention_levels:
                    h = attention()(h)
                skips.append(h)
            if level != last:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding="SAME")(h)
                skips.append(h)

        width = cfg.base_width * cfg.channel_mults[-1]
        h = res_block(width)(h, emb, train)
        if cfg.mid_attention:
            h = attention()(h)
        h = res_block(width)(h, emb, train)

        for level in reversed(range(len(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(cfg.base_width * cfg.channel_mults[level])(h, emb, train)
                if level in cfg.attention_levels:
                    h = attention()(h)
            if level != 0:
                # Sizes are exact multiples of 2 (checked), so nearest ×2 lands on the skip's shape.
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = nn.Conv(h.shape[-1], (3, 3))(h)
        assert not skips

        h = nn.silu(_group_norm(h.shape[-1], cfg.max_groups, name="norm_out")(h))
        kernel_init = (nn.initializers.zeros if cfg.zero_init_output
                       else nn.initializers.lecun_normal())
        if not multi_head:
            return nn.Conv(out_channels, (3, 3), kernel_init=kernel_init, name="conv_out")(h)
        # K + 1 heads in one conv: output channels grouped by class, [..., (K + 1)·C] → [..., K + 1, C]
        heads = self.num_classes + 1
        out = nn.Conv(heads * out_channels, (3, 3), kernel_init=kernel_init, name="conv_out")(h)
        out = jnp.moveaxis(out.reshape(out.shape[:-1] + (heads, out_channels)), 3, 1)  # [B, K + 1, H, W, C]
        if k is None:
            return out[:, :self.num_classes]
        return select_class(k, self.num_classes, out)


def check_batch_conditioning(batch: int, t: Array, k: Array) -> None:
    """Raise ValueError unless ``t`` is a ``[batch]`` numeric array and ``k`` a ``[batch]`` int array."""
    for name, arr in (("t", t), ("k", k)):
        shape = jnp.shape(arr)
        if shape != (batch,):
            raise ValueError(f"{name} must have shape [B] = ({batch},), got {shape}")
    if not jnp.issubdtype(jnp.result_type(k), jnp.integer):
        raise ValueError(f"class index k must be an integer array, got dtype {jnp.result_type(k)}")


def check_image_input(cfg: ModelConfig, z_t: Array, t: Array, k: Array) -> None:
    """Raise ValueError unless ``z_t`` is ``[B, H, W, C]`` with H, W divisible as ``cfg`` needs."""
    shape = jnp.shape(z_t)
    if len(shape) != 4:
        raise ValueError(
            f"the U-Net takes images z_t of shape [B, H, W, C], got shape {shape} "
            f"(use a kind='mlp' config for vectors [B, D])")
    _, hgt, wid, _ = shape
    div = cfg.spatial_divisor
    if hgt % div or wid % div:
        raise ValueError(
            f"image size {hgt}x{wid} is not divisible by 2**(levels-1) = {div} for "
            f"channel_mults={cfg.channel_mults}; use fewer levels (28x28 takes at most 3)")
    check_batch_conditioning(shape[0], t, k)
