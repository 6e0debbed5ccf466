"""Synthetic data shared by the EM and run tests: three well-separated 2-D blobs and Markov label paths.

The score band is set low (2–20 % of T), which suits low-dimensional data.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np

from hmdm_jax import diffusion, em, models
from hmdm_jax.run import config as rc

K = 3
CENTERS = np.array([[0.8, 0.0], [-0.4, 0.7], [-0.4, -0.7]], np.float32)
STICKY_A = np.full((K, K), 0.1) + 0.7 * np.eye(K)


def blobs(rng, labels, spread=0.15):
    return (CENTERS[labels] + spread * rng.standard_normal(labels.shape + (2,))).astype(np.float32)


def markov_labels(rng, num_sequences, length, A=STICKY_A):
    x = np.zeros((num_sequences, length), np.int32)
    x[:, 0] = rng.integers(0, K, num_sequences)
    cum = np.cumsum(A, axis=1)
    for i in range(1, length):
        x[:, i] = (rng.random(num_sequences)[:, None] > cum[x[:, i - 1]]).sum(1)
    return x


def blob_config(model_type, steps, batch_size, *, warm_start="none", warm_start_steps=500, reseed_every=500,
                choose_band=False, band_frames=2048, band_temperature=False, **loop):
    """A run on the blobs: the MLP of ``mlp-small``, T = 200, no evaluation or checkpoints between the last."""
    return rc.RunConfig(
        model_type, models.get_model_config("mlp-small"),
        em.EMConfig(num_classes=K, scoring=em.Scoring(t_range=(0.02, 0.2))), (2,),
        optim=rc.OptimConfig(learning_rate=2e-3, warmup_steps=50),
        diffusion=rc.DiffusionConfig(timesteps=200),
        loop=rc.LoopConfig(**{**dict(train_steps=steps, batch_size=batch_size, checkpoint_every=0, log_every=50), **loop}),
        warm_start=rc.WarmStartConfig(warm_start, warm_start_steps),
        reseed=rc.ReseedConfig(every=reseed_every),
        band=rc.BandConfig(choose_band, band_frames, band_temperature),
        evaluation=rc.EvalConfig(every=0),
    )


def with_em(config, **groups):
    """``config`` with ``em.replace(**groups)``: e.g. ``with_em(c, priors=dict(learn_pi=True))``."""
    return dataclasses.replace(config, em=config.em.replace(**groups))


def oracle_eps_fn(schedule):
    """The exact ε of point-mass classes at ``params [K, D]``: ε = (z − √ᾱ μ_k)/√(1 − ᾱ)."""

    def eps_fn(params, z, t, k):
        ab = diffusion.alpha_bar(schedule, t)[:, None]
        return (z - jnp.sqrt(ab) * params[k]) / jnp.sqrt(1.0 - ab)

    return eps_fn
