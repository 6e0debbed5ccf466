"""The "mixture" warm start of HMDM: a frame-wise diffusion mixture trained first on the sequences' frames."""
import dataclasses

import numpy as np
import pytest

from hmdm_jax import run
from hmdm_jax.run import mixture_start
from hmdm_jax.run.batches import TrainData, describe_start, phase_labels
from tests.blobs import K, blob_config, blobs, markov_labels


def sequences(seed, num_sequences=24, length=10):
    rng = np.random.default_rng(seed)
    labels = markov_labels(rng, num_sequences, length)
    mask = np.ones(labels.shape, bool)
    mask[0, 7:] = False  # one padded sequence: its padding gets no state
    return TrainData(blobs(rng, labels), np.where(mask, labels, -1), np.zeros(labels.shape, bool), mask)


def test_the_mixture_start_finds_the_blobs_and_says_what_it_did():
    data = sequences(0)
    config = blob_config("hmdm", 20, 4, warm_start="mixture")
    config = config.replace(warm_start=dataclasses.replace(config.warm_start, mixture_steps=300))
    mix = mixture_start.mixture_config(config, 237)
    assert mix.model_type == "mixture" and mix.network == config.network and mix.loop.train_steps == 300
    labels, record = phase_labels(config, data)
    clusters = labels[0]
    assert (clusters[~data.mask] == -1).all() and (labels[1] == -1).all()  # nothing observed after the start
    accuracy = run.score_states(data.labels[data.mask], clusters[data.mask], K)["accuracy"]
    assert accuracy >= 0.95, accuracy  # three well-separated blobs: a working mixture finds them
    assert record["method"] == "mixture" and record["frames"] == int(data.mask.sum()) and record["steps"] == 300
    assert sum(record["usage"]) == pytest.approx(1.0) and "frame-wise diffusion mixture" in describe_start(record)


def test_the_mixture_start_is_for_sequences_only():
    with pytest.raises(ValueError, match="needs sequences"):
        blob_config("mixture", 20, 4, warm_start="mixture")
    with pytest.raises(ValueError, match="mixture_steps must be >= 1"):
        run.config.WarmStartConfig("mixture", 10, mixture_steps=0)
