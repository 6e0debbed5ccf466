"""Named presets: a :class:`~hmdm_jax.run.config.RunConfig` for a model type, K and frame shape.

* ``cpu-small``: an MLP ε-network, minutes on a 2-core CPU (the README's main job).
* ``gpu``: the U-Net sized for the frame shape, one GPU.
* ``tpu``: the same U-Net with a larger global batch, for a pod slice.

The measurements behind each choice are in RESULTS.md.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from hmdm_jax import em, models, warm_start
from hmdm_jax.run.config import (BandConfig, EvalConfig, LoopConfig, OptimConfig, ReseedConfig, RestartConfig,
                                 RunConfig, WarmStartConfig)

__all__ = ["PRESETS", "preset"]

PRESETS = ("cpu-small", "gpu", "tpu")
# HMDM: with no dead state, the label-free split-merge move (a state holding two digits split, a pair sharing
# one merged): the fixed point a sticky chain otherwise ends in; the freed state starts as a copy of the one
# it splits, else it dies again within 500 steps; the Gaussian proxy behind a move does not know the diffusion
# model, so each move is first tried for a period against the run without it, by the chain's share of the bound
HMDM_RESEED = ReseedConfig(split_merge=True, copy_parent=True, check_moves=True)
# The E-step's band and temperature are chosen from the data at the end of the warm start, not fixed: a band's
# one-draw scores are as noisy as that band, network and data make them, and a fixed temperature tuned for one
# band is several times too sharp in another, which leaves a chain no room to correct a frame (RESULTS.md)
SCORING_CHOSEN = BandConfig(choose=True, temperature=True)
# UMAP's 15-neighbour graph follows the frames' manifold only with many frames per class; below this (or with
# the frame count unknown) HMDM's first restart starts from k-means
MIN_UMAP_FRAMES = 1000
# HMDM's final decoding averages many t-draws, far less noisy than the E-step's one: its temperature is chosen
# at the end by the held-out likelihood the chain adds (``evaluation.choose_temperature``), not the E-step's


def preset(name: str, model_type: str, num_classes: int, event_shape: tuple[int, ...], **data) -> RunConfig:
    """The named preset.

    ``data`` is the record of where the frames came from, saved in the config (``source=...``,
    ``num_images=...``). Two entries change the mixture's ``cpu-small`` preset: ``observed_labels > 0``
    turns on the label loss (``em.labels.loss_weight = 0.1``) and 6,000 steps; ``num_images`` up to
    ``warm_start.MAX_WARD_FRAMES`` (or absent) gives it Ward's warm start, larger sets k-means.
    """
    event_shape = tuple(int(d) for d in event_shape)
    sequences = model_type == "hmdm"
    # HMDM scores one t-draw per frame and step: its chain pools the evidence of neighbouring frames
    em_config = em.EMConfig(num_classes=num_classes, scoring=em.Scoring(num_t=1 if sequences else 2))
    record = tuple(data.items())
    if name == "cpu-small":
        # Frames larger than the width need the input skip to pass the noise through. Class scores are sums
        # over D values, so the configured temperature grows with D (0.15 per 64 values); the run replaces it
        # with the calibrated one at the end of the warm start (SCORING_CHOSEN), and a user who turns that
        # off (band.temperature=false) keeps this scale.
        dim = int(np.prod(event_shape))
        # One network pass scores all K classes (class_heads="multi_head"), instead of K passes. Frames of
        # more than 256 values get width 512: at 28×28 width 256 collapsed after its warm start, and 1024
        # cost more for no gain (RESULTS.md, stop 29).
        width = 256 if dim <= 256 else 512
        network = dataclasses.replace(models.get_model_config("mlp"), mlp_width=width, mlp_depth=3,
                                      mlp_input_skip=dim > width, class_heads="multi_head")
        em_config = em_config.replace(temperature=dict(final=em_config.temperature.final * max(1.0, dim / 64)))
        loop = LoopConfig(train_steps=3000, batch_size=8 if sequences else 256)
        if sequences:
            # the one-pass network pays for three whole runs from three different warm starts, the one whose
            # chain explains most of the held-out sequences kept: shorter candidates did not predict where a
            # run ends, and the whole bound ranks the networks' densities more than the states (RESULTS.md)
            return RunConfig(model_type, network, em_config, event_shape, loop=loop, reseed=HMDM_RESEED,
                             restarts=_hmdm_restarts(data), band=SCORING_CHOSEN,
                             evaluation=EvalConfig(choose_temperature=True), data=record)
        # The mixture: Ward's clusters (O(N²) memory) as the start, the label-free band choice, and
        # decoding by the grid ELBO, a classification by the model's own likelihood bound.
        fits_ward = data.get("num_images", 0) <= warm_start.MAX_WARD_FRAMES
        loop = dataclasses.replace(loop, observed_batch_fraction=0.5)
        evaluation = EvalConfig(final_estimator="elbo", final_num_t=50)
        if data.get("observed_labels", 0) > 0:
            # without labels the label loss would only cost K network passes
            em_config = em_config.replace(labels=dict(loss_weight=0.1))
            loop = dataclasses.replace(loop, train_steps=6000)
        return RunConfig(model_type, network, em_config, event_shape, loop=loop,
                         warm_start=WarmStartConfig("ward" if fits_ward else "kmeans"),
                         band=SCORING_CHOSEN, evaluation=evaluation, data=record)
    if name in ("gpu", "tpu"):
        network = dataclasses.replace(models.get_model_config(_unet_for(event_shape)), class_heads="multi_head")
        frames = 1024 if name == "gpu" else 4096
        loop = LoopConfig(train_steps=50_000, batch_size=frames // 32 if sequences else frames, checkpoint_every=2000)
        optim = OptimConfig(learning_rate=2e-4, warmup_steps=1000, ema_decay=0.9995)
        # the GPU presets are the ones whose samples are scored (FID, evaluate.py --guidance-weight): train
        # the null class on 10 % of frames, as classifier-free guidance needs (Ho & Salimans use 10–20 %)
        em_config = em_config.replace(labels=dict(dropout=0.1))
        return RunConfig(model_type, network, em_config, event_shape, optim=optim, loop=loop,
                         reseed=HMDM_RESEED if sequences else ReseedConfig(),
                         evaluation=EvalConfig(every=5000, choose_temperature=sequences),
                         data=record)
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")


def _hmdm_restarts(data: dict) -> RestartConfig:
    """Three whole runs from a UMAP embedding's clusters (k-means where the frames are too few for its
    neighbour graph), Ward's clusters (k-means where they are too many for Ward) and the Gaussian HMM's
    Viterbi path: starts that fail in different ways, so the choice is a real one. On the dense random chain
    only the UMAP start reached the states' basin on one seed, and the chain share chose it (RESULTS.md, stop 35)."""
    frames = data.get("num_sequences", 0) * data.get("length", 0)
    first = "umap" if frames >= MIN_UMAP_FRAMES else "kmeans"
    second = "ward" if frames <= warm_start.MAX_WARD_FRAMES else "kmeans"
    return RestartConfig(count=3, methods=(first, second, "ghmm"))


def _unet_for(event_shape):
    return {8: "digits8-unet", 28: "mnist28-unet", 32: "cifar32-unet"}.get(event_shape[0], "mnist28-unet")
