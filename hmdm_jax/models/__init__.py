"""Flax ε-networks ε_θ(z_t, t, k) plugged into the core as ``eps_fn(params, z_t, t, k)``.

* :class:`UNet` for images ``[B, H, W, C]`` (C = 1 or 3), :class:`MLP` for vectors ``[B, D]``.
* Class index ``k`` runs over ``0..K``; ``k = K = num_classes`` is the null (unconditional) class.
* :func:`make_eps_fn` gives the deterministic pure function, :func:`make_train_eps_fn` the dropout one;
  both also carry ``all_classes``, every class's ε from one pass, when the network has class heads
  (``ModelConfig(class_heads="multi_head")``).

``python -m hmdm_jax.models`` prints the parameter counts of the presets as a Markdown table.
"""
from .api import (
    EpsFn,
    TrainEpsFn,
    build_model,
    check_params_fit,
    copy_class,
    init_params,
    make_eps_fn,
    make_train_eps_fn,
    param_count,
    param_shapes,
    param_table,
)
from .configs import CLASS_HEADS, PRESET_EVENT_SHAPES, PRESET_NAMES, ModelConfig, get_model_config
from .layers import ConditioningEmbedding, num_groups_for, select_class, sinusoidal_embedding
from .mlp import MLP, ClassHeads
from .unet import AttentionBlock, ResBlock, UNet

__all__ = [
    "AttentionBlock", "CLASS_HEADS", "ClassHeads", "ConditioningEmbedding", "EpsFn", "MLP", "ModelConfig",
    "PRESET_EVENT_SHAPES", "PRESET_NAMES", "ResBlock", "TrainEpsFn", "UNet", "build_model",
    "check_params_fit", "copy_class", "get_model_config", "init_params", "make_eps_fn", "make_train_eps_fn",
    "num_groups_for", "param_count", "param_shapes", "param_table", "select_class", "sinusoidal_embedding",
]
