"""The one evaluation of a trained run, used by the loop and by every script: decode states (Viterbi for
HMDM, the posterior mode for the mixture), then score them against whatever labels are known.

Decoding uses the EMA parameters and a jitted call per batch. The decoding estimator is the training one
(tempered, as Viterbi needs a calibrated balance of emissions and log A) unless ``estimator`` names
another; a likelihood bound (``"elbo"``) is decoded untempered, as the model's own bound. A temperature chosen
for the final decoding (``evaluation.temperature``, HMDM's ``evaluation.choose_temperature``) overrides both.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hmdm_jax import em, emission, hmdm, matching, mixture
from hmdm_jax.run.config import RunConfig
from hmdm_jax.run.parts import RunParts, streams
from hmdm_jax.state import TrainState

__all__ = ["choose_decoding", "decoding_config", "evaluate", "final_decoding", "predict_states", "score_states",
           "with_chain"]

# the training sequences that choose the final decoding's temperature: a fit of one parameter, whose top is flat
# where the frames decide alone, so it needs many frames; the restarts' held-out share chose erratically
# (RESULTS.md, stop 33)
DECODING_FIT_SEQUENCES = 128
DECODING_FIT_STREAM = 0xDEC0  # folded into the run's eval stream: the draws that choose it


def final_decoding(config: RunConfig) -> tuple[str, int]:
    """The estimator and t-draws of the final decoding (``evaluation.final_*``, else the training ones)."""
    return config.evaluation.final_estimator or config.em.scoring.estimator, config.evaluation.final_num_t


def decoding_config(config: RunConfig, estimator: str | None = None, num_t: int | None = None) -> em.EMConfig:
    """The run's E-step options with the decoding estimator and t-draws, at ``evaluation.temperature`` when
    set (chosen for this decoding, whatever its estimator); otherwise untempered for a bound and at the
    E-step's temperature for a score."""
    decode = em.evaluation_config(config.em, estimator, num_t)
    if config.evaluation.temperature is not None:
        return decode.replace(temperature=em.Temperature(final=config.evaluation.temperature))
    if emission.get_estimator(decode.scoring.estimator).is_bound:
        return decode.replace(temperature=em.Temperature(final=1.0))
    return decode


def choose_decoding(config: RunConfig, parts: RunParts, state: TrainState, sequences
                    ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """The final decoding of an HMDM run: ``(τ, log_pi, log_A, fits)``, the temperature and the chain refitted
    with it (:func:`hmdm.select_decoding` with the run's M-step priors), and the fit of every candidate τ
    (nats per frame). Fitted on the final decoding's own untempered scores (its estimator and t-draws) of the
    first ``DECODING_FIT_SEQUENCES`` of the training ``sequences`` (:class:`~hmdm_jax.run.batches.TrainData`;
    their labels are not read), starting from the run's π and A."""
    n = min(len(sequences.images), DECODING_FIT_SEQUENCES)
    estimator, num_t = final_decoding(config)
    untempered = config.replace(evaluation=dataclasses.replace(config.evaluation, temperature=1.0))
    key = jax.random.fold_in(streams(config.seed).eval, DECODING_FIT_STREAM)
    mask = sequences.mask[:n]
    log_b = predict_states(untempered, parts, state, sequences.images[:n], mask, num_t=num_t, estimator=estimator,
                           key=key)["log_emissions"]
    temperature, log_pi, log_A, fits = hmdm.select_decoding(jnp.asarray(log_b), jnp.asarray(mask), state.log_pi,
                                                            state.log_A, config.em.priors)
    return temperature, np.asarray(log_pi), np.asarray(log_A), np.asarray(fits)


def with_chain(state: TrainState, log_pi, log_A) -> TrainState:
    """``state`` with π and A replaced (the chain :func:`choose_decoding` refits), each placed as the array it
    replaces (replicated under several devices)."""
    return state.replace(log_pi=jax.device_put(np.asarray(log_pi, state.log_pi.dtype), state.log_pi.sharding),
                         log_A=jax.device_put(np.asarray(log_A, state.log_A.dtype), state.log_A.sharding))


_DECODERS: dict = {}  # (model type, decoding options, eps_fn) -> jitted decoder


def predict_states(config: RunConfig, parts: RunParts, state: TrainState, images, mask=None, *,
                   num_t: int, estimator: str | None = None, key=None, batch_size: int | None = None,
                   progress: bool = False) -> dict[str, np.ndarray]:
    """Decoded states of sequences (HMDM) or images (mixture), in jitted batches.

    Args:
      images: ``[N, n, *event]`` with ``mask [N, n]`` (HMDM) or ``[N, *event]`` (mixture).
      num_t, estimator: the decoding's t-draws and estimator (None: the training estimator).
      key: decoding draws (default: the run's eval stream); batch i uses ``fold_in(key, first index)``.

    Returns:
      HMDM: ``states [N, n]`` (−1 past each length), ``log_joint [N]``, ``marginals [N, n, K]``,
      ``log_emissions [N, n, K]`` (the frames' scores before the chain);
      mixture: ``states [N]``, ``log_posterior [N, K]``.
    """
    sequences = config.model_type == "hmdm"
    em_config = decoding_config(config, estimator, num_t)
    key = streams(config.seed).eval if key is None else key
    batch_size = batch_size or config.evaluation.batch_size
    fn = _jitted(config.model_type, em_config, parts)
    out: dict[str, list] = {}
    for start in tqdm(range(0, len(images), batch_size), disable=not progress, desc="decode", unit="batch"):
        sl = slice(start, start + batch_size)
        args = (state.ema_params, parts.schedule, state.log_pi, state.log_A, jnp.asarray(images[sl]))
        if sequences:
            res = fn(*args, jnp.asarray(mask[sl]), jax.random.fold_in(key, start))
            res = res._asdict()
        else:
            classes, log_post = fn(*args, jax.random.fold_in(key, start))
            res = {"states": classes, "log_posterior": log_post}
        for name, value in res.items():
            out.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(v) for name, v in out.items()}


