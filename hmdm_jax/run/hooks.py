"""The loop's periodic hooks: small functions over an explicit :class:`LoopState`.

A hook is called after every step (or fused block of steps) as ``hook(ctx, loop, prev_step) -> LoopState``
and decides itself whether it is due (:func:`crossed`). What a hook decides is recorded in
``LoopState.decisions`` / ``LoopState.clamp``, saved with every checkpoint and logged with its reason.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hmdm_jax import em, hmdm, matching, models, moves, warm_start
from hmdm_jax.run import restarts
from hmdm_jax.run.batches import Clamp, TrainData
from hmdm_jax.run.config import RunConfig
from hmdm_jax.run.evaluation import DECODING_FIT_SEQUENCES, evaluate, predict_states
from hmdm_jax.run.parts import RunParts, Streams
from hmdm_jax.state import TrainState

__all__ = ["Hook", "LoopState", "RunContext", "choose_scoring", "crossed", "default_hooks", "periodic_evaluation",
           "reseed_dead_states", "revived_labels", "split_merge_labels"]


BAND_STREAM = 0x5E1EC7  # with seed and step, seeds the host-side draw of the frames scored for the band
MOVE_STREAM = 0x30FE  # folded into the heuristics key: the ELBO draws that score a move before and after
MOVE_CHECK_SEQUENCES = 32  # training sequences on which a move's chain share is compared


class RunContext(NamedTuple):
    """What every hook may read: the run's config (as given), parts, data, keys and the log."""

    config: RunConfig
    parts: RunParts
    data: TrainData
    heldout: TrainData | None
    phase_labels: np.ndarray  # run.batches.phase_labels
    streams: Streams
    true_A: np.ndarray | None
    log: Callable[[dict, str | None], None]  # (record for metrics.jsonl, message for the console or None)
    # (ctx, state, end step, clamp, decisions) -> a copy of state trained to the end step on the loop's batches,
    # without the hooks: how a split–merge move is tried before it is taken
    advance: Callable[["RunContext", TrainState, int, Clamp | None, dict], TrainState]


@dataclasses.dataclass
class LoopState:
    """The loop's host-side state between steps.

    Attributes:
      step: optimizer steps taken (kept on the host: no device sync to read it).
      train_state: the device-side :class:`TrainState`.
      decisions: what hooks chose that changes training, e.g. ``{"t_range": [lo, hi]}``; JSON-able.
      clamp: labels clamped by a hook until a step, or None.
      evaluation: the last periodic evaluation.
    """

    step: int
    train_state: TrainState
    decisions: dict = dataclasses.field(default_factory=dict)
    clamp: Clamp | None = None
    evaluation: dict = dataclasses.field(default_factory=dict)


class Hook(Protocol):
    def __call__(self, ctx: RunContext, loop: LoopState, prev_step: int) -> LoopState: ...


