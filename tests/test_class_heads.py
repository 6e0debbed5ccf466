"""Multi-head ε-networks (``ModelConfig.class_heads="multi_head"``): every class's ε from one pass.

The one-pass form ``eps_fn.all_classes(params, z_t, t) -> [K, B, *event]`` must equal stacking the
4-argument call over the classes, and every K-class scorer (``emission.eps_all_classes``, hence
``log_emission`` and the train steps) must give the same scores with it as with the vmapped fallback.
Tiny networks, tests' own jits at XLA backend optimisation level 0 (fast to compile).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmdm_jax import diffusion, emission, hmdm, models
from hmdm_jax.em import EMConfig
from hmdm_jax.state import create_train_state

K = 3  # real classes; index K is the null class
B = 4
MLP_CFG = models.ModelConfig(kind="mlp", mlp_width=32, mlp_depth=2, mlp_input_skip=True,
                             zero_init_output=False, class_heads="multi_head")
UNET_CFG = models.ModelConfig(kind="unet", base_width=8, channel_mults=(1, 2), num_res_blocks=1,
                              mid_attention=True, zero_init_output=False, class_heads="multi_head")
# low-rank heads (ModelConfig.head_rank): a shared projection plus a rank-2 term per class
MLP_LOW_RANK_CFG = dataclasses.replace(MLP_CFG, head_rank=2)
CONFIGS = {"mlp": MLP_CFG, "mlp_low_rank": MLP_LOW_RANK_CFG, "unet": UNET_CFG}
# a non-flat MLP event; two channels for the heads' grouping
EVENTS = {"mlp": (2, 3), "mlp_low_rank": (2, 3), "unet": (8, 8, 2)}
TIMES = jnp.array([1, 10, 500, 1000], jnp.int32)


@functools.lru_cache(maxsize=None)
def setup(kind: str):
    cfg = CONFIGS[kind]
    model = models.build_model(cfg, K)
    params = models.init_params(jax.random.key(0), model, EVENTS[kind])
    # Non-zero, class-distinct heads and biases: perturb every leaf a little.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    z = jax.random.normal(jax.random.key(2), (B, *EVENTS[kind]))
    return model, params, models.make_eps_fn(model), z


def stacked(eps_fn, params, z, t):
    return jnp.stack([eps_fn(params, z, t, jnp.full((z.shape[0],), k, jnp.int32)) for k in range(K)])


@pytest.mark.parametrize("kind", ["mlp", "mlp_low_rank", "unet"])
def test_all_classes_equals_stacking_every_class(kind):
    model, params, eps_fn, z = setup(kind)
    assert isinstance(eps_fn, models.EpsFn) and eps_fn.num_classes == K
    all_eps = jax.jit(eps_fn.all_classes)(params, z, TIMES)
    assert all_eps.shape == (K, B, *EVENTS[kind]) and all_eps.dtype == jnp.float32
    per_class = jax.jit(functools.partial(stacked, eps_fn))(params, z, TIMES)
    np.testing.assert_allclose(all_eps, per_class, rtol=1e-5, atol=1e-5)
    # the heads differ: the class matters
    assert float(jnp.abs(all_eps[0] - all_eps[1]).max()) > 1e-3
    if kind != "unet":  # eager equals jit (a U-Net run eagerly compiles each of its many ops on its own)
        np.testing.assert_allclose(eps_fn.all_classes(params, z, TIMES), all_eps, rtol=1e-5, atol=1e-5)
    # a mixed-class batch picks each example's own head
    k = jnp.array([2, 0, 1, 0], jnp.int32)
    mixed = jax.jit(eps_fn)(params, z, TIMES, k)
    np.testing.assert_allclose(mixed, all_eps[k, jnp.arange(B)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "mlp_low_rank", "unet"])
def test_null_class_has_its_own_head(kind):
    """k = K goes through head K only: bumping head K changes exactly the k = K examples, and the
    real classes' one-pass output does not include it."""
    model, params, eps_fn, z = setup(kind)
    k = jnp.array([0, K, 1, K], jnp.int32)
    base = jax.jit(eps_fn)(params, z, TIMES, k)
    if kind != "unet":
        bumped = {**params, "out_heads": {**params["out_heads"],
                                          "bias": params["out_heads"]["bias"].at[K].add(1.0)}}
    else:
        channels = EVENTS[kind][-1]
        bias = params["conv_out"]["bias"].at[K * channels:(K + 1) * channels].add(1.0)
        bumped = {**params, "conv_out": {**params["conv_out"], "bias": bias}}
    out = jax.jit(eps_fn)(bumped, z, TIMES, k)
    changed = jnp.abs(out - base).reshape(B, -1).max(axis=1) > 1e-3
    np.testing.assert_array_equal(np.asarray(changed), np.asarray(k == K))
    np.testing.assert_allclose(jax.jit(eps_fn.all_classes)(bumped, z, TIMES),
                               jax.jit(eps_fn.all_classes)(params, z, TIMES), rtol=1e-6, atol=1e-6)
    assert bool(jnp.all(jnp.isnan(eps_fn(params, z, TIMES, jnp.array([-1, 0, K + 1, 1])).reshape(B, -1)[
        jnp.array([0, 2])])))


