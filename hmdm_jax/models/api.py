"""Build a Flax ε-network, initialise it, and expose it as the core's pure ``eps_fn``.

Typical use::

    model = build_model(get_model_config("mnist28-unet"), num_classes=10)
    params = init_params(jax.random.key(0), model, (28, 28, 1))
    eps_fn = make_eps_fn(model)                 # eps_fn(params, z_t, t, k), deterministic
    train_eps_fn = make_train_eps_fn(model)     # train_eps_fn(dropout_key, params, z_t, t, k)
    eps_fn_step = train_eps_fn.bind(dropout_key)   # 4-argument form for one step

Both are :class:`EpsFn`-style objects: plain 4- (5-) argument callables that also carry
``all_classes``, every class's ε from one network pass when the network has class heads
(``ModelConfig.class_heads="multi_head"``), else None. ``emission.eps_all_classes`` uses it when there,
and vmaps the 4-argument call over the classes otherwise (any plain function keeps working).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .configs import PRESET_EVENT_SHAPES, PRESET_NAMES, ModelConfig, get_model_config
from .mlp import MLP
from .unet import UNet

__all__ = [
    "build_model", "check_params_fit", "copy_class", "EpsFn", "init_params", "make_eps_fn", "make_train_eps_fn",
    "param_count", "param_shapes", "param_table", "TrainEpsFn",
]

Array = jax.Array
Params = Mapping[str, object]


@dataclasses.dataclass(frozen=True, eq=False)
class EpsFn:
    """An ε-network as the core's pure function, with its one-pass all-classes form when it has one.

    ``eps_fn(params, z_t [B, *event], t [B], k [B]) -> [B, *event]`` is the call every caller makes;
    ``all_classes(params, z_t, t) -> [K, B, *event]`` gives ε for every real class k = 0..K−1 at once
    (``None`` when the network has no one-pass form, and callers fall back to K calls). Hashed by
    identity, like a plain function, so it can be a static argument of ``jax.jit``.

    Wrap your own functions the same way: ``EpsFn(fn, num_classes=K, all_classes=fn_all)``.

    Attributes:
      fn: ``(params, z_t, t, k) -> [B, *event]``.
      num_classes: K, the classes ``all_classes`` returns (None when unknown).
      all_classes: ``(params, z_t, t) -> [K, B, *event]`` or None.
    """

    fn: Callable[[Params, Array, Array, Array], Array]
    num_classes: int | None = None
    all_classes: Callable[[Params, Array, Array], Array] | None = None

    def __call__(self, params: Params, z_t: Array, t: Array, k: Array) -> Array:
        return self.fn(params, z_t, t, k)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainEpsFn:
    """The dropout-on ε-network: ``train_eps_fn(dropout_key, params, z_t, t, k)``, with the same
    ``all_classes(dropout_key, params, z_t, t)`` (or None) and ``bind(dropout_key)``, the 4-argument
    :class:`EpsFn` of one step (it keeps the all-classes form, which ``functools.partial`` would hide).
    """

    fn: Callable[..., Array]
    num_classes: int | None = None
    all_classes: Callable[..., Array] | None = None

    def __call__(self, dropout_key: Array, params: Params, z_t: Array, t: Array, k: Array) -> Array:
        return self.fn(dropout_key, params, z_t, t, k)

    def bind(self, dropout_key: Array) -> EpsFn:
        """The :class:`EpsFn` with ``dropout_key`` fixed (a new object per call: split a key per step)."""
        all_classes = None if self.all_classes is None else functools.partial(self.all_classes, dropout_key)
        return EpsFn(functools.partial(self.fn, dropout_key), self.num_classes, all_classes)


def build_model(config: ModelConfig | str, num_classes: int) -> nn.Module:
    """The Flax module for ``config`` (a :class:`ModelConfig` or a preset name) with K = num_classes.

    The class embedding has ``num_classes + 1`` rows; row ``num_classes`` is the null class.
    Returns a :class:`UNet` (``kind="unet"``) or :class:`MLP` (``kind="mlp"``).
    """
    if isinstance(config, str):
        config = get_model_config(config)
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig or a preset name, got {type(config).__name__}")
    if int(num_classes) != num_classes or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes}")
    cls = UNet if config.kind == "unet" else MLP
    return cls(config=config, num_classes=int(num_classes))


def _check_event_shape(model: nn.Module, event_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        event_shape = tuple(int(d) for d in event_shape)
    except TypeError:
        raise ValueError(f"event_shape must be a tuple of ints, got {event_shape!r}") from None
    if isinstance(model, UNet) and len(event_shape) != 3:
        raise ValueError(f"a U-Net needs event_shape (H, W, C), got {event_shape}")
    if not event_shape or min(event_shape) < 1:
        raise ValueError(f"event_shape must be a non-empty tuple of positive ints, got {event_shape}")
    return event_shape


def _init_fn(model: nn.Module, event_shape: tuple[int, ...]):
    """``key -> params``: ``model.init`` on a dummy batch of one (built inside the trace)."""

    def init(key):
        inputs = (jnp.zeros((1, *event_shape), jnp.float32), jnp.ones((1,), jnp.int32),
                  jnp.zeros((1,), jnp.int32))
        return model.init(key, *inputs)["params"]

    return init


def _cached(factory):
    """``functools.lru_cache`` for (model, event_shape) factories that falls back to no caching for
    an unhashable model."""
    cached = functools.lru_cache(maxsize=64)(factory)

    def get(model, event_shape):
        try:
            hash(model)
        except TypeError:
            return factory(model, event_shape)
        return cached(model, event_shape)

    return get


def init_params(key: Array, model: nn.Module, event_shape: Sequence[int]) -> Params:
    """Initial parameters of ``model`` for events of shape ``event_shape`` (a dummy batch of 1).

    Args:
      key: PRNG key.
      model: from :func:`build_model`.
      event_shape: ``(H, W, C)`` for a U-Net, ``(D,)`` for an MLP. U-Net parameters do not depend on
        H and W, only on C.

    Returns:
      The ``params`` collection (a nested dict of float32 arrays), what ``eps_fn`` and optax take.

    The jitted initialiser is built once per ``(model, event_shape)`` and reused. On CPU it is compiled
    with XLA's backend optimisation level 0: it runs once, and the LLVM optimisation of its hundred-odd
    random-number kernels is what makes it slow to compile (a 28×28 U-Net with threefry keys: ~6× faster
    to compile). Values agree with the optimised build to float32 rounding (≤ 1 ulp).
    """
    event_shape = _check_event_shape(model, event_shape)
    if isinstance(key, jax.core.Tracer):  # inside a caller's jit/eval_shape: compiler options are top-level only
        return _init_fn(model, event_shape)(key)
    return _jitted_init(model, event_shape)(key)


@_cached
def _jitted_init(model: nn.Module, event_shape: tuple[int, ...]):
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jax.jit(_init_fn(model, event_shape), compiler_options=options)


@_cached
def _abstract_params(model: nn.Module, event_shape: tuple[int, ...]) -> Params:
    return jax.eval_shape(_init_fn(model, event_shape), jax.random.key(0))


def param_shapes(model: nn.Module, event_shape: Sequence[int]) -> Params:
    """Like :func:`init_params` but abstract (``jax.ShapeDtypeStruct`` leaves, no compute).

    Traced once per ``(model, event_shape)``; each call returns fresh containers.
    """
    abstract = _abstract_params(model, _check_event_shape(model, event_shape))
    return jax.tree_util.tree_map(lambda leaf: leaf, abstract)


def param_count(params: Params) -> int:
    """Total number of scalars in a params pytree (arrays or ``ShapeDtypeStruct`` leaves)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def check_params_fit(model: nn.Module, params: Params, z_t: Array) -> None:
    """Raise ValueError if ``params`` cannot have been initialised for ``model`` on events like ``z_t``.

    Checks (statically, so it costs nothing under jit): ``params`` is the inner ``params`` collection,
    the class table (``class_heads="embedding"``) or the heads (``"multi_head"``) have
    ``num_classes + 1`` rows, and the channel count (U-Net) or flattened size (MLP) of ``z_t`` matches
    the one the parameters were built for.
    """
    if not isinstance(params, Mapping) or "cond" not in params:
        if isinstance(params, Mapping) and "params" in params:
            raise ValueError("pass the inner params collection (variables['params']), not the "
                             "variables dict {'params': ...}")
        raise ValueError("params do not look like the parameters of an hmdm_jax ε-network "
                         "(no 'cond' entry); build them with init_params")
    shape = jnp.shape(z_t)
    multi_head = model.config.class_heads == "multi_head"
    if multi_head == ("class_embed" in params["cond"]):
        have, want = ("a class table", "class heads") if multi_head else ("class heads", "a class table")
        raise ValueError(f"params have {have} but the model (class_heads={model.config.class_heads!r}) "
                         f"has {want}; initialise them for this model")
    if not multi_head:
        rows, what = jnp.shape(params["cond"]["class_embed"])[0], "a class table of"
    elif isinstance(model, UNet):
        channels = shape[-1] if len(shape) == 4 else 1
        rows, what = jnp.shape(params["conv_out"]["kernel"])[-1] // max(channels, 1), "output heads for"
    else:
        rows, what = jnp.shape(params["out_heads"]["bias"])[0], "output heads for"
        if ("class_in" in params["out_heads"]) != bool(model.config.head_rank):
            raise ValueError(f"params have {'low-rank' if 'class_in' in params['out_heads'] else 'full'} class "
                             f"heads but the model has head_rank={model.config.head_rank}; initialise them for "
                             f"this model")
    if rows != model.num_classes + 1:
        raise ValueError(f"params have {what} {rows} rows (K = {rows - 1}) but the model "
                         f"has num_classes = {model.num_classes} (K + 1 = {model.num_classes + 1} rows)")
    if isinstance(model, UNet):
        if len(shape) != 4:
            raise ValueError(f"the U-Net takes images z_t of shape [B, H, W, C], got shape {shape}")
        channels = jnp.shape(params["conv_in"]["kernel"])[2]
        if shape[-1] != channels:
            raise ValueError(f"z_t has {shape[-1]} channels but params were initialised for "
                             f"{channels} channels")
    else:
        dim = jnp.shape(params["in_proj"]["kernel"])[0]
        if len(shape) < 2 or math.prod(shape[1:]) != dim:
            raise ValueError(f"z_t of shape {shape} has event size {math.prod(shape[1:])} but params "
                             f"were initialised for D = {dim}")