def crossed(prev_step: int, step: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in (prev_step, step] (never for ``every = 0``)."""
    return every > 0 and step // every > prev_step // every


# --------------------------------------------------------------------------------------------------


def periodic_evaluation(ctx: RunContext, loop: LoopState, prev_step: int) -> LoopState:
    """Every ``evaluation.every`` steps: decode the training items and the held-out set, log the scores."""
    if not crossed(prev_step, loop.step, ctx.config.evaluation.every):
        return loop
    config = ctx.config.with_decisions(loop.decisions)
    ev = evaluate(config, ctx.parts, loop.train_state, ctx.data, ctx.heldout, num_t=config.evaluation.num_t,
                  true_A=ctx.true_A, key=jax.random.fold_in(ctx.streams.eval, loop.step))
    items = [f"step {loop.step}"] + [f"{k}={ev[k]:.4f}" for k in
                                      ("heldout_accuracy", "heldout_accuracy_train_matching", "train_accuracy", "A_mae")
                                      if k in ev]
    items.append("usage=" + ",".join(f"{u:.2f}" for u in ev["class_usage"]))
    ctx.log({"eval": {k: v for k, v in ev.items() if k != "heldout_states"}}, "  ".join(items))
    loop.evaluation = ev
    return loop


def choose_scoring(ctx: RunContext, loop: LoopState, prev_step: int) -> LoopState:
    """At the end of the warm start: the scoring band that best reproduces the warm-start assignment
    (``band.choose``, :func:`em.select_t_range`), then the temperature at which the E-step's posterior in that
    band best predicts the model's own many-draw decision (``band.temperature``, :func:`em.select_temperature`).
    No labels; recorded as ``decisions["t_range"]`` and ``decisions["temperature"]``. With
    ``band.temperature_every`` (HMDM) the temperature is chosen against the chain instead
    (:func:`chain_temperature`), and again every that many steps."""
    config, band_config = ctx.config, ctx.config.band
    boundary = max(config.warm_start.steps, 1)
    if (band_config.temperature_every and boundary < loop.step < config.loop.train_steps
            and "temperature" in loop.decisions and crossed(prev_step, loop.step, band_config.temperature_every)):
        return _rechoose_temperature(ctx, loop)
    if not (band_config.choose or band_config.temperature) or not prev_step < boundary <= loop.step:
        return loop
    assignment = ctx.phase_labels[0]
    valid = ctx.data.valid & ((assignment >= 0) if band_config.choose else True)
    frames, classes = ctx.data.images[valid], assignment[valid]
    key = jax.random.fold_in(ctx.streams.heuristics, loop.step)
    pick = np.sort(np.random.default_rng([config.seed, loop.step, BAND_STREAM]).permutation(len(frames))
                   [: band_config.frames])
    if band_config.choose and "t_range" not in loop.decisions:
        band, agreement = em.select_t_range(config.em, ctx.parts.eps_fn, loop.train_state.params, ctx.parts.schedule,
                                            jnp.asarray(frames[pick]), jnp.asarray(classes[pick], jnp.int32), key)
        agreement = [float(a) for a in np.asarray(agreement)]
        loop.decisions = {**loop.decisions, "t_range": [float(b) for b in band]}
        scores = dict(zip(map(str, em.CANDIDATE_BANDS), agreement))
        ctx.log({"t_range": list(band), "band_agreement": scores},
                f"step {loop.step}: scoring band t_range = {tuple(band)} (agreement with the warm start: "
                + ", ".join(f"{b}: {a:.3f}" for b, a in scores.items()) + ")")
    if band_config.temperature and "temperature" not in loop.decisions:
        scoring = config.with_decisions(loop.decisions).em
        grid = np.asarray(em.TEMPERATURE_GRID)
        configured = config.em.temperature.final
        near = _nearest(grid, configured)
        if band_config.temperature_every:
            temperature, fits, sequences = chain_temperature(ctx, loop, scoring, jax.random.fold_in(key, 2))
            how = (f"the chain adds {fits.max():.3f} nats per frame to {sequences} training sequences scored with the "
                   f"E-step's {scoring.scoring.num_t} draw(s)")
        else:
            temperature, fits = em.select_temperature(scoring, ctx.parts.eps_fn, loop.train_state.params,
                                                      ctx.parts.schedule, jnp.asarray(frames[pick]),
                                                      jax.random.fold_in(key, 1))
            fits = np.asarray(fits)
            how = f"its posterior predicts the model's {em.REFERENCE_DRAWS}-draw class decision at {fits.max():.3f} nats per frame"
        loop.decisions = {**loop.decisions, "temperature": temperature}
        ctx.log({"temperature": temperature, "temperature_fit": [float(f) for f in fits]},
                f"step {loop.step}: temperature {temperature:.3g} in the band {scoring.scoring.t_range} "
                f"({how}; at {grid[near]:.3g}, near the configured {configured:g}: {fits[near]:.3f})")
    return loop


def _nearest(grid: np.ndarray, value: float) -> int:
    """The index of the grid temperature nearest ``value`` on a log scale."""
    return int(np.argmin(np.abs(np.log(grid / value))))


def _rechoose_temperature(ctx: RunContext, loop: LoopState) -> LoopState:
    scoring = ctx.config.with_decisions(loop.decisions).em
    key = jax.random.fold_in(jax.random.fold_in(ctx.streams.heuristics, loop.step), 2)
    temperature, fits, sequences = chain_temperature(ctx, loop, scoring, key)
    before = float(loop.decisions["temperature"])
    grid = np.asarray(em.TEMPERATURE_GRID)
    at_before = float(fits[_nearest(grid, before)])
    loop.decisions = {**loop.decisions, "temperature": temperature}
    ctx.log({"temperature": temperature, "temperature_fit": [float(f) for f in fits]},
            f"step {loop.step}: temperature {temperature:.3g} (was {before:.3g}): the chain adds {fits.max():.3f} "
            f"nats per frame to {sequences} training sequences scored with the E-step's {scoring.scoring.num_t} "
            f"draw(s) ({at_before:.3f} at {before:.3g})")
    return loop


def chain_temperature(ctx: RunContext, loop: LoopState, scoring: em.EMConfig, key: jax.Array
                      ) -> tuple[float, np.ndarray, int]:
    """HMDM's E-step temperature: ``(τ, fits, sequences)``, the τ of ``em.TEMPERATURE_GRID`` at which the chain
    explains the first ``DECODING_FIT_SEQUENCES`` (evaluation) training sequences best when their frames are
    scored as the E-step scores them (its band and draws, the current parameters): :func:`hmdm.select_decoding`,
    the final decoding's own criterion, with the chain refitted at each τ (the run's A is kept). The E-step
    samples states from the chain and the tempered scores together, so their balance is what τ must get
    right: on a dense chain, a τ calibrated on the frames alone left a trained network's one-draw scores so
    soft that the learned A outvoted them, and the states the E-step sampled drifted (RESULTS.md, stop 35)."""
    n = min(len(ctx.data.images), DECODING_FIT_SEQUENCES)
    untempered = scoring.replace(temperature=em.Temperature(final=1.0))
    state, batch = loop.train_state, ctx.config.evaluation.batch_size
    scores = _E_STEP_SCORES.get((untempered, id(ctx.parts.eps_fn)))
    if scores is None:
        scores = jax.jit(lambda params, images, key, step: hmdm.sequence_log_emissions(
            untempered, ctx.parts.eps_fn, params, ctx.parts.schedule, images, key, step))
        _E_STEP_SCORES[(untempered, id(ctx.parts.eps_fn))] = scores
    log_b = np.concatenate([np.asarray(scores(state.params, jnp.asarray(ctx.data.images[i:min(i + batch, n)]),
                                              jax.random.fold_in(key, i), state.step))
                            for i in range(0, n, batch)])
    temperature, _, _, fits = hmdm.select_decoding(jnp.asarray(log_b), jnp.asarray(ctx.data.mask[:n]), state.log_pi,
                                                   state.log_A, scoring.priors)
    return temperature, np.asarray(fits), n


_E_STEP_SCORES: dict = {}  # (untempered E-step config, eps_fn) -> jitted scores of a batch of sequences


def revived_labels(data: TrainData, states: np.ndarray, num_classes: int, min_usage: float, seed: int,
                   limit: int | None = None) -> tuple[np.ndarray, list[tuple[int, int]]] | None:
    """Clamp labels that revive dead states, or None when every state is alive.

    A state used by fewer than ``min_usage / K`` of the valid frames (the ``limit`` least used of them, when
    given) takes one of the two 2-means halves (on the pixels) of the most used state's frames (the half
    without that state's first frame). Only the reassigned frames and the observed labels are clamped; the
    rest stay free.

    Args:
      states: the decoded states of the training data, shaped like ``data.labels``.

    Returns:
      ``(labels shaped like data.labels with −1 = free, [(dead state, state it split)])`` or None.
    """
    valid, clamped = data.valid, data.clamped
    usage = matching.class_usage(states[valid], num_classes)
    dead = [int(d) for d in np.flatnonzero(usage < min_usage / num_classes)]
    dead = sorted(dead, key=lambda d: (usage[d], d))[:limit]
    if not dead:
        return None
    current = np.where(clamped >= 0, clamped, states)
    touched = np.zeros(states.shape, bool)
    event_ndim = data.images.ndim - states.ndim
    splits = []
    for d in dead:
        largest = int(np.argmax(matching.class_usage(current[valid], num_classes)))
        members = (current == largest) & valid & (clamped < 0)
        if members.sum() < 2:
            continue
        frames = data.images[members].reshape((-1,) + data.images.shape[-event_ndim:])
        halves = warm_start.kmeans_labels(frames, 2, seed=seed, pca_dims=20)
        current[members] = np.where(halves == halves[0], largest, d)
        touched |= members
        splits.append((d, largest))
    return np.where(touched, current, clamped).astype(np.int32), splits


def split_merge_labels(data: TrainData, states: np.ndarray, num_classes: int, seed: int,
                       log_emissions: np.ndarray | None = None, min_z: float = moves.MIN_Z) -> tuple[np.ndarray, moves.SplitMerge] | None:
    """Clamp labels of the best split–merge move of the decoded ``states`` (shaped like ``data.labels``), or
    None when no move gains or labels are observed (observed labels already anchor every state they name).
    With the frames' ``log_emissions`` (``[*labels.shape, K]``), the model chooses the pair to merge
    (:func:`moves.swap_costs`).

    The frames of the three states involved are clamped to their states after the move; the rest stay free.
    """
    valid, clamped = data.valid, data.clamped
    if (clamped >= 0).any() or num_classes < 3:
        return None
    event_ndim = data.images.ndim - states.ndim
    frames = data.images[valid].reshape((-1,) + data.images.shape[-event_ndim:])
    costs = None if log_emissions is None else moves.swap_costs(log_emissions[valid], states[valid], num_classes)
    move = moves.split_merge_move(frames, states[valid], num_classes, seed=seed, merge_costs=costs, min_z=min_z)
    if move is None:
        return None
    labels = np.full(states.shape, -1, np.int32)
    involved = np.isin(states[valid], [move.split, *move.merge])
    labels[valid] = np.where(involved, move.states, -1)
    return labels, move


def reseed_dead_states(ctx: RunContext, loop: LoopState, prev_step: int) -> LoopState:
    """Every ``reseed.every`` steps after the warm start (while ``reseed.steps`` still fit in the run):
    decode the training data and clamp :func:`revived_labels` for ``reseed.steps`` steps; with no dead
    state and ``reseed.split_merge``, :func:`split_merge_labels` instead when a move gains. With
    ``reseed.check_moves`` (HMDM) either is first tried (:func:`try_move`): a re-seeding revives the least used
    state alone, and once one loses, only states used less than that one count as dead. A state no frame
    decodes to is re-seeded untried."""
    config, r = ctx.config, ctx.config.reseed
    if not (crossed(prev_step, loop.step, r.every) and loop.step >= config.warm_start.steps
            and loop.step + r.steps < config.loop.train_steps):
        return loop
    trained = config.with_decisions(loop.decisions)
    decoded = predict_states(trained, ctx.parts, loop.train_state, ctx.data.images, ctx.data.mask, num_t=r.num_t,
                             key=jax.random.fold_in(ctx.streams.heuristics, loop.step))
    states = decoded["states"]
    checked = r.check_moves and config.model_type == "hmdm"
    # a re-seeding that lost its trial showed that a state this rare is real on this chain
    min_usage = min(r.min_usage, config.num_classes * loop.decisions.get("reseed_refused_usage", 1.0))
    revived = revived_labels(ctx.data, states, config.num_classes, min_usage, config.seed, limit=1 if checked else None)
    if revived is None:
        # the frames' own scores (HMDM) or posteriors (mixture) pick the pair to merge
        scores = decoded.get("log_emissions", decoded.get("log_posterior"))
        return _split_merge(ctx, loop, states, scores) if r.split_merge else loop
    labels, splits = revived
    usage = matching.class_usage(states[ctx.data.valid], config.num_classes)
    record = {"reseed": [{"dead": d, "split": s, "usage": float(usage[d])} for d, s in splits]}
    message = f"step {loop.step}: re-seeding dead states " + ", ".join(
        f"{d} (usage {usage[d]:.3f}) from a half of {s}" for d, s in splits)
    moved = copy_parents(loop.train_state, config.num_classes, splits) if r.copy_parent else loop.train_state
    # a state that no frame decodes to cannot be legitimately rare: the model without it has K − 1 states
    if checked and any(usage[d] > 0 for d, _ in splits):
        if loop.step + r.every > config.loop.train_steps:
            ctx.log(record | {"trial": None}, message + ": not tried, too late in the run for its trial")
            return loop
        trial = try_move(ctx, loop, labels, moved)
        record["trial"] = trial
        message += "; " + _trial_message(ctx, trial)
        if not trial["taken"]:
            refused = min(float(usage[d]) for d, _ in splits)
            loop.decisions = {**loop.decisions, "reseed_refused_usage": refused}
            ctx.log(record, message + f": not taken; from now on only states used by fewer than {refused:.3f} "
                                      "of the frames count as dead")
            return loop
    loop.clamp = Clamp(loop.step + r.steps, labels)
    loop.train_state = moved
    ctx.log(record | {"clamped_until": loop.clamp.until}, message + f"; clamped until step {loop.clamp.until}")
    return loop


def copy_parents(state: TrainState, num_classes: int, pairs: list[tuple[int, int]]) -> TrainState:
    """``state`` with each ``(freed, parent)`` pair's freed class starting from its parent's class
    parameters, in the trained and the EMA parameters alike."""
    params, ema = state.params, state.ema_params
    for freed, parent in pairs:
        params = models.copy_class(params, num_classes, parent, freed)
        ema = models.copy_class(ema, num_classes, parent, freed)
    return state.replace(params=params, ema_params=ema)


def move_score(ctx: RunContext, state: TrainState) -> np.ndarray:
    """The chain's share of the HMDM bound (:class:`restarts.Scores`, nats summed over each sequence) on each of
    the first ``MOVE_CHECK_SEQUENCES`` training sequences, with the same ELBO draws at every call: the
    criterion that ranks restarts by how well their states explain the sequences, here comparing a run with
    and without a move, sequence by sequence."""
    n = min(MOVE_CHECK_SEQUENCES, len(ctx.data.images))
    check = TrainData(ctx.data.images[:n], ctx.data.labels[:n], ctx.data.observed[:n], ctx.data.valid[:n])
    key = jax.random.fold_in(ctx.streams.heuristics, MOVE_STREAM)
    bound, framewise, _ = restarts.sequence_scores(ctx.config, ctx.parts, state, check, key)
    return bound - framewise


def try_move(ctx: RunContext, loop: LoopState, labels: np.ndarray, moved: TrainState) -> dict:
    """Trial of a move (a split–merge or a re-seeding) before it is taken: two copies of the run train for one
    re-seeding period on the same batches, one from ``moved`` (the state as the move leaves it) with the
    move's clamp ``labels``, one as the run stands. Returns the record of their chain shares of the bound
    (:func:`move_score`, nats per frame) at the period's end, the paired z of the difference over the
    sequences, and whether the move wins (``"taken"``: z ≥ ``reseed.trial_z``).

    The Gaussian proxy that proposes a move knows nothing of the diffusion model: on weak chains it split a
    digit's two styles and merged two digits the model told apart (RESULTS.md, stop 27). The trial compares
    the two runs at one step: checked against the score before the move instead, every move gained the
    period's training and bad ones were kept (RESULTS.md, stop 28). A win must be significant: where the
    chain carries little (a dense chain), moves and re-seedings that broke real states won by differences in
    the third decimal. A move that loses is not taken, so the run goes on exactly as it would have without it."""
    r = ctx.config.reseed
    end = loop.step + r.every
    without = ctx.advance(ctx, loop.train_state, end, loop.clamp, loop.decisions)
    with_move = ctx.advance(ctx, moved, end, Clamp(loop.step + r.steps, labels), loop.decisions)
    chain_without, chain_with = move_score(ctx, without), move_score(ctx, with_move)
    frames = float(ctx.data.valid[:len(chain_with)].sum())
    z = moves.paired_z(np.asarray(chain_with, np.float64) - np.asarray(chain_without, np.float64))
    return {"step": end, "chain_without": float(np.sum(chain_without)) / frames,
            "chain_with": float(np.sum(chain_with)) / frames, "z": float(z), "taken": bool(z >= r.trial_z)}


def _trial_message(ctx: RunContext, trial: dict) -> str:
    return (f"tried for {ctx.config.reseed.every} steps, the chain's share of the bound on "
            f"{min(MOVE_CHECK_SEQUENCES, len(ctx.data.images))} training sequences at step {trial['step']}: "
            f"{trial['chain_with']:.3f} with it, {trial['chain_without']:.3f} without, nats per frame "
            f"(z = {trial['z']:.1f}, {ctx.config.reseed.trial_z:g} needed)")


def _moved_state(ctx: RunContext, state: TrainState, move: moves.SplitMerge) -> TrainState:
    """``state`` as the move leaves it: with ``reseed.copy_parent``, the freed state starts from the split one."""
    if not ctx.config.reseed.copy_parent:
        return state
    return copy_parents(state, ctx.config.num_classes, [(move.merge[1], move.split)])


def _split_merge(ctx: RunContext, loop: LoopState, states: np.ndarray, scores: np.ndarray) -> LoopState:
    config, r = ctx.config, ctx.config.reseed
    checked = r.check_moves and config.model_type == "hmdm"
    if checked and loop.decisions.get("moves_rejected"):
        return loop  # the same states would propose the same move
    if checked and loop.step + r.every > config.loop.train_steps:
        ctx.log({"split_merge": None}, f"step {loop.step}: no split-merge move: too late in the run to try one")
        return loop
    proposed = split_merge_labels(ctx.data, states, config.num_classes, config.seed, scores,
                                  min_z=config.reseed.split_merge_z)
    if proposed is None:
        ctx.log({"split_merge": None}, f"step {loop.step}: no split-merge move gains "
                                       f"{config.reseed.split_merge_z:g} standard errors")
        return loop
    labels, move = proposed
    record = {"split": move.split, "merge": list(move.merge), "gain": move.gain, "loss": move.loss, "z": move.z}
    message = (f"step {loop.step}: split state {move.split} (gain {move.gain:.0f} nats) and merge state "
               f"{move.merge[1]} into {move.merge[0]} (loss {move.loss:.0f} nats; net gain {move.z:.1f} standard "
               f"errors), {move.merge[1]} taking the second half of {move.split}")
    if checked:
        trial = try_move(ctx, loop, labels, _moved_state(ctx, loop.train_state, move))
        record["trial"] = trial
        message += "; " + _trial_message(ctx, trial)
        if not trial["taken"]:
            loop.decisions = {**loop.decisions, "moves_rejected": [*loop.decisions.get("moves_rejected", []), loop.step]}
            ctx.log({"split_merge": record}, message + ": not taken; no more split-merge moves in this run")
            return loop
    loop.clamp = Clamp(loop.step + r.steps, labels)
    loop.train_state = _moved_state(ctx, loop.train_state, move)
    ctx.log({"split_merge": record, "clamped_until": loop.clamp.until},
            message + f": taken, clamped until step {loop.clamp.until}")
    return loop


def default_hooks(config: RunConfig) -> tuple[Hook, ...]:
    """The hooks a run uses, in the order they run after a step. The band is chosen before the re-seed check
    of the same step decodes with it: decoded with the default band, a 28×28 mixture put every image in one
    state at the end of its warm start, and the re-seeding then split that state over all the others."""
    return (periodic_evaluation, choose_scoring, reseed_dead_states)
