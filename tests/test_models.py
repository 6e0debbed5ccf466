"""Tests of the Flax ε-networks (hmdm_jax.models): shapes, conditioning wiring, vmap safety, validation.

On CPU the cost of these tests is XLA compilation, so:

* real computation uses one tiny U-Net with the level structure of the ``mnist28-unet`` preset
  (28 → 14 → 7 → 14 → 28, attention at 7×7 and in the middle) at width 8 with one residual block per
  level, compiled once (module fixture) and reused by every test at the same input shapes;
* its parameters are drawn from the abstract shapes with numpy (``jax.eval_shape``, no compilation);
  ``init_params`` itself is run on the MLP here and on the U-Net in the ``slow`` tests;
* the tests' own jits compile at XLA's backend optimisation level 0 (:func:`jit`): the same program,
  compiled several times faster, numerically equal to the optimised build up to float32 rounding;
* full-size presets are checked abstractly with ``jax.eval_shape`` (parameter shapes and counts, output
  shapes); their real forward passes and the U-Net's gradient and eager runs are marked ``slow``.
"""
from __future__ import annotations

import dataclasses
import functools
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmdm_jax.models import (
    MLP,
    PRESET_EVENT_SHAPES,
    PRESET_NAMES,
    ModelConfig,
    UNet,
    build_model,
    get_model_config,
    init_params,
    make_eps_fn,
    make_train_eps_fn,
    num_groups_for,
    param_count,
    param_shapes,
    param_table,
    sinusoidal_embedding,
)

K = 3  # real classes; index K is the null class
B = 4
T = 1000

# The mnist28-unet layout at width 8 (levels 8/16/16: GroupNorm with 4 and 8 groups, 24 and 32
# channels after skip concatenations), one residual block per level, two attention heads.
TINY_UNET = dataclasses.replace(get_model_config("mnist28-unet"), base_width=8, num_res_blocks=1,
                                num_heads=2)
UNET_EVENT = (28, 28, 3)  # colour; 1 channel runs through the dropout test
SMALL_MLP = ModelConfig(kind="mlp", mlp_width=32, mlp_depth=2)
MLP_EVENT = (5,)
TIMES = jnp.array([1, 10, 500, 1000], jnp.int32)
CLASSES = jnp.array([0, 1, 2, K], jnp.int32)


