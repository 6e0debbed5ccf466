"""hmdm_jax: mixtures of diffusion models and hidden Markov diffusion models (HMDM) in JAX.

Layers (imports point down):
  functional core   ``diffusion`` (schedules, q/p), ``emission`` (per-class log-likelihood estimators),
                    ``hmm`` (log-space forward filter, FFBS, Viterbi, smoothing)
  EM steps          ``em`` (E-step options and scoring, ε-loss, M-step), ``steps`` (the one EM step),
                    ``mixture`` and ``hmdm`` (their E-steps, decoding), ``state``, ``parallel``
  run layer         ``run`` (configs, presets, loop and hooks, evaluation), ``checkpoint``
  data, networks    ``data``, ``models``, ``warm_start``, ``matching`` (label switching), ``sampling``
``hmdm_jax.metrics`` (NLL, FID, figures, baselines) is used by the scripts only.

Typical use::

    import hmdm_jax as hj
    config = hj.run.preset("cpu-small", "hmdm", num_classes=10, event_shape=(8, 8, 1))
    result = hj.run.train(config, hj.run.TrainData(images, labels, observed, mask), "runs/mine")
    paths = hj.run.predict_states(result.config, result.parts, result.state, images, mask, num_t=64)
"""
from hmdm_jax import (checkpoint, data, diffusion, em, emission, hmdm, hmm, matching, mixture, models, parallel,
                      run, sampling, state, steps, warm_start)
from hmdm_jax.em import EMConfig
from hmdm_jax.run import RunConfig, TrainData, load_run, preset, train
from hmdm_jax.state import TrainState, create_train_state

__version__ = "0.1.0"

__all__ = [
    "EMConfig", "RunConfig", "TrainData", "TrainState", "checkpoint", "create_train_state", "data", "diffusion",
    "em", "emission", "hmdm", "hmm", "load_run", "matching", "mixture", "models", "parallel", "preset", "run",
    "sampling", "state", "steps", "train", "warm_start",
]