def _has_heads(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "class_heads", "embedding") == "multi_head"


def make_eps_fn(model: nn.Module) -> EpsFn:
    """The deterministic (dropout off) ε-network as the core's pure function.

    Returns:
      an :class:`EpsFn`: ``eps_fn(params, z_t, t, k) -> eps`` with ``z_t: [B, *event]`` float32,
      ``t: [B]`` int32 in 1..T, ``k: [B]`` int32 in 0..K (K = null class); ``eps: [B, *event]`` float32.
      With class heads, ``eps_fn.all_classes(params, z_t, t) -> [K, B, *event]`` (one trunk pass; equal
      to stacking ``eps_fn(params, z_t, t, full(k))`` over k), else ``eps_fn.all_classes`` is None.
      jit- and vmap-safe.
    """

    def eps_fn(params: Params, z_t: Array, t: Array, k: Array) -> Array:
        check_params_fit(model, params, z_t)
        return model.apply({"params": params}, z_t, t, k, train=False)

    def all_classes(params: Params, z_t: Array, t: Array) -> Array:
        check_params_fit(model, params, z_t)
        return jnp.moveaxis(model.apply({"params": params}, z_t, t, None, train=False), 1, 0)

    return EpsFn(eps_fn, model.num_classes, all_classes if _has_heads(model) else None)