@pytest.mark.parametrize("kind", ["mlp", "mlp_low_rank", "unet"])
def test_vmap_over_examples_equals_the_batch(kind):
    model, params, eps_fn, z = setup(kind)
    together = jax.jit(eps_fn.all_classes)(params, z, TIMES)
    single = jax.jit(jax.vmap(lambda zz, tt: eps_fn.all_classes(params, zz[None], tt[None])[:, 0]))(z, TIMES)
    np.testing.assert_allclose(jnp.moveaxis(single, 0, 1), together, rtol=1e-5, atol=1e-5)


def _head_norms(kind, grads):
    if kind == "mlp_low_rank":  # each class's own U, V and bias; the shared kernel counts with the trunk
        heads = grads["out_heads"]
        per_head = jnp.sqrt(jnp.sum(heads["class_in"] ** 2, axis=(0, 2)) + jnp.sum(heads["class_out"] ** 2, axis=(1, 2))
                            + jnp.sum(heads["bias"] ** 2, axis=1))
        trunk = {**{n: g for n, g in grads.items() if n != "out_heads"}, "shared": heads["kernel"]}
    elif kind == "mlp":
        heads = grads["out_heads"]
        per_head = jnp.sqrt(jnp.sum(heads["kernel"] ** 2, axis=(0, 2)) + jnp.sum(heads["bias"] ** 2, axis=1))
        trunk = {n: g for n, g in grads.items() if n != "out_heads"}
    else:
        channels = EVENTS[kind][-1]
        kernel = grads["conv_out"]["kernel"].reshape(3, 3, -1, K + 1, channels)
        bias = grads["conv_out"]["bias"].reshape(K + 1, channels)
        per_head = jnp.sqrt(jnp.sum(kernel ** 2, axis=(0, 1, 2, 4)) + jnp.sum(bias ** 2, axis=1))
        trunk = {n: g for n, g in grads.items() if n != "conv_out"}
    return per_head, trunk


@pytest.mark.parametrize("kind", ["mlp", "mlp_low_rank", "unet"])
def test_gradient_reaches_the_trunk_and_only_the_selected_head(kind):
    model, params, eps_fn, z = setup(kind)
    noise = jax.random.normal(jax.random.key(5), z.shape)
    for k, used in ((jnp.full((B,), 1, jnp.int32), {1}), (jnp.array([0, 0, K, K], jnp.int32), {0, K})):
        loss = lambda p: jnp.mean((eps_fn(p, z, TIMES, k) - noise) ** 2)  # noqa: E731
        grads = jax.jit(jax.grad(loss))(params)
        per_head, trunk = _head_norms(kind, grads)
        for head in range(K + 1):
            assert (float(per_head[head]) > 0.0) == (head in used), (head, per_head)
        dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(trunk)
                if float(jnp.linalg.norm(g)) == 0.0]
        assert not dead, dead


def test_train_eps_fn_all_classes_and_bind():
    cfg = dataclasses.replace(MLP_CFG, dropout=0.3)
    model = models.build_model(cfg, K)
    _, params, _, z = setup("mlp")
    train_eps_fn = models.make_train_eps_fn(model)
    key = jax.random.key(7)
    all_eps = jax.jit(train_eps_fn.all_classes)(key, params, z, TIMES)
    per_class = jax.jit(lambda p: stacked(functools.partial(train_eps_fn, key), p, z, TIMES))(params)
    np.testing.assert_allclose(all_eps, per_class, rtol=1e-5, atol=1e-5)
    bound = train_eps_fn.bind(key)
    assert isinstance(bound, models.EpsFn) and bound.num_classes == K
    np.testing.assert_allclose(jax.jit(bound.all_classes)(params, z, TIMES), all_eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(bound)(params, z, TIMES, jnp.zeros(B, jnp.int32)), all_eps[0],
                               rtol=1e-6, atol=1e-6)
    deterministic = jax.jit(models.make_eps_fn(model).all_classes)(params, z, TIMES)
    assert float(jnp.abs(deterministic - all_eps).max()) > 1e-3  # dropout was on


