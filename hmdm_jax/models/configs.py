"""Static configuration of the ε-networks: one frozen dataclass and named presets.

A :class:`ModelConfig` is hashable, so it can be a Flax module attribute or a ``static_argnames``
argument. Derive variants with :func:`dataclasses.replace`, e.g.
``dataclasses.replace(get_model_config("mnist28-unet"), base_width=32)``.
"""
from __future__ import annotations

import dataclasses

__all__ = [
    "CLASS_HEADS", "get_model_config", "KINDS", "ModelConfig", "PRESET_NAMES",
]

KINDS = ("unet", "mlp")
CLASS_HEADS = ("embedding", "multi_head")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of an ε-network ``ε_θ(z_t, t, k)``.

    Attributes:
      kind: ``"unet"`` (images ``[B, H, W, C]``) or ``"mlp"`` (vectors ``[B, D]``; any event shape is
        flattened).
      base_width: U-Net channels at the input resolution (level 0).
      channel_mults: U-Net level ``l`` has ``base_width * channel_mults[l]`` channels and spatial size
        ``H / 2**l``; ``len(channel_mults)`` levels, so ``H`` and ``W`` must be divisible by
        ``2**(len(channel_mults) - 1)`` (28 → 14 → 7 takes three levels).
      num_res_blocks: residual blocks per level on the way down (the way up has one more, as in DDPM).
      attention_levels: U-Net levels (0-based, 0 = input resolution) whose residual blocks are followed
        by self-attention. Levels, not pixel sizes, so that a config means the same at 28 and 32.
      mid_attention: self-attention between the two residual blocks at the lowest resolution.
      num_heads: attention heads; must divide the width of every level with attention.
      max_groups: upper bound on GroupNorm groups; the count used for ``c`` channels is the largest
        divisor of ``c`` that is ``<= min(max_groups, c // 2)`` (at least 2 channels a group, 1 group
        for a single channel).
      time_embed_dim: width of the time + class embedding; 0 means ``4 * base_width`` for the U-Net and
        ``mlp_width`` for the MLP.
      dropout: dropout rate inside residual blocks (U-Net) or hidden layers (MLP); only active through
        ``make_train_eps_fn``.
      zero_init_output: initialise the last layer to zero (ε ≡ 0 at init, as in DDPM).
      mlp_width: hidden width of the MLP.
      mlp_depth: number of hidden blocks of the MLP.
      mlp_residual: pre-norm residual blocks ``h + f(h)`` instead of a plain ``Dense + SiLU`` stack.
      mlp_layernorm: LayerNorm at the start of each residual block (only with ``mlp_residual``).
      mlp_input_skip: add a linear map of z_t to the output. Needed when ``mlp_width`` is below the data
        dimension D: at large t, ε ≈ z_t / √(1 − ᾱ_t) has D free directions that a narrower hidden layer
        cannot carry (measured on 28×28 MNIST, width 256: the ε-loss stalls at ≈ 1 − 256/784).
      class_heads: where the class enters. ``"embedding"``: a learned class row is added to the time
        embedding that conditions every block, so scoring K classes takes K passes of the whole network.
        ``"multi_head"``: the trunk sees (z_t, t) only and the last layer (the MLP's output projection,
        the U-Net's output conv) has K + 1 heads, one per class and one for the null class (its own head,
        so classifier-free guidance and label dropout still work); one trunk pass then gives ε for every
        class (``models.make_eps_fn(model).all_classes``), the multi-head form of the Robust Diffusion
        Classifier (Chen et al., ICML 2024). The class can then change ε only through a linear map of
        shared features.
      head_rank: MLP with ``"multi_head"``: 0, a full ``[width, D]`` head per class; r > 0, one shared output
        projection plus a rank-r class term per class, ``h W + (h U_k) V_k + b_k``. A full head computes all
        K + 1 heads to train one class, which dominates the single-class step at large D (benchmarks/README.md);
        the rank-r term costs ``(K + 1)·r·(width + D)`` per frame.
    """

    kind: str = "unet"
    base_width: int = 64
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    num_heads: int = 1
    max_groups: int = 32
    time_embed_dim: int = 0
    dropout: float = 0.0
    zero_init_output: bool = True
    mlp_width: int = 256
    mlp_depth: int = 3
    mlp_residual: bool = True
    mlp_layernorm: bool = True
    mlp_input_skip: bool = False
    class_heads: str = "embedding"
    head_rank: int = 0

    def __post_init__(self):
        # Lists are accepted for convenience but stored as tuples so that the config stays hashable.
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(self, "attention_levels", tuple(int(a) for a in self.attention_levels))
        if self.kind not in KINDS:
            raise ValueError(f"ModelConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.class_heads not in CLASS_HEADS:
            raise ValueError(f"ModelConfig.class_heads must be one of {CLASS_HEADS}, got {self.class_heads!r}")
        if self.head_rank < 0 or (self.head_rank and (self.kind != "mlp" or self.class_heads != "multi_head")):
            raise ValueError(f"ModelConfig.head_rank must be 0, or > 0 for an MLP with class_heads='multi_head' "
                             f"(got {self.head_rank} with kind={self.kind!r}, class_heads={self.class_heads!r})")
        if self.dropout < 0.0 or self.dropout >= 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.time_embed_dim < 0 or self.time_embed_dim % 2:
            raise ValueError(
                f"ModelConfig.time_embed_dim must be 0 (default) or a positive even int, "
                f"got {self.time_embed_dim}")
        if self.kind == "unet":
            if self.base_width < 1:
                raise ValueError(f"ModelConfig.base_width must be >= 1, got {self.base_width}")
            if not self.channel_mults or min(self.channel_mults) < 1:
                raise ValueError(
                    f"ModelConfig.channel_mults must be a non-empty tuple of positive ints, "
                    f"got {self.channel_mults}")
            if self.num_res_blocks < 1:
                raise ValueError(f"ModelConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}")
            num_levels = len(self.channel_mults)
            for level in self.attention_levels:
                if not 0 <= level < num_levels:
                    raise ValueError(
                        f"ModelConfig.attention_levels entry {level} is outside the {num_levels} "
                        f"levels 0..{num_levels - 1} of channel_mults={self.channel_mults}")
            attended = [self.channel_mults[lv] for lv in self.attention_levels]
            if self.mid_attention:
                attended.append(self.channel_mults[-1])
            if self.num_heads < 1:
                raise ValueError(f"ModelConfig.num_heads must be >= 1, got {self.num_heads}")
            for mult in attended:
                if (self.base_width * mult) % self.num_heads:
                    raise ValueError(
                        f"ModelConfig.num_heads={self.num_heads} does not divide the attention width "
                        f"{self.base_width * mult}")
            if self.max_groups < 1:
                raise ValueError(f"ModelConfig.max_groups must be >= 1, got {self.max_groups}")
        else:
            if self.mlp_width < 1 or self.mlp_depth < 1:
                raise ValueError(
                    f"ModelConfig.mlp_width and mlp_depth must be >= 1, "
                    f"got {self.mlp_width}, {self.mlp_depth}")

    @property
    def embed_dim(self) -> int:
        """Width of the time + class embedding actually used."""
        if self.time_embed_dim:
            return self.time_embed_dim
        return 4 * self.base_width if self.kind == "unet" else self.mlp_width

    @property
    def spatial_divisor(self) -> int:
        """U-Net only: H and W must be multiples of this (``2**(len(channel_mults) - 1)``)."""
        return 2 ** (len(self.channel_mults) - 1)


_PRESETS: dict[str, ModelConfig] = {
    # 8×8 → 4×4; tiny so that a CPU train step on 256 frames takes tens of ms.
    "digits8-unet": ModelConfig(
        kind="unet", base_width=16, channel_mults=(1, 2), num_res_blocks=1,
        attention_levels=(), mid_attention=True, num_heads=1, dropout=0.0),
    # 28 → 14 → 7 (7 is not downsampled further); attention at 7×7.
    "mnist28-unet": ModelConfig(
        kind="unet", base_width=64, channel_mults=(1, 2, 2), num_res_blocks=2,
        attention_levels=(2,), mid_attention=True, num_heads=4, dropout=0.1),
    # DDPM's CIFAR-10 layout (32 → 16 → 8 → 4, attention at 16×16) at 3/4 of its width.
    "cifar32-unet": ModelConfig(
        kind="unet", base_width=96, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
        attention_levels=(1,), mid_attention=True, num_heads=4, dropout=0.1),
    # Toy vectors and fast tests.
    "mlp-small": ModelConfig(
        kind="mlp", mlp_width=128, mlp_depth=3, mlp_residual=True, mlp_layernorm=True),
    "mlp": ModelConfig(
        kind="mlp", mlp_width=512, mlp_depth=4, mlp_residual=True, mlp_layernorm=True),
}

# The event shape each preset is sized for (used by the parameter table; any fitting shape works).
PRESET_EVENT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits8-unet": (8, 8, 1),
    "mnist28-unet": (28, 28, 1),
    "cifar32-unet": (32, 32, 3),
    "mlp-small": (2,),
    "mlp": (64,),
}

PRESET_NAMES = tuple(_PRESETS)


def get_model_config(name: str) -> ModelConfig:
    """The named preset: one of ``PRESET_NAMES``.

    Raises:
      ValueError: unknown name.
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(PRESET_NAMES)}") from None