def make_train_eps_fn(model: nn.Module) -> TrainEpsFn:
    """The ε-network with dropout on (``config.dropout``), for training.

    Returns:
      a :class:`TrainEpsFn`: ``train_eps_fn(dropout_key, params, z_t, t, k) -> eps`` (shapes as in
      :func:`make_eps_fn`) and ``train_eps_fn.all_classes(dropout_key, params, z_t, t)`` (or None).
      ``train_eps_fn.bind(dropout_key)`` is an ``eps_fn`` of the usual 4-argument form (so is
      ``functools.partial(train_eps_fn, dropout_key)``, without the one-pass form); split a fresh
      ``dropout_key`` each step. With ``dropout == 0`` it equals ``eps_fn`` exactly.
    """

    def train_eps_fn(dropout_key: Array, params: Params, z_t: Array, t: Array, k: Array) -> Array:
        check_params_fit(model, params, z_t)
        return model.apply({"params": params}, z_t, t, k, train=True, rngs={"dropout": dropout_key})

    def all_classes(dropout_key: Array, params: Params, z_t: Array, t: Array) -> Array:
        check_params_fit(model, params, z_t)
        out = model.apply({"params": params}, z_t, t, None, train=True, rngs={"dropout": dropout_key})
        return jnp.moveaxis(out, 1, 0)

    return TrainEpsFn(train_eps_fn, model.num_classes, all_classes if _has_heads(model) else None)


