"""Class-conditional MLP ε_θ(z_t, t, k) for vectors ``[B, D]`` (toy data, fast tests).

The input is projected to ``mlp_width`` and summed with the (t, k) embedding; each of ``mlp_depth``
blocks adds ``Dense(SiLU(emb))`` again, so the conditioning reaches every layer:

* residual:  ``h ← h + Dense(dropout(SiLU(Dense(LN(h)) + Dense(SiLU(emb)))))``
* plain:     ``h ← dropout(SiLU(Dense(h) + Dense(SiLU(emb))))``

and the output is ``Dense_D(SiLU(LN(h)))`` (zero-initialised by default), plus ``W z_t`` with
``mlp_input_skip``. Any event shape is flattened to ``D = prod(event)`` and reshaped back.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .configs import ModelConfig
from .layers import ConditioningEmbedding
from .unet import check_batch_conditioning

__all__ = [
    "MLP",
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
    def __call__(self, z_t: Array, t: Array, k: Array, train: bool = False) -> Array:
        """ε_θ(z_t, t, k).

        Args:
          z_t: ``[B, D]`` (or ``[B, *event]``, flattened) float32 noisy vectors.
          t: ``[B]`` int32 diffusion times in 1..T.
          k: ``[B]`` int32 classes in 0..K (K = null class).
          train: enable dropout (needs a ``"dropout"`` rng when ``config.dropout > 0``).

        Returns:
          ``[B, *event]`` float32 predicted noise.
        """
        cfg = self.config
        shape = jnp.shape(z_t)
        if len(shape) < 2:
            raise ValueError(f"the MLP takes z_t of shape [B, D] (or [B, *event]), got shape {shape}")
        check_batch_conditioning(shape[0], t, k)
        dim = math.prod(shape[1:])
        width = cfg.mlp_width
        emb = ConditioningEmbedding(cfg.embed_dim, self.num_classes, name="cond")(t, k)
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
        out = nn.Dense(dim, kernel_init=kernel_init, name="out_proj")(h)
        if cfg.mlp_input_skip:  # class-independent: under a vmap over k it is computed once
            out = out + nn.Dense(dim, kernel_init=kernel_init, use_bias=False, name="input_skip")(flat)
        return out.reshape(shape)