def test_embedding_networks_have_no_one_pass_form():
    model = models.build_model(dataclasses.replace(MLP_CFG, class_heads="embedding"), K)
    eps_fn = models.make_eps_fn(model)
    assert eps_fn.all_classes is None and models.make_train_eps_fn(model).all_classes is None
    params = models.init_params(jax.random.key(0), model, EVENTS["mlp"])
    z = jnp.zeros((B, *EVENTS["mlp"]))
    with pytest.raises(ValueError, match="multi_head"):
        model.apply({"params": params}, z, TIMES, None)
    # parameters of one form do not fit the other
    heads_model, heads_params, heads_eps_fn, _ = setup("mlp")
    with pytest.raises(ValueError, match="class heads"):
        heads_eps_fn(params, z, TIMES, jnp.zeros(B, jnp.int32))
    with pytest.raises(ValueError, match="class table"):
        eps_fn(heads_params, z, TIMES, jnp.zeros(B, jnp.int32))
    with pytest.raises(ValueError, match="K \\+ 1"):
        models.make_eps_fn(models.build_model(MLP_CFG, K + 1))(heads_params, z, TIMES, jnp.zeros(B, jnp.int32))
    with pytest.raises(ValueError, match="class_heads"):
        models.ModelConfig(kind="mlp", class_heads="per_class")


def _spy(eps_fn):
    """The same network as a models.EpsFn whose one-pass form counts its traces."""
    traces = []

    def all_classes(params, z, t):
        traces.append(z.shape)
        return eps_fn.all_classes(params, z, t)

    return models.EpsFn(eps_fn.fn, eps_fn.num_classes, all_classes), traces


@pytest.mark.parametrize("kind", ["mlp", "mlp_low_rank", "unet"])
@pytest.mark.parametrize("estimator,num_t", [("eps_mse", 2), ("random_t", 1), ("elbo", 3)])
def test_log_emission_one_pass_equals_the_vmapped_fallback(kind, estimator, num_t):
    model, params, eps_fn, z = setup(kind)
    schedule = diffusion.linear_schedule(100)
    one_pass, traces = _spy(eps_fn)
    plain = lambda p, zz, t, k: eps_fn(p, zz, t, k)  # noqa: E731  (a plain function: the fallback)
    y = jnp.tanh(z)
    key = jax.random.key(3)
    score = functools.partial(emission.log_emission, params=params, schedule=schedule, y=y, key=key,
                              num_classes=K, estimator=estimator, num_t=num_t)
    fast = jax.jit(lambda: score(one_pass))()
    slow = jax.jit(lambda: score(plain))()
    assert traces, "the one-pass form was not used"
    assert fast.shape == (B, K)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-4)
    # fewer classes than the network has: the first columns
    fewer = jax.jit(lambda: emission.log_emission(one_pass, params, schedule, y, key, K - 1,
                                              estimator=estimator, num_t=num_t))()
    np.testing.assert_allclose(fewer, fast[:, :K - 1], rtol=1e-5, atol=1e-4)


def test_eps_all_classes_helper_on_user_functions():
    """A user's plain function is vmapped over k; a user's EpsFn with its own one-pass form uses it."""
    _, params, eps_fn, z = setup("mlp")
    reference = stacked(eps_fn, params, z, TIMES)
    plain = lambda p, zz, t, k: eps_fn(p, zz, t, k)  # noqa: E731
    np.testing.assert_allclose(emission.eps_all_classes(plain, params, z, TIMES, K), reference,
                               rtol=1e-5, atol=1e-5)
    wrapped = models.EpsFn(plain, num_classes=K, all_classes=lambda p, zz, t: jnp.zeros((K,) + zz.shape))
    assert float(jnp.abs(emission.eps_all_classes(wrapped, params, z, TIMES, K)).max()) == 0.0
    assert emission.eps_all_classes(wrapped, params, z, TIMES, K).shape == (K, B, *EVENTS["mlp"])