def param_table(num_classes: int = 10, names: Sequence[str] = PRESET_NAMES) -> str:
    """A Markdown table of the parameter counts of the named presets (abstract init, no compute)."""
    lines = ["| config | kind | event shape | layout | parameters |",
             "|---|---|---|---|---:|"]
    for name in names:
        cfg = get_model_config(name)
        shape = PRESET_EVENT_SHAPES[name]
        count = param_count(param_shapes(build_model(cfg, num_classes), shape))
        if cfg.kind == "unet":
            layout = (f"width {cfg.base_width}, mults {cfg.channel_mults}, "
                      f"{cfg.num_res_blocks} res/level, attn levels {cfg.attention_levels}"
                      f"{' + mid' if cfg.mid_attention else ''}, dropout {cfg.dropout}")
        else:
            layout = (f"width {cfg.mlp_width}, depth {cfg.mlp_depth}"
                      f"{', residual' if cfg.mlp_residual else ''}"
                      f"{' + LayerNorm' if cfg.mlp_layernorm and cfg.mlp_residual else ''}")
        if cfg.class_heads != "embedding":
            layout += f", {cfg.class_heads}" + (f" rank {cfg.head_rank}" if cfg.head_rank else "")
        shape_str = "×".join(str(d) for d in shape)
        lines.append(f"| `{name}` | {cfg.kind} | {shape_str} | {layout} | {count:,} |")
    return "\n".join(lines)


def copy_class(params: Params, num_classes: int, source: int, target: int) -> Params:
    """``params`` with class ``target``'s own parameters replaced by class ``source``'s.

    The class's own parameters are its row of the class table (``class_heads="embedding"``) or its output
    head (``"multi_head"``: the MLP's ``out_heads`` slice, the U-Net's ``conv_out`` channels); everything
    else is shared by all classes and unchanged. A state freed by a split starts as a copy of the state it
    splits, as split moves in EM do, instead of from whatever a dead state had learnt.
    """
    def copy(a: Array, axis: int, width: int = 1) -> Array:
        src = jax.lax.slice_in_dim(a, source * width, (source + 1) * width, axis=axis)
        return jax.lax.dynamic_update_slice_in_dim(a, src, target * width, axis=axis)

    out = dict(params)
    if "class_embed" in params.get("cond", {}):
        out["cond"] = {**params["cond"], "class_embed": copy(params["cond"]["class_embed"], 0)}
    elif "out_heads" in params and "class_in" in params["out_heads"]:  # low-rank heads: the kernel is shared
        heads = params["out_heads"]
        out["out_heads"] = {**heads, "class_in": copy(heads["class_in"], 1), "class_out": copy(heads["class_out"], 0),
                            "bias": copy(heads["bias"], 0)}
    elif "out_heads" in params:
        heads = params["out_heads"]
        out["out_heads"] = {"kernel": copy(heads["kernel"], 1), "bias": copy(heads["bias"], 0)}
    elif "conv_out" in params:
        conv = params["conv_out"]
        channels = conv["bias"].shape[0] // (num_classes + 1)
        out["conv_out"] = {"kernel": copy(conv["kernel"], conv["kernel"].ndim - 1, channels),
                           "bias": copy(conv["bias"], 0, channels)}
    else:
        raise ValueError("params have neither a class table nor class heads: not an hmdm_jax ε-network")
    return out