def _jitted(model_type, em_config, parts):
    cache_key = (model_type, em_config, id(parts.eps_fn))
    if cache_key not in _DECODERS:
        if model_type == "hmdm":
            def fn(params, schedule, log_pi, log_A, images, mask, key):
                return hmdm.decode(em_config, parts.eps_fn, params, schedule, log_pi, log_A, images, mask, key)
        else:
            def fn(params, schedule, log_pi, log_A, images, key):
                return mixture.predict(em_config, parts.eps_fn, params, schedule, log_pi, images, key)
        _DECODERS[cache_key] = jax.jit(fn)
    return _DECODERS[cache_key]


def score_states(true, pred, num_states: int, *, mapping=None, observed=None, learned_A=None,
                 true_A=None) -> dict[str, Any]:
    """Every label score of decoded ``pred`` against ``true`` labels (−1 = unknown or padding).

    Args:
      true, pred: int arrays of one shape (frames ``[N]`` or sequences ``[N, n]``).
      num_states: K.
      mapping: a state → label matching learned elsewhere (on training data): adds ``accuracy_train_matching``.
      observed: bool mask of the labels clamped in training: adds ``masked_label_accuracy`` (on the others,
        with ``mapping``, else the Hungarian matching).
      learned_A, true_A: ``[K, K]``: adds ``A_mae`` after matching (the given ``mapping``, else Hungarian).

    Returns:
      ``accuracy`` (Hungarian, learned on these data), ``matching``, ``ari``, ``nmi``, ``class_usage`` and
      the optional entries above; label scores only when some label is known.
    """
    true, pred = np.asarray(true), np.asarray(pred)
    out: dict[str, Any] = {"class_usage": matching.class_usage(pred[pred >= 0], num_states).tolist()}
    if not np.any((true >= 0) & (pred >= 0)):
        return out
    acc, hungarian = matching.matched_accuracy(true, pred, None, num_states)
    out.update(accuracy=acc, matching=np.asarray(hungarian).tolist(), **matching.clustering_scores(true, pred))
    if mapping is not None:
        out["accuracy_train_matching"] = matching.accuracy_with_mapping(true, pred, mapping)
    if observed is not None and np.any(~np.asarray(observed) & (true >= 0)):
        use = hungarian if mapping is None else np.asarray(mapping)
        out["masked_label_accuracy"] = matching.masked_label_accuracy(true, pred, np.asarray(observed, bool), use)
    if learned_A is not None and true_A is not None:
        use = hungarian if mapping is None else mapping
        out["A_mae"] = matching.transition_error(learned_A, true_A, use)
    return out


def evaluate(config: RunConfig, parts: RunParts, state: TrainState, train, heldout=None, *, num_t: int,
             estimator: str | None = None, true_A=None, max_train_items: int = 64, key=None) -> dict[str, Any]:
    """Decode the first ``max_train_items`` training items and the held-out ones, and score them.

    The state → label matching is learned on the training items' labels (``matching``) and reused on the
    held-out ones (``heldout_accuracy_train_matching``) beside the Hungarian ``heldout_accuracy``.
    ``train``/``heldout``: :class:`~hmdm_jax.run.batches.TrainData`.

    Returns a flat dict: ``train_accuracy``, ``matching``, ``class_usage`` (training items), ``log_pi``,
    ``A`` (HMDM), ``heldout_accuracy``, ``heldout_accuracy_train_matching``, ``heldout_ari``,
    ``heldout_nmi``, ``A_mae`` (with ``true_A``) and ``heldout_states`` (the decoded array).
    """
    k = config.num_classes
    key = streams(config.seed).eval if key is None else key
    n = min(len(train.images), max_train_items)
    decode = lambda images, mask, key: predict_states(config, parts, state, images, mask, num_t=num_t,
                                                      estimator=estimator, key=key)["states"]
    train_pred = decode(train.images[:n], None if train.mask is None else train.mask[:n], jax.random.fold_in(key, 0))
    on_train = score_states(train.labels[:n], train_pred, k)
    result: dict[str, Any] = {"log_pi": np.asarray(state.log_pi).tolist(), "class_usage": on_train["class_usage"]}
    learned_A = np.exp(np.asarray(state.log_A))
    if config.model_type == "hmdm":
        result["A"] = learned_A.round(4).tolist()
    mapping = on_train.get("matching")
    if mapping is not None:
        result["train_accuracy"], result["matching"] = on_train["accuracy"], mapping
    if heldout is not None:
        held_pred = decode(heldout.images, heldout.mask, jax.random.fold_in(key, 1))
        held = score_states(heldout.labels, held_pred, k, mapping=mapping)
        result.update({f"heldout_{name}": held[name] for name in ("accuracy", "accuracy_train_matching", "ari", "nmi")
                       if name in held})
        result["heldout_states"] = held_pred
    if true_A is not None and mapping is not None and config.model_type == "hmdm":
        result["A_mae"] = matching.transition_error(learned_A, true_A, mapping)
    return result
