"""hmdm_jax: mixtures of diffusion models and hidden Markov diffusion models (HMDM) in JAX.

Layers (imports point down):
  functional core   ``diffusion`` (schedules, q/p), ``emission`` (per-class log-likelihood estimators),
                    ``hmm`` (log-space forward filter, FFBS, Viterbi, smoothing)
  EM steps          ``em`` (E-step options and scoring, label loss, band choice), ``steps`` (the one EM
                    step, ε-loss, M-step), ``mixture`` and ``hmdm`` (their E-steps, decoding), ``state``,
                    ``parallel``
  run layer         ``run`` (configs, presets, loop and hooks, evaluation), ``checkpoint``
  data, networks    ``data``, ``models``, ``warm_start`` (clusters, or a Gaussian HMM's path, as the start),
                    ``gaussian_hmm`` (the tuned classical HMM), ``moves`` (the split–merge move),
                    ``matching`` (label switching), ``sampling``
``hmdm_jax.metrics`` (NLL, FID, figures, baselines) is used by the scripts only.

Typical use::

    import hmdm_jax as hj
    config = hj.preset("cpu-small", "hmdm", num_classes=10, event_shape=(8, 8, 1))
    result = hj.train(config, hj.TrainData(images, labels, observed, mask), "runs/mine")
    paths = hj.run.predict_states(result.config, result.parts, result.state, images, mask, num_t=64)

Modules and entry points load on first use, so ``import hmdm_jax.data`` stays free of JAX.
"""
import importlib

__version__ = "0.1.0"

_MODULES = ("checkpoint", "data", "diffusion", "em", "emission", "gaussian_hmm", "hmdm", "hmm", "matching", "mixture",
            "models", "moves", "parallel", "run", "sampling", "state", "steps", "warm_start")
_ENTRY_POINTS = {"EMConfig": "em", "RunConfig": "run", "TrainData": "run", "load_run": "run", "preset": "run",
                 "train": "run", "TrainState": "state", "create_train_state": "state"}

__all__ = sorted(_MODULES + tuple(_ENTRY_POINTS), key=str.lower)


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"hmdm_jax.{name}")
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(f"hmdm_jax.{_ENTRY_POINTS[name]}"), name)
    raise AttributeError(f"module 'hmdm_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
