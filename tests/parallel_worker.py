"""Run in a subprocess with 4 host devices: one data-parallel step vs one single-device step.

Prints one JSON line per model with the largest absolute differences of loss, gradients (SGD with rate 1,
so the parameter change is the gradient), EMA, π/A statistics and metrics.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hmdm_jax import diffusion, em, hmdm, mixture, models, parallel
from hmdm_jax.state import create_train_state

K, EVENT = 3, (16,)  # an MLP ε-network keeps compilation short


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def compare(name, mesh):
    """``name``: "mixture", "hmdm" or "mixture-label-balanced" (the mixture with the capped label loss and
    the balanced E-step: one compiled step for both global-batch statistics)."""
    model_type = name.split("-")[0]
    rng = np.random.default_rng(0)
    model = models.build_model(models.get_model_config("mlp-small"), K)
    eps_fn = models.make_eps_fn(model)
    params = models.init_params(jax.random.PRNGKey(0), model, EVENT)
    schedule = diffusion.linear_schedule(100)
    optimizer = optax.sgd(1.0)
    config = em.EMConfig(num_classes=K, scoring=em.Scoring(t_range=(0.05, 0.5)), priors=em.Priors(learn_pi=True, count_decay=1.0))
    if name == "mixture-label-balanced":
        # a cap of 8 frames is 2 per device, at least the observed frames of each share (one on each of
        # devices 0-2): the sharded loss must equal the single-device one; the balanced E-step takes its
        # class totals over the global batch
        config = config.replace(labels=dict(loss_weight=0.5, loss_frames=8), balance_classes=True)
    factory = hmdm.make_train_step if model_type == "hmdm" else mixture.make_train_step
    if model_type == "hmdm":
        shape = (8, 5)
        mask = np.ones(shape, bool)
        mask[3, 2:] = False
        labels = np.full(shape, -1, np.int32)
        labels[0, 1] = 2
        batch = {"images": rng.uniform(-1, 1, shape + EVENT).astype(np.float32), "mask": mask, "labels": labels}
    else:
        labels = np.full((16,), -1, np.int32)
        labels[[0, 4, 9] if name == "mixture-label-balanced" else [0, 1, 2]] = [0, 1, 2]
        batch = {"images": rng.uniform(-1, 1, (16,) + EVENT).astype(np.float32), "labels": labels}
    state = create_train_state(jax.random.PRNGKey(1), params, optimizer, K)
    key = jax.random.PRNGKey(2)
    single = jax.jit(factory(config, eps_fn, schedule, optimizer, ema_decay=0.9))
    multi = parallel.make_parallel_step(factory, mesh, config, eps_fn, schedule, optimizer, ema_decay=0.9)
    s1, m1 = single(state, batch, key)
    s4, m4 = multi(state, parallel.shard_batch(batch, mesh), key)
    grad1 = jax.tree.map(lambda a, b: a - b, state.params, s1.params)
    grad4 = jax.tree.map(lambda a, b: a - b, state.params, s4.params)
    grad_scale = max(float(np.max(np.abs(np.asarray(g)))) for g in jax.tree.leaves(grad1))
    try:
        multi(state, {k: v[:-1] for k, v in batch.items()}, key)
        error = None
    except ValueError as e:
        error = str(e)
    balanced_diff = balanced_column_error = None
    if name == "mixture-label-balanced":  # the balanced posterior itself, on a batch that prefers class 0 strongly
        log_post = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(16, K)) * 30.0 + [40.0, 0.0, 0.0], jnp.float32))
        sharded = jax.jit(jax.shard_map(lambda lp: em.balanced_class_posterior(lp, state.log_pi, parallel.DATA_AXIS),
                                        mesh=mesh, in_specs=parallel.P(parallel.DATA_AXIS),
                                        out_specs=parallel.P(parallel.DATA_AXIS)))
        one = em.balanced_class_posterior(log_post, state.log_pi)
        balanced_diff = max_diff(jnp.exp(one), jnp.exp(sharded(log_post)))
        balanced_column_error = float(jnp.max(jnp.abs(jnp.exp(one).sum(0) - 16 / K)))
    return {
        "balanced_diff": balanced_diff,
        "balanced_column_error": balanced_column_error,
        "model": name,
        "devices": int(mesh.devices.size),
        "loss": abs(float(m1["loss"]) - float(m4["loss"])),
        "loss_value": float(m1["loss"]),
        "grads": max_diff(grad1, grad4),
        "grad_scale": grad_scale,
        "ema": max_diff(s1.ema_params, s4.ema_params),
        "counts": max_diff((s1.class_counts, s1.transition_counts), (s4.class_counts, s4.transition_counts)),
        "total_count": float(jnp.sum(s1.class_counts)),
        "priors": max_diff((s1.log_pi, s1.log_A), (s4.log_pi, s4.log_A)),
        "usage": max_diff(m1["class_usage"], m4["class_usage"]),
        "indivisible_error": error,
        "label_loss": float(m1.get("label_loss", 0.0)),
        "label_loss_diff": abs(float(m1.get("label_loss", 0.0)) - float(m4.get("label_loss", 0.0))),
    }


if __name__ == "__main__":
    mesh = parallel.data_mesh()
    for model_type in sys.argv[1:]:
        print(json.dumps(compare(model_type, mesh)), flush=True)
