"""The run layer: configs, presets, the training loop with its hooks, and evaluation.

Modules (imports point down this list, and none of them into ``experiments``):
  config      :class:`RunConfig` and its sections, ``--set`` overrides.
  presets     ``preset(name, model_type, K, event_shape)``: cpu-small, gpu, tpu.
  parts       the network, schedule, optimizer, random streams, initial state, jitted step, ``load_run``.
  batches     :class:`TrainData`, warm-start labels, deterministic batches.
  evaluation  decoding and label scores, used by the loop and by every script.
  hooks       periodic loop hooks (evaluation, dead-state re-seeding, the band choice) over a ``LoopState``.
  restarts    the held-out split, candidate configs and scores of the restarts chosen without labels.
  loop        ``train``.
"""
from hmdm_jax.run import batches, config, evaluation, hooks, loop, parts, presets, restarts
from hmdm_jax.run.batches import TrainData
from hmdm_jax.run.config import RunConfig, apply_overrides
from hmdm_jax.run.evaluation import evaluate, predict_states, score_states
from hmdm_jax.run.loop import TrainResult, train
from hmdm_jax.run.parts import build_parts, init_state, load_run
from hmdm_jax.run.presets import preset

__all__ = [
    "RunConfig", "TrainData", "TrainResult", "apply_overrides", "batches", "build_parts", "config",
    "evaluate", "evaluation", "hooks", "init_state", "load_run", "loop", "parts", "predict_states",
    "preset", "presets", "restarts", "score_states", "train",
]