def test_hmdm_train_step_with_a_multi_head_network():
    model, params, eps_fn, _ = setup("mlp")
    schedule = diffusion.linear_schedule(100)
    import optax

    optimizer = optax.adam(1e-3)
    state = create_train_state(jax.random.key(0), params, optimizer, K)
    y = jax.random.uniform(jax.random.key(1), (2, 5, *EVENTS["mlp"]), minval=-1, maxval=1)
    step = jax.jit(hmdm.make_train_step(EMConfig(num_classes=K), eps_fn, schedule, optimizer))
    new_state, metrics = step(state, {"images": y}, jax.random.key(2))
    assert bool(jnp.isfinite(metrics["loss"]))
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params, state.params)
    assert max(jax.tree_util.tree_leaves(moved)) > 0.0


@pytest.mark.parametrize("name, heads, event, rank", [
    ("mlp-small", "embedding", (2,), 0), ("mlp-small", "multi_head", (2,), 0), ("mlp-small", "multi_head", (2,), 2),
    pytest.param("digits8-unet", "multi_head", (8, 8, 1), 0, marks=pytest.mark.slow),  # a minute of compilation
])
def test_copy_class_makes_the_target_class_predict_as_the_source(name, heads, event, rank):
    """After ``copy_class(params, K, 1, 3)`` class 3 predicts exactly what class 1 does, and every other class
    (and the null class) is unchanged: only the class's own row or head is copied."""
    K = 4
    model = models.build_model(dataclasses.replace(models.get_model_config(name), class_heads=heads, head_rank=rank), K)
    params = models.init_params(jax.random.PRNGKey(0), model, event)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    copied = models.copy_class(params, K, 1, 3)
    assert jax.tree.structure(copied) == jax.tree.structure(params)
    eps = jax.jit(lambda p, z, t: jnp.stack([models.make_eps_fn(model)(p, z, t, jnp.full(z.shape[0], k))
                                             for k in range(K + 1)]))
    z = jax.random.normal(jax.random.PRNGKey(1), (3,) + event)
    t = jnp.array([5, 50, 500])
    before, after = eps(params, z, t), eps(copied, z, t)
    np.testing.assert_allclose(after[3], before[1], atol=1e-5)
    for k in (0, 1, 2, 4):
        np.testing.assert_array_equal(after[k], before[k])
    assert not np.allclose(before[3], before[1])


def test_copy_parents_copies_each_freed_class_in_the_trained_and_the_ema_parameters():
    import optax

    from hmdm_jax.run.hooks import copy_parents
    K = 4
    model = models.build_model(dataclasses.replace(models.get_model_config("mlp-small"), class_heads="multi_head"), K)
    params = models.init_params(jax.random.PRNGKey(0), model, (2,))
    state = create_train_state(jax.random.PRNGKey(1), params, optax.adam(1e-3), K)
    state = state.replace(ema_params=jax.tree.map(lambda p: p + 1.0, state.params))
    copied = copy_parents(state, K, [(3, 0), (2, 1)])
    for tree, new in ((state.params, copied.params), (state.ema_params, copied.ema_params)):
        heads, out = np.asarray(tree["out_heads"]["bias"]), np.asarray(new["out_heads"]["bias"])
        np.testing.assert_array_equal(out[3], heads[0])
        np.testing.assert_array_equal(out[2], heads[1])
        np.testing.assert_array_equal(out[[0, 1, 4]], heads[[0, 1, 4]])
    np.testing.assert_array_equal(copied.ema_params["out_heads"]["kernel"][:, 3], state.ema_params["out_heads"]["kernel"][:, 0])


def test_low_rank_heads_are_an_mlp_multi_head_option_and_params_must_match():
    with pytest.raises(ValueError, match="head_rank"):
        dataclasses.replace(MLP_CFG, class_heads="embedding", head_rank=2)
    with pytest.raises(ValueError, match="head_rank"):
        dataclasses.replace(UNET_CFG, head_rank=2)
    full, _, _, z = setup("mlp")
    low, low_params, eps_fn, _ = setup("mlp_low_rank")
    with pytest.raises(ValueError, match="head_rank=0"):
        models.check_params_fit(full, low_params, z)
    # the class heads cost (K + 1)·r·(width + D) + (K + 1)·D beside one shared [width, D] kernel
    heads = low_params["out_heads"]
    assert heads["class_in"].shape == (32, K + 1, 2) and heads["class_out"].shape == (K + 1, 2, 6)
    assert heads["kernel"].shape == (32, 6) and heads["bias"].shape == (K + 1, 6)
