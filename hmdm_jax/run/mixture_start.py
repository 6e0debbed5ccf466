"""The "mixture" warm start of HMDM (``warm_start.method="mixture"``): the frame-wise diffusion mixture first.

A clustering of pixels (k-means, Ward, a Gaussian HMM) starts HMDM at 0.7–0.8 of the digits, and EM from
there can settle with a state holding two digits and another sharing one, most often on sticky chains,
where the chain keeps whole runs of frames in their state. The mixture of diffusion models on the same
frames (Ward's start, the label-free band choice, decoding by its ELBO) clusters them far better; its
states are a start the chain then only has to refine. It uses the run's network, diffusion and optimizer,
the ``cpu-small`` mixture preset's E-step, batch and start, and no labels beyond the observed ones.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time

import numpy as np

from hmdm_jax.run import presets
from hmdm_jax.run.batches import TrainData
from hmdm_jax.run.config import RunConfig

__all__ = ["mixture_config", "mixture_labels"]


def mixture_config(config: RunConfig, num_frames: int) -> RunConfig:
    """The frame-wise mixture trained for the warm start of the HMDM run ``config`` on ``num_frames`` frames."""
    mix = presets.preset("cpu-small", "mixture", config.num_classes, config.event_shape, num_images=num_frames)
    return mix.replace(network=config.network, diffusion=config.diffusion, optim=config.optim, seed=config.seed,
                       loop=dataclasses.replace(mix.loop, train_steps=config.warm_start.mixture_steps,
                                                batch_size=min(mix.loop.batch_size, num_frames), checkpoint_every=0),
                       evaluation=dataclasses.replace(mix.evaluation, every=0))


def mixture_labels(config: RunConfig, data: TrainData) -> tuple[np.ndarray, dict]:
    """The states ``[N, n]`` (−1 on padding) the frame-wise mixture gives the valid frames of ``data``, and the
    record of what it decided. A stop (Ctrl-C/SIGTERM) while it trains raises ``KeyboardInterrupt``: the
    HMDM run has no checkpoint yet."""
    from hmdm_jax.run import evaluation, loop  # loop imports batches, which calls this lazily

    valid = data.valid
    clamped = data.clamped[valid]
    frames = TrainData(data.images[valid], clamped, clamped >= 0)
    mix = mixture_config(config, len(frames.images))
    mix.check()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hmdm_mixture_start_") as workdir:
        result = loop.train(mix, frames, workdir, progress=False, log_prefix="mixture warm start: ")
    if result.stopped_early:
        raise KeyboardInterrupt("stopped during the mixture warm start, before the first checkpoint")
    trained = result.config
    estimator, num_t = evaluation.final_decoding(trained)
    states = evaluation.predict_states(trained, result.parts, result.state, frames.images, num_t=num_t,
                                       estimator=estimator, batch_size=256)["states"]
    clusters = np.full(data.labels.shape, -1, np.int32)
    clusters[valid] = states
    usage = np.bincount(states, minlength=config.num_classes) / max(len(states), 1)
    record = {"method": "mixture", "steps": mix.loop.train_steps, "frames": int(len(states)),
              "start": mix.warm_start.method, "t_range": result.decisions.get("t_range"),
              "usage": [float(u) for u in usage], "seconds": time.perf_counter() - start}
    return clusters, record
