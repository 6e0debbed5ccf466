"""Class-conditional MLP ε_θ(z_t, t, k) for vectors ``[B, D]`` (toy data, fast tests).

The input is projected to ``mlp_width`` and summed with the (t, k) embedding; each of ``mlp_depth``
blocks adds ``Dense(SiLU(emb))`` again, so the conditioning reaches every layer:

* residual:  ``h ← h + Dense(dropout(SiLU(Dense(LN(h)) + Dense(SiLU(emb)))))``
* plain:     ``h ← dropout(SiLU(Dense(h) + Dense(SiLU(emb))))``

and the output is ``Dense_D(SiLU(LN(h)))`` (zero-initialised by default), plus ``W z_t`` with
``mlp_input_skip``. Any event shape is flattened to ``D = prod(event)`` and reshaped back.

With ``class_heads="multi_head"`` the embedding is the time's alone and the output projection is
:class:`ClassHeads`, K + 1 of them, so ``k=None`` gives every class's ε from one pass of the blocks.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .configs import ModelConfig
from .layers import ConditioningEmbedding, select_class
from .unet import check_batch_conditioning

__all__ = [
    "ClassHeads", "MLP",
]

Array = jax.Array


class MLP(nn.Module):
    """Class-conditional ε-network on flattened events.

    Attributes:
      config: a ``kind="mlp"`` :class:`ModelConfig`.
      num_classes: K; class index K is the null class.
    """

    config: ModelConfig
    num_classes: int

    @nn.compact
    def __call__(self, z_t: Array, t: Array, k: Array | None, train: bool = False) -> Array:
        """ε_θ(z_t, t, k), or with ``k=None`` ε_θ(z_t, t, k) for every real class k (multi-head only).

        Args:
          z_t: ``[B, D]`` (or ``[B, *event]``, flattened) float32 noisy vectors.
          t: ``[B]`` int32 diffusion times in 1..T.
          k: ``[B]`` int32 classes in 0..K (K = null class), or None: all classes 0..K−1 from one trunk
            pass (needs ``config.class_heads == "multi_head"``).
          train: enable dropout (needs a ``"dropout"`` rng when ``config.dropout > 0``).

        Returns:
          ``[B, *event]`` float32 predicted noise; with ``k=None``, ``[B, K, *event]``.
        """
        cfg = self.config
        multi_head = cfg.class_heads == "multi_head"
        shape = jnp.shape(z_t)
        if len(shape) < 2:
            raise ValueError(f"the MLP takes z_t of shape [B, D] (or [B, *event]), got shape {shape}")
        if k is None:
            if not multi_head:
                raise ValueError("all classes in one pass (k=None) needs class_heads='multi_head'")
            check_batch_conditioning(shape[0], t, jnp.zeros(shape[0], jnp.int32))
        else:
            check_batch_conditioning(shape[0], t, k)
        dim = math.prod(shape[1:])
        width = cfg.mlp_width
        emb = ConditioningEmbedding(cfg.embed_dim, self.num_classes, class_conditioned=not multi_head,
                                    name="cond")(t, k)
        emb = nn.silu(emb)

        flat = z_t.reshape(shape[0], dim).astype(jnp.float32)
        h = nn.Dense(width, name="in_proj")(flat)
        h = h + nn.Dense(width, name="emb_in")(emb)
        for i in range(cfg.mlp_depth):
            if cfg.mlp_residual:
                u = nn.LayerNorm(name=f"norm_{i}")(h) if cfg.mlp_layernorm else h
                u = nn.silu(nn.Dense(width, name=f"dense_{i}")(u)
                            + nn.Dense(width, name=f"emb_{i}")(emb))
                u = nn.Dropout(cfg.dropout, deterministic=not train)(u)
                h = h + nn.Dense(width, name=f"dense_out_{i}")(u)
            else:
                h = nn.silu(nn.Dense(width, name=f"dense_{i}")(h)
                            + nn.Dense(width, name=f"emb_{i}")(emb))
                h = nn.Dropout(cfg.dropout, deterministic=not train)(h)
        if cfg.mlp_residual and cfg.mlp_layernorm:
            h = nn.LayerNorm(name="norm_out")(h)
        h = nn.silu(h) if cfg.mlp_residual else h
        kernel_init = (nn.initializers.zeros if cfg.zero_init_output
                       else nn.initializers.lecun_normal())
        if multi_head:
            out = ClassHeads(dim, self.num_classes, kernel_init, cfg.head_rank, name="out_heads")(h, k)
        else:
            out = nn.Dense(dim, kernel_init=kernel_init, name="out_proj")(h)
        if cfg.mlp_input_skip:  # class-independent: under a vmap over k it is computed once
            skip = nn.Dense(dim, kernel_init=kernel_init, use_bias=False, name="input_skip")(flat)
            out = out + (skip if k is not None else skip[:, None])
        return out.reshape(shape if k is not None else (shape[0], self.num_classes) + shape[1:])


class ClassHeads(nn.Module):
    """K + 1 linear output heads on shared features, one per class and one (row K) for the null class.

    ``kernel [width, K + 1, D]``, ``bias [K + 1, D]``: head-major columns, so all heads are one matmul
    ``[B, width] @ [width, (K + 1)·D]``. With ``k [B]`` each example takes its own class's head (the
    others' outputs are discarded, so only that head gets a gradient); with ``k=None`` every example
    goes through the K real heads: ``[B, K, D]``.

    With ``rank = r > 0`` a head is ``h W + (h U_k) V_k + b_k``: one shared ``kernel [width, D]``, and per class
    ``class_in [width, K + 1, r]`` (U) and ``class_out [K + 1, r, D]`` (V, initialised like the kernel). Then
    one class costs about one ``[width, D]`` projection instead of K + 1 of them, and only its own U, V and b
    get a gradient.

    Attributes:
      features: D.
      num_classes: K.
      kernel_init: initialiser of each head's ``[width, D]`` kernel (the shared one, and V, with a rank).
      rank: 0 for full heads, else r.
    """

    features: int
    num_classes: int
    kernel_init: object = nn.initializers.lecun_normal()
    rank: int = 0

    @nn.compact
    def __call__(self, h: Array, k: Array | None) -> Array:
        """``h``: ``[B, width]``; ``k``: ``[B]`` int32 in 0..K or None. Returns ``[B, D]`` or ``[B, K, D]``."""
        heads, width = self.num_classes + 1, h.shape[-1]
        init = self.kernel_init
        if self.rank:
            return self._low_rank(h, k)

        def kernel_init(key, shape, dtype=jnp.float32):
            per_head = jax.vmap(lambda kk: init(kk, (shape[0], shape[2]), dtype))(jax.random.split(key, shape[1]))
            return jnp.moveaxis(per_head, 0, 1)

        kernel = self.param("kernel", kernel_init, (width, heads, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (heads, self.features), jnp.float32)
        used = self.num_classes if k is None else heads
        out = h @ kernel[:, :used].reshape(width, used * self.features)
        out = out.reshape(h.shape[0], used, self.features) + bias[:used]
        return out if k is None else select_class(k, self.num_classes, out)

    def _low_rank(self, h: Array, k: Array | None) -> Array:
        heads, width, r, d = self.num_classes + 1, h.shape[-1], self.rank, self.features
        kernel = self.param("kernel", self.kernel_init, (width, d), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (heads, d), jnp.float32)
        class_in = self.param("class_in", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                              (width, heads, r), jnp.float32)
        out_init = lambda key, shape, dtype=jnp.float32: self.kernel_init(key, (heads * r, d), dtype).reshape(shape)
        class_out = self.param("class_out", out_init, (heads, r, d), jnp.float32)
        shared = h @ kernel
        low = (h @ class_in.reshape(width, heads * r)).reshape(h.shape[0], heads, r)
        if k is None:
            k_real = self.num_classes
            return shared[:, None] + jnp.einsum("bkr,krd->bkd", low[:, :k_real], class_out[:k_real]) + bias[:k_real]
        picked = select_class(k, self.num_classes, low)  # [B, r], NaN for a class out of range
        one_hot = jax.nn.one_hot(k, heads, dtype=h.dtype)
        # the class's V as a dense product over the one-hot spread of its r features (no gather)
        spread = (one_hot[:, :, None] * picked[:, None, :]).reshape(h.shape[0], heads * r)
        return shared + spread @ class_out.reshape(heads * r, d) + one_hot @ bias
