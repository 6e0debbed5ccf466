"""Training with dropout (the train-mode ε-network) and label dropout (the null class of guidance).

* The ε-loss of a train step with ``train_eps_fn`` is exactly the loss of the network applied in train
  mode with the documented dropout key, and the E-step still scores deterministically.
* Label dropout trains the null class: with probability 1 only the null class's parameters get gradient;
  with probability 0 the null class gets none.
* The presets that generate samples train both, and the run layer wires them through.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hmdm_jax import diffusion, mixture, models, run, steps
from hmdm_jax.em import EMConfig, frame_keys, step_keys
from hmdm_jax.state import create_train_state

K, D, B = 3, 6, 8
CFG = models.ModelConfig(kind="mlp", mlp_width=32, mlp_depth=2, zero_init_output=False, dropout=0.3)
SCHEDULE = diffusion.get_schedule("linear", 100)


@functools.lru_cache(maxsize=None)
def setup(dropout: float = 0.3):
    model = models.build_model(dataclasses.replace(CFG, dropout=dropout), K)
    params = models.init_params(jax.random.key(0), model, (D,))
    y = jax.random.uniform(jax.random.key(1), (B, D), minval=-1, maxval=1)
    return model, params, y


def test_train_step_loss_is_the_train_mode_network_with_the_documented_dropout_key():
    model, params, y = setup()
    eps_fn, train_eps_fn = models.make_eps_fn(model), models.make_train_eps_fn(model)
    optimizer = optax.sgd(0.0)  # the loss is computed before the update; lr 0 keeps the params
    state = create_train_state(jax.random.key(2), params, optimizer, K)
    config = EMConfig(K)
    key = jax.random.key(3)
    batch = {"images": y}
    metrics = {}
    for name, tf in (("eval", None), ("train", train_eps_fn)):
        step = mixture.make_train_step(config, eps_fn, SCHEDULE, optimizer, train_eps_fn=tf)
        _, metrics[name] = jax.jit(step)(state, batch, key)
    # what the step must have computed: the classes the (deterministic) E-step samples are the same in both
    # runs, so rebuild them from the eval step's E-step and evaluate the loss by hand in train mode
    key_score, key_sample, key_loss, _ = step_keys(config, key)
    # (each jitted: run eagerly, every op compiles on its own)
    e = jax.jit(lambda: mixture.sample_classes(config, eps_fn, params, SCHEDULE, state, batch, (key_score, key_sample),
                                           None))()
    dropout_key = jax.random.fold_in(key_loss, steps.DROPOUT_STREAM)
    by_hand_eps = functools.partial(train_eps_fn, dropout_key)
    keys = frame_keys(key_loss, B, None)
    weights = jnp.ones((B,))
    by_hand, no_dropout = jax.jit(lambda: [steps.denoising_loss(fn, params, SCHEDULE, y, e.classes, keys, weights,
                                                            jnp.float32(B)) for fn in (by_hand_eps, eps_fn)])()
    np.testing.assert_allclose(float(metrics["train"]["loss"]), float(by_hand), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["eval"]["loss"]), float(no_dropout), rtol=1e-5)
    assert abs(float(by_hand) - float(no_dropout)) > 1e-3 * float(no_dropout)  # dropout was on
    # the E-step did not use dropout: its metrics agree exactly between the two steps
    np.testing.assert_array_equal(np.asarray(metrics["train"]["class_usage"]),
                                  np.asarray(metrics["eval"]["class_usage"]))


def test_dropout_masks_differ_between_steps():
    model, params, y = setup()
    train_eps_fn = models.make_train_eps_fn(model)
    classes = jnp.zeros((B,), jnp.int32)
    keys = frame_keys(jax.random.key(4), B, None)
    losses = [float(steps.denoising_loss(functools.partial(train_eps_fn, jax.random.fold_in(jax.random.key(5), i)),
                                         params, SCHEDULE, y, classes, keys, jnp.ones((B,)), jnp.float32(B)))
              for i in range(3)]
    assert len(set(losses)) == 3


@pytest.mark.parametrize("label_dropout, null_gets_gradient, real_get_gradient", [(1.0, True, False),
                                                                                   (0.0, False, True)])
def test_label_dropout_trains_the_null_class(label_dropout, null_gets_gradient, real_get_gradient):
    model, params, y = setup(0.0)
    eps_fn = models.make_eps_fn(model)
    classes = jnp.arange(B, dtype=jnp.int32) % K
    keys = frame_keys(jax.random.key(6), B, None)

    def loss(p):
        return steps.denoising_loss(eps_fn, p, SCHEDULE, y, classes, keys, jnp.ones((B,)), jnp.float32(B),
                                    label_dropout, K)

    rows = np.abs(np.asarray(jax.grad(loss)(params)["cond"]["class_embed"])).sum(axis=1)
    assert (rows[K] > 0) == null_gets_gradient
    assert bool((rows[:K] > 0).all()) == real_get_gradient
    if not real_get_gradient:
        assert (rows[:K] == 0).all()


def test_the_sampling_presets_train_dropout_and_the_null_class_and_the_cpu_preset_neither():
    gpu = run.preset("gpu", "hmdm", 10, (28, 28, 1))
    assert gpu.em.labels.dropout > 0 and gpu.network.dropout > 0
    parts = run.build_parts(gpu)
    assert parts.train_eps_fn is not None
    cpu = run.preset("cpu-small", "hmdm", 10, (64,))
    assert cpu.em.labels.dropout == 0 and run.build_parts(cpu).train_eps_fn is None