def random_params(pshapes, seed: int):
    """Parameters of the given abstract shapes with every leaf non-zero (numpy, no compilation):
    kernels N(0, 1/fan_in), class table N(0, 1), norm scales 1 + N(0, 0.1²), biases N(0, 0.1²)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        x = rng.normal(size=leaf.shape)
        if "kernel" in name:
            x /= np.sqrt(np.prod(leaf.shape[:-1]))
        elif "scale" in name:
            x = 1.0 + 0.1 * x
        elif "bias" in name:
            x = 0.1 * x
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, pshapes)


@dataclasses.dataclass(frozen=True)
class Setup:
    model: object
    params: dict
    eps_fn: object  # jitted make_eps_fn(model)
    z: jax.Array
    t: jax.Array
    k: jax.Array


@functools.lru_cache(maxsize=None)
def setup(kind: str) -> Setup:
    """The tiny U-Net (28×28×3) or the small MLP (D = 5), random parameters, a batch of B inputs."""
    cfg, event = (TINY_UNET, UNET_EVENT) if kind == "unet" else (SMALL_MLP, MLP_EVENT)
    model = build_model(cfg, K)
    params = random_params(param_shapes(model, event), seed=1)
    z = jax.random.normal(jax.random.key(2), (B, *event))
    return Setup(model, params, jax.jit(make_eps_fn(model)), z, TIMES, CLASSES)


def per_example(a, b):
    return jnp.abs(a - b).reshape(a.shape[0], -1).max(axis=1)


# ----------------------------------------------------------------------------------- shapes


def test_tiny_unet_keeps_the_preset_layout_and_computes():
    preset = get_model_config("mnist28-unet")
    assert (TINY_UNET.channel_mults, TINY_UNET.attention_levels, TINY_UNET.mid_attention) == (
        preset.channel_mults, preset.attention_levels, preset.mid_attention)
    s = setup("unet")
    out = s.eps_fn(s.params, s.z, s.t, s.k)  # 28 → 14 → 7 → 14 → 28 lands on each skip's shape
    assert out.shape == (B, *UNET_EVENT) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.std(out)) > 1e-2  # not a constant


@pytest.mark.parametrize("channels", [1, 3])
def test_unet_channels(channels):
    model = build_model(TINY_UNET, K)
    pshapes = param_shapes(model, (28, 28, channels))
    assert pshapes["conv_in"]["kernel"].shape == (3, 3, channels, 8)
    assert pshapes["conv_out"]["kernel"].shape == (3, 3, 8, channels)
    out = jax.eval_shape(make_eps_fn(model), pshapes, jax.ShapeDtypeStruct((2, 28, 28, channels),
                                                                              jnp.float32),
                         jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
    assert out.shape == (2, 28, 28, channels) and out.dtype == jnp.float32
    # Real computation: 3 channels in every test using setup("unet"), 1 channel in the dropout test.


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_full_presets_abstract_shapes(name):
    cfg = get_model_config(name)
    event = PRESET_EVENT_SHAPES[name]
    model = build_model(cfg, 10)
    pshapes = param_shapes(model, event)
    out = jax.eval_shape(make_eps_fn(model), pshapes,
                         jax.ShapeDtypeStruct((16, *event), jnp.float32),
                         jax.ShapeDtypeStruct((16,), jnp.int32), jax.ShapeDtypeStruct((16,), jnp.int32))
    assert out.shape == (16, *event) and out.dtype == jnp.float32
    assert pshapes["cond"]["class_embed"].shape == (11, cfg.embed_dim)
    count = param_count(pshapes)
    bounds = {"digits8-unet": (1e5, 1e6), "mnist28-unet": (3e6, 1e7), "cifar32-unet": (1e7, 3.5e7),
              "mlp-small": (5e4, 1e6), "mlp": (1e6, 1e7)}[name]
    assert bounds[0] < count <= bounds[1]


def test_unet_params_do_not_depend_on_spatial_size():
    model = build_model(TINY_UNET, K)
    a = param_shapes(model, (28, 28, 3))
    b = param_shapes(model, (56, 84, 3))
    assert jax.tree_util.tree_map(lambda x: x.shape, a) == jax.tree_util.tree_map(lambda x: x.shape, b)


def test_mlp_vectors_and_flattened_events():
    s = setup("mlp")
    assert s.eps_fn(s.params, s.z, s.t, s.k).shape == (B, 5)
    # Any event shape is flattened: a [B, 2, 3] event uses D = 6 (plain, non-residual blocks here).
    model6 = build_model(dataclasses.replace(SMALL_MLP, mlp_residual=False), K)
    p6 = random_params(param_shapes(model6, (2, 3)), seed=3)
    assert p6["in_proj"]["kernel"].shape == (6, 32)
    eps6 = jax.jit(make_eps_fn(model6))
    z6 = jax.random.normal(jax.random.key(4), (B, 2, 3))
    out6 = eps6(p6, z6, s.t, s.k)
    assert out6.shape == (B, 2, 3)
    np.testing.assert_allclose(out6.reshape(B, 6), eps6(p6, z6.reshape(B, 6), s.t, s.k),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- init_params


def test_init_params_mlp():
    model = build_model(SMALL_MLP, K)
    s = setup("mlp")
    params = init_params(jax.random.key(0), model, MLP_EVENT)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(params) == shapes(param_shapes(model, MLP_EVENT))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params))
    # Zero-initialised output layer: ε ≡ 0 at init, whatever the input.
    assert bool(jnp.all(s.eps_fn(params, s.z, s.t, s.k) == 0.0))
    # Deterministic in the key, and the key matters.
    again = init_params(jax.random.key(0), model, MLP_EVENT)
    other = init_params(jax.random.key(1), model, MLP_EVENT)
    assert jnp.array_equal(params["in_proj"]["kernel"], again["in_proj"]["kernel"])
    assert not jnp.array_equal(params["in_proj"]["kernel"], other["in_proj"]["kernel"])
    # zero_init_output=False: a non-zero output for every example (the forward pass does not depend on
    # the initialiser, so the compiled eps_fn of `model` is reused).
    model2 = build_model(dataclasses.replace(SMALL_MLP, zero_init_output=False), K)
    out = s.eps_fn(init_params(jax.random.key(0), model2, MLP_EVENT), s.z, s.t, s.k)
    assert float(jnp.min(jnp.abs(out).max(axis=1))) > 1e-3


# --------------------------------------------------------------------- conditioning wiring


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_output_depends_on_class_time_and_input(kind):
    s = setup(kind)
    base = s.eps_fn(s.params, s.z, s.t, s.k)
    # Every example changes when only its class changes (null class K included) ...
    assert bool(jnp.all(per_example(base, s.eps_fn(s.params, s.z, s.t, (s.k + 1) % (K + 1))) > 1e-4))
    # ... when only its time changes ...
    assert bool(jnp.all(per_example(base, s.eps_fn(s.params, s.z, s.t + 1, s.k)) > 1e-5))
    # ... and when only its input changes.
    assert bool(jnp.all(per_example(base, s.eps_fn(s.params, 0.5 * s.z, s.t, s.k)) > 1e-4))
    assert bool(jnp.all(jnp.isfinite(base)))


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_out_of_range_class_gives_nan_not_null_class(kind):
    # k = -1 is "unknown" in the data convention; it must not wrap silently to the null row K.
    s = setup(kind)
    out = s.eps_fn(s.params, s.z, s.t, jnp.array([-1, 0, K + 1, K]))
    flat = out.reshape(B, -1)
    assert bool(jnp.all(jnp.isnan(flat[0]))) and bool(jnp.all(jnp.isnan(flat[2])))
    assert bool(jnp.all(jnp.isfinite(flat[1]))) and bool(jnp.all(jnp.isfinite(flat[3])))


def test_every_unet_layer_and_exactly_the_used_class_rows_matter():
    """No disconnected layer: perturbing the parameters of any one layer changes the output; of the
    class table only the rows of the classes in the batch matter. (Flax creates a parameter only when
    its layer is called, so a dead parameter means a layer whose output is dropped; perturbing layer by
    layer reuses the compiled forward pass. The gradient version of this test is slow.)"""
    s = setup("unet")
    k = jnp.array([0, 0, 2, K], jnp.int32)  # class 1 unused
    base = s.eps_fn(s.params, s.z, s.t, k)
    rng = np.random.default_rng(5)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(s.params)
    layers = {}
    for i, (path, _) in enumerate(leaves):
        if jax.tree_util.keystr(path[-1:]) != "['class_embed']":
            layers.setdefault(jax.tree_util.keystr(path[:-1]), []).append(i)
    assert len(layers) > 50  # every conv, dense and norm layer of the tiny U-Net
    dead = []
    for name, indices in layers.items():
        new = [x for _, x in leaves]
        for i in indices:
            new[i] = jnp.asarray(np.asarray(new[i]) + 0.5 * rng.normal(size=new[i].shape), jnp.float32)
        out = s.eps_fn(jax.tree_util.tree_unflatten(treedef, new), s.z, s.t, k)
        if float(jnp.abs(out - base).max()) < 1e-6:
            dead.append(name)
    assert not dead, dead
    table = np.asarray(s.params["cond"]["class_embed"])
    for row in range(K + 1):
        bumped = table.copy()
        bumped[row] += 1.0
        params = {**s.params, "cond": {**s.params["cond"], "class_embed": jnp.asarray(bumped)}}
        changed = per_example(base, s.eps_fn(params, s.z, s.t, k)) > 1e-5
        np.testing.assert_array_equal(np.asarray(changed), np.asarray(k == row))


def test_mlp_gradient_reaches_exactly_the_used_class_rows():
    s = setup("mlp")
    eps_fn = make_eps_fn(s.model)
    k = jnp.array([0, 0, 2, K])  # class 1 unused
    grads = jax.jit(jax.grad(lambda p: jnp.sum(eps_fn(p, s.z, s.t, k) ** 2)))(s.params)
    row_norms = jnp.linalg.norm(grads["cond"]["class_embed"], axis=1)
    assert row_norms.shape == (K + 1,)
    assert float(row_norms[1]) == 0.0
    assert bool(jnp.all(row_norms[jnp.array([0, 2, K])] > 1e-6))
    # Every parameter gets a gradient signal (no disconnected layers), except class row 1.
    norms = jax.tree_util.tree_map(lambda g: float(jnp.linalg.norm(g)), grads)
    norms["cond"]["class_embed"] = 1.0
    dead = [jax.tree_util.keystr(p) for p, n in jax.tree_util.tree_leaves_with_path(norms) if n == 0.0]
    assert not dead, dead


# --------------------------------------------------------------------------- vmap / batch


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_vmap_over_examples_equals_the_batch(kind):
    """GroupNorm and attention act per example: vmapping single-example calls gives the batch's output
    (vmap-safe, and no example sees another); so does changing the other examples of a batch."""
    s = setup(kind)
    together = s.eps_fn(s.params, s.z, s.t, s.k)
    eps_fn = make_eps_fn(s.model)
    single = jax.jit(jax.vmap(lambda z, t, k: eps_fn(s.params, z[None], t[None], k[None])[0]))
    np.testing.assert_allclose(single(s.z, s.t, s.k), together, rtol=1e-5, atol=1e-5)
    others = jax.random.normal(jax.random.key(9), s.z.shape) * 3.0
    for i in range(B):
        mixed = others.at[i].set(s.z[i])
        out = s.eps_fn(s.params, mixed, s.t, s.k)
        np.testing.assert_allclose(out[i], together[i], rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(out - together).max()) > 1e-3  # the other examples did change


def test_eps_fn_is_deterministic():
    for kind in ("unet", "mlp"):
        s = setup(kind)
        a = s.eps_fn(s.params, s.z, s.t, s.k)
        assert jnp.array_equal(a, s.eps_fn(s.params, s.z, s.t, s.k))
    # Eager calls compile op by op (tens of seconds for the U-Net): the eager-equals-jit test is slow.


def test_dropout_only_through_train_eps_fn():
    # U-Net, 1 channel: dropout in the residual blocks is driven by the key of train_eps_fn.
    model = build_model(dataclasses.replace(TINY_UNET, dropout=0.3), K)
    params = random_params(param_shapes(model, (28, 28, 1)), seed=6)
    z = jax.random.normal(jax.random.key(7), (B, 28, 28, 1))
    train_eps_fn = jax.jit(make_train_eps_fn(model))
    key_a, key_b = jax.random.key(10), jax.random.key(11)
    a = train_eps_fn(key_a, params, z, TIMES, CLASSES)
    assert a.shape == (B, 28, 28, 1) and bool(jnp.all(jnp.isfinite(a)))
    assert jnp.array_equal(a, train_eps_fn(key_a, params, z, TIMES, CLASSES))
    assert bool(jnp.all(per_example(a, train_eps_fn(key_b, params, z, TIMES, CLASSES)) > 1e-4))
    # partial(train_eps_fn, key) is a 4-argument eps_fn.
    assert jnp.array_equal(functools.partial(train_eps_fn, key_a)(params, z, TIMES, CLASSES), a)

    # MLP: dropout changes the output against make_eps_fn; with dropout 0 train == eval exactly.
    m = setup("mlp")
    drop = build_model(dataclasses.replace(SMALL_MLP, dropout=0.3), K)
    train_drop = jax.jit(make_train_eps_fn(drop))
    b = train_drop(key_a, m.params, m.z, m.t, m.k)
    assert jnp.array_equal(b, train_drop(key_a, m.params, m.z, m.t, m.k))
    assert float(jnp.abs(b - train_drop(key_b, m.params, m.z, m.t, m.k)).max()) > 1e-4
    ref = jax.jit(make_eps_fn(drop))(m.params, m.z, m.t, m.k)
    assert float(jnp.abs(b - ref).max()) > 1e-4
    np.testing.assert_allclose(ref, m.eps_fn(m.params, m.z, m.t, m.k), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(make_train_eps_fn(m.model))(key_a, m.params, m.z, m.t, m.k),
                               m.eps_fn(m.params, m.z, m.t, m.k), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- validation


def test_validation_errors():
    s = setup("unet")
    params, z, t, k = s.params, s.z, s.t, s.k
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        s.eps_fn(params, z.reshape(B, -1), t, k)  # a vector given to a U-Net
    with pytest.raises(ValueError, match="channels"):
        s.eps_fn(params, jnp.zeros((B, 28, 28, 1)), t, k)  # params were built for 3 channels
    with pytest.raises(ValueError, match="divisible"):
        make_eps_fn(s.model)(params, jnp.zeros((B, 30, 28, 3)), t, k)  # 30 / 4 is not an integer
    with pytest.raises(ValueError, match="divisible"):
        mnist = build_model(dataclasses.replace(get_model_config("mnist28-unet"),
                                                channel_mults=(1, 2, 2, 2)), K)
        param_shapes(mnist, (28, 28, 1))  # 7 cannot be halved
    with pytest.raises(ValueError, match="shape"):
        s.eps_fn(params, z, t[:2], k)
    with pytest.raises(ValueError, match="integer"):
        s.eps_fn(params, z, t, k.astype(jnp.float32))
    with pytest.raises(ValueError, match="inner params"):
        s.eps_fn({"params": params}, z, t, k)
    with pytest.raises(ValueError, match="class table"):
        make_eps_fn(build_model(TINY_UNET, K + 1))(params, z, t, k)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        init_params(jax.random.key(0), s.model, (64,))
    with pytest.raises(ValueError, match="event_shape"):
        param_shapes(s.model, (28, 0, 3))
    m = setup("mlp")
    with pytest.raises(ValueError, match="D = 5"):
        m.eps_fn(m.params, jnp.zeros((B, 6)), m.t, m.k)
    with pytest.raises(ValueError, match="unknown model config"):
        get_model_config("resnet")
    with pytest.raises(ValueError, match="attention_levels"):
        ModelConfig(kind="unet", channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(kind="unet", base_width=6, num_heads=5)  # 12 % 5 != 0
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(kind="transformer")
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)


# ------------------------------------------------------------------------------- helpers


def test_num_groups_for():
    for c in range(1, 300):
        g = num_groups_for(c)
        assert c % g == 0 and 1 <= g <= 32
        assert g == 1 or c // g >= 2
        # No larger admissible divisor was skipped.
        assert not any(c % h == 0 and c // h >= 2 for h in range(g + 1, 33))
    assert [num_groups_for(c) for c in (1, 3, 8, 12, 16, 64, 128, 384)] == [1, 1, 4, 6, 8, 32, 32, 32]


def test_sinusoidal_embedding_closed_form():
    t = jnp.array([0, 1, 250])
    emb = sinusoidal_embedding(t, 8)
    freqs = np.exp(-np.log(10_000.0) * np.arange(4) / 3)
    expected = np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs))], axis=1)
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)


def test_param_count_and_table():
    s = setup("mlp")
    manual = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(s.params))
    assert param_count(s.params) == manual == param_count(param_shapes(s.model, MLP_EVENT))
    table = param_table(10, names=("digits8-unet", "mlp-small"))
    lines = table.splitlines()
    assert len(lines) == 4 and "`digits8-unet`" in lines[2] and "`mlp-small`" in lines[3]
    digits = param_count(param_shapes(build_model("digits8-unet", 10), (8, 8, 1)))
    assert f"{digits:,}" in lines[2]


def test_main_prints_the_table_of_all_presets(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["hmdm_jax.models"])
    runpy.run_module("hmdm_jax.models", run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| config |") and len(lines) == 2 + len(PRESET_NAMES)
    for name, line in zip(PRESET_NAMES, lines[2:]):
        count = param_count(param_shapes(build_model(name, 10), PRESET_EVENT_SHAPES[name]))
        assert f"`{name}`" in line and line.rstrip(" |").endswith(f"{count:,}")


def test_build_model_types():
    assert isinstance(build_model("digits8-unet", 10), UNet)
    assert isinstance(build_model(get_model_config("mlp"), 2), MLP)
    with pytest.raises(ValueError):
        build_model(SMALL_MLP, -1)


# ---------------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits8-unet", "mnist28-unet", "cifar32-unet"])
def test_slow_full_preset_forward_pass(name):
    """init_params and a jitted forward pass of the full-size preset (minutes on CPU)."""
    event = PRESET_EVENT_SHAPES[name]
    model = build_model(name, 10)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(init_params(jax.random.key(0), model, event)) == shapes(param_shapes(model, event))
    params = random_params(param_shapes(model, event), seed=0)  # non-zero output layer
    z = jax.random.normal(jax.random.key(1), (2, *event))
    out = jax.jit(make_eps_fn(model))(params, z, jnp.array([1, 700]), jnp.array([0, 10]))
    assert out.shape == (2, *event) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.slow
def test_slow_unet_init_params():
    model = build_model(TINY_UNET, K)
    s = setup("unet")
    params = init_params(jax.random.key(0), model, UNET_EVENT)
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(params) == shapes(param_shapes(model, UNET_EVENT))
    assert bool(jnp.all(s.eps_fn(params, s.z, s.t, s.k) == 0.0))  # zero-initialised conv_out
    model2 = build_model(dataclasses.replace(TINY_UNET, zero_init_output=False), K)
    out = s.eps_fn(init_params(jax.random.key(0), model2, UNET_EVENT), s.z, s.t, s.k)
    assert float(jnp.min(jnp.abs(out).reshape(B, -1).max(axis=1))) > 1e-3


@pytest.mark.slow
def test_slow_unet_gradient_reaches_every_parameter():
    s = setup("unet")
    eps_fn = make_eps_fn(s.model)
    k = jnp.array([0, 0, 2, K])  # class 1 unused
    grads = jax.jit(jax.grad(lambda p: jnp.sum(eps_fn(p, s.z, s.t, k) ** 2)))(s.params)
    row_norms = jnp.linalg.norm(grads["cond"]["class_embed"], axis=1)
    assert float(row_norms[1]) == 0.0
    assert bool(jnp.all(row_norms[jnp.array([0, 2, K])] > 1e-6))
    norms = jax.tree_util.tree_map(lambda g: float(jnp.linalg.norm(g)), grads)
    norms["cond"]["class_embed"] = 1.0
    dead = [jax.tree_util.keystr(p) for p, n in jax.tree_util.tree_leaves_with_path(norms) if n == 0.0]
    assert not dead, dead


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_slow_eager_matches_jit(kind):
    s = setup(kind)
    np.testing.assert_allclose(make_eps_fn(s.model)(s.params, s.z, s.t, s.k),
                               jax.jit(make_eps_fn(s.model))(s.params, s.z, s.t, s.k),
                               rtol=1e-5, atol=1e-5)


def test_input_skip_lets_a_narrow_mlp_pass_the_noise_through():
    """With mlp_input_skip the output is Dense(h) + W z: with the rest zero and W = I the network is the
    identity, which a width-8 hidden layer alone could not be on 32 values. The cpu-small preset turns
    the skip on, and scales the temperature with D, only for frames larger than 8×8."""
    from hmdm_jax import run

    config = dataclasses.replace(get_model_config("mlp-small"), mlp_width=8, mlp_depth=1, mlp_input_skip=True)
    model = build_model(config, num_classes=3)
    params = init_params(jax.random.PRNGKey(0), model, (32,))
    assert params["input_skip"]["kernel"].shape == (32, 32)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.eye(32) if "input_skip" in jax.tree_util.keystr(path) else jnp.zeros_like(p), params)
    z = jax.random.normal(jax.random.PRNGKey(1), (5, 32))
    out = make_eps_fn(model)(params, z, jnp.full((5,), 7), jnp.arange(5) % 3)
    np.testing.assert_allclose(out, z, atol=1e-6)

    digits = run.preset("cpu-small", "hmdm", 10, (8, 8, 1))
    mnist = run.preset("cpu-small", "hmdm", 10, (28, 28, 1))
    assert not digits.network.mlp_input_skip and digits.em.temperature.final == pytest.approx(0.15)
    assert mnist.network.mlp_input_skip and mnist.em.temperature.final == pytest.approx(0.15 * 784 / 64)
    assert digits.network.mlp_width == 256 and mnist.network.mlp_width == 512
