"""The one training loop, for both the mixture and HMDM.

``train`` runs jitted steps on deterministic batches (after the restarts, when the config has them), calls
the hooks (evaluation, dead-state re-seeding, the band choice) after each, chooses HMDM's decoding
temperature after the last (``evaluation.choose_temperature``), writes ``metrics.jsonl`` and Orbax
checkpoints, resumes exactly, and stops cleanly on SIGTERM/Ctrl-C (checkpoint, then return). The step count lives on the host, so the loop never
waits on the device to know where it is.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hmdm_jax import checkpoint, moves, parallel
from hmdm_jax.run import evaluation, restarts
from hmdm_jax.run.batches import Clamp, TrainData, check_data, describe_start, make_batch, phase_labels
from hmdm_jax.run.config import RunConfig, WarmStartConfig
from hmdm_jax.run.hooks import Hook, LoopState, RunContext, crossed, default_hooks
from hmdm_jax.run.parts import RunParts, build_parts, init_state, make_step, streams
from hmdm_jax.state import TrainState

__all__ = ["TrainResult", "train"]

RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "results.json", "figures")


class TrainResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      state: the final train state.
      config: the config as trained (the hooks' decisions applied, e.g. the chosen band): decode with it.
      parts: the run's static parts.
      evaluation: the last periodic evaluation ({} if none ran).
      decisions: what the hooks decided (also in the checkpoint metadata).
      stopped_early: a SIGTERM/Ctrl-C ended the run (before ``train_steps``, or during the final save):
        the checkpoint is saved; callers should skip their evaluation.
    """

    state: TrainState
    config: RunConfig
    parts: RunParts
    evaluation: dict
    decisions: dict
    stopped_early: bool = False


def _prepare_workdir(workdir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a workdir that is a file or already holds another run (unless ``overwrite``), before writing."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir {workdir} exists and is not a directory")
    ckpt_dir = workdir / "checkpoints"
    if resume:
        if checkpoint.latest_step(ckpt_dir) is None:
            raise checkpoint.CheckpointNotFoundError(f"nothing to resume: no checkpoint in {ckpt_dir}")
        return
    used = [name for name in RUN_FILES if (workdir / name).exists()]
    if used and not overwrite:
        raise ValueError(f"workdir {workdir} already holds a run ({', '.join(used)}): pass --resume to continue "
                         f"it or --overwrite to replace it")
    for name in used:
        path = workdir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (np.ndarray, jax.Array)):
            v = np.asarray(v)
            v = v.item() if v.ndim == 0 else v.tolist()
        elif isinstance(v, (np.floating, np.integer)):
            v = v.item()
        elif isinstance(v, dict):
            v = _jsonable(v)
        out[k] = v
    return out


def _metadata(loop: LoopState) -> dict:
    """Checkpoint metadata: the hooks' decisions, an active clamp and the state-to-label matching."""
    out: dict[str, Any] = {"decisions": loop.decisions}
    if "matching" in loop.evaluation:
        out["matching"] = loop.evaluation["matching"]
    if loop.clamp is not None and loop.clamp.until > loop.step:
        out["clamp"] = {"until": loop.clamp.until, "labels": loop.clamp.labels.reshape(-1).tolist()}
    return out


def _restored_clamp(metadata: dict, shape) -> Clamp | None:
    c = metadata.get("clamp")
    return None if c is None else Clamp(int(c["until"]), np.asarray(c["labels"], np.int32).reshape(shape))


def train(
    config: RunConfig,
    data: TrainData,
    workdir: str | Path,
    *,
    heldout: TrainData | None = None,
    resume: bool = False,
    overwrite: bool = False,
    true_A: np.ndarray | None = None,
    progress: bool = True,
    init_params: Any = None,
    stop_after: int | None = None,
    hooks: Sequence[Hook] | None = None,
    log_prefix: str = "",
) -> TrainResult:
    """Trains ``config`` on ``data``, writing ``config.json``, ``metrics.jsonl`` and checkpoints to ``workdir``.

    With ``restarts.count > 1`` the run first trains that many candidates for ``restarts.steps`` steps each
    (the whole run by default; no checkpoints: a stop during them leaves none) and keeps the one of highest
    held-out score, continuing it when steps are left; every candidate's records in ``metrics.jsonl`` carry
    ``"restart": r``.

    Args:
      heldout: data for the periodic evaluation (labels are used only there).
      resume: continue from the latest checkpoint in ``workdir/checkpoints`` (error if none).
      overwrite: replace a run already in ``workdir`` (otherwise that is an error, so runs never mix).
      true_A: the data's transition matrix, to report A's error after matching (synthetic sequences).
      init_params: start from these ε-network parameters (fine-tuning a pretrained diffusion).
      stop_after: stop (with a checkpoint) after this many steps in this call, not counting the candidates'
        (tests and demos of resume).
      hooks: the periodic hooks (default :func:`~hmdm_jax.run.hooks.default_hooks`).
      log_prefix: put before every printed log line (a run inside a run: the mixture warm start).

    Input errors (data that do not fit the config, a used workdir, nothing to resume) raise ``ValueError``
    before anything is written.
    """
    config.check()
    check_data(config, data)
    # the band is chosen to reproduce a warm-start assignment: every run that chooses one (each restart) needs it
    starts = ([restarts.candidate_config(config, r) for r in range(config.restarts.count)] if config.restarts.active
              else [config])
    if config.band.choose and not (data.clamped >= 0).any() and not all(c.warm_start.active for c in starts):
        raise ValueError("band.choose picks the band from the warm-start assignment: set warm_start.method and "
                         "warm_start.steps > 0 (or observe some labels), or band.choose=false")
    workdir = Path(workdir)
    split = restarts.split_sequences(config, data) if config.restarts.active and not resume else None
    _prepare_workdir(workdir, resume, overwrite)
    parts = build_parts(config)
    # with restarts, the run continues after the warm start (each candidate makes its own)
    own_start = not config.restarts.active
    labels, start_record = phase_labels(config if own_start else config.replace(warm_start=WarmStartConfig("none")), data)
    hooks = default_hooks(config) if hooks is None else tuple(hooks)
    mesh = parallel.data_mesh() if len(jax.devices()) > 1 else None
    if mesh is not None:
        parallel.check_divisible(config.loop.batch_size, mesh)
    # several hosts: each passes its share and the global array is assembled over the mesh
    place = (lambda b: parallel.global_batch(b, mesh)) if jax.process_count() > 1 else (lambda b: b)

    ckpt = checkpoint.Checkpointer.open(workdir / "checkpoints", max_to_keep=config.loop.keep_checkpoints,
                                        save_every=config.loop.checkpoint_every or 10**12, config=config)
    if resume:
        state, metadata = ckpt.restore(init_state(config, parts, init_params))
        loop = LoopState(int(state.step), state, dict(metadata.get("decisions", {})),
                         _restored_clamp(metadata, data.labels.shape))
    else:
        loop = LoopState(0, init_state(config, parts, init_params) if own_start else None)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    metrics_file = open(workdir / "metrics.jsonl", "a" if resume else "w")

    def logger(prefix: dict, label: str, at: Callable[[], int]):
        def log(record: dict, message: str | None) -> None:
            metrics_file.write(json.dumps({"step": at(), **prefix, **_jsonable(record)}) + "\n")
            metrics_file.flush()
            if message:
                message = label + message
                tqdm.write(message) if progress else print(message, flush=True)
        return log

    log = logger({}, log_prefix, lambda: loop.step)
    keys = streams(config.seed)
    if start_record and not resume:
        log({"warm_start": start_record}, describe_start(start_record))
    if resume:
        log({"resumed": loop.step}, f"resuming from step {loop.step} of {config.loop.train_steps}")

    step_fns: dict = {}

    def step_fn(decisions: dict, n: int):
        em_config = config.with_decisions(decisions)
        key = (em_config.em, n)
        if key not in step_fns:
            step_fns[key] = make_step(em_config, parts, mesh, fused=n)
        return step_fns[key]

    fused = config.loop.steps_per_call

    def train_block(ctx: RunContext, state: TrainState, step: int, n: int, clamp: Clamp | None, decisions: dict):
        """``n`` steps from ``step`` in one call (``n > 1``: fused): the new state (``state`` is donated) and
        the last step's metrics."""
        if n > 1:
            batches = [make_batch(ctx.config, ctx.data, ctx.phase_labels, step + i, clamp) for i in range(n)]
            stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
            state, metrics = step_fn(decisions, n)(state, place(stacked))
            return state, jax.tree.map(lambda m: m[-1], metrics)
        return step_fn(decisions, 1)(state, place(make_batch(ctx.config, ctx.data, ctx.phase_labels, step, clamp)))

    def advance(ctx: RunContext, state: TrainState, end: int, clamp: Clamp | None, decisions: dict) -> TrainState:
        """A copy of ``state`` trained to step ``end`` on the batches the loop makes, without the hooks: how
        a split–merge move is tried (:func:`~hmdm_jax.run.hooks.try_move`)."""
        state = jax.tree.map(jnp.copy, state)  # the jitted step donates its input: train a real copy
        step = int(state.step)
        while step < end:
            n = fused if end - step >= fused else 1
            state, _ = train_block(ctx, state, step, n, clamp, decisions)
            step += n
        return state

    ctx = RunContext(config, parts, data, heldout, labels, keys, true_A, log, advance)

    def run_steps(ctx: RunContext, loop: LoopState, end: int, after_step: Callable[[LoopState], None]
                  ) -> tuple[LoopState, bool]:
        """Steps ``loop`` to ``end`` under ``ctx``, with the hooks: the loop state, and whether a stop was requested."""
        frames_per_step = config.loop.batch_size * (1 if data.mask is None else data.images.shape[1])
        bar = tqdm(total=end - loop.step, disable=not progress, desc=config.model_type, unit="step")
        t_last, step_last = time.perf_counter(), loop.step
        try:
            while loop.step < end:
                n = fused if end - loop.step >= fused else 1
                loop.train_state, metrics = train_block(ctx, loop.train_state, loop.step, n, loop.clamp, loop.decisions)
                prev = loop.step
                loop.step += n
                bar.update(n)
                if crossed(prev, loop.step, config.loop.log_every) or loop.step == end:
                    now = time.perf_counter()
                    rate = (loop.step - step_last) * frames_per_step / max(now - t_last, 1e-9)
                    t_last, step_last = now, loop.step
                    record = {**_jsonable(metrics), "frames_per_sec": rate}
                    ctx.log(record, None)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", fps=f"{rate:.0f}")
                for hook in hooks:
                    loop = hook(ctx, loop, prev)
                after_step(loop)
                # multi-host: every process must stop at the same step, which JAX's preemption sync decides
                if ckpt.reached_preemption(loop.step) if jax.process_count() > 1 else guard.should_stop:
                    return loop, True
            return loop, False
        finally:
            bar.close()

    def choose_decoding(loop: LoopState) -> None:
        """The decoding temperature and the chain refitted with it, once the last step is reached and before that
        step's checkpoint (a saved step is never rewritten, and no training step follows the refit in this run)."""
        if (config.evaluation.choose_temperature and loop.step >= config.loop.train_steps
                and "decoding_temperature" not in loop.decisions):
            loop.decisions = {**loop.decisions, **_choose_decoding(config, parts, loop, data, log)}

    start = loop.step
    end = config.loop.train_steps if stop_after is None else min(config.loop.train_steps, start + stop_after)
    stopped_early = False
    try:
        with checkpoint.PreemptionGuard() as guard:
            if split is not None:
                chosen = _choose_restart(config, parts, split, data, ctx, logger, run_steps, init_params)
                if chosen is None:
                    log({"stopped": "restarts"}, "stop requested during the restarts: no checkpoint yet, exiting")
                    return TrainResult(None, config, parts, {}, {}, True)
                loop = chosen
                choose_decoding(loop)
                choice = loop.decisions["restarts"]
                held = (f": its {choice['warm_start']} start held for all {loop.step} steps scores above every EM "
                        f"candidate by the model's held-out bound, so the run keeps the start rather than end below it"
                        if choice["held"] else "")
                log({"restarts": choice}, f"step {loop.step}: restart {choice['chosen']} "
                    f"{'is kept' if loop.step >= config.loop.train_steps else 'continues'} (held-out "
                    f"{choice['criterion']} per frame: " + ", ".join(f"{i}: {b:.3f}" for i, b in enumerate(choice["scores"])) + ")"
                    + held)
                ckpt.save(loop.train_state, step=loop.step, metadata=_metadata(loop), force=True)
                end = config.loop.train_steps if stop_after is None else min(config.loop.train_steps,
                                                                             loop.step + stop_after)

            def save(loop: LoopState) -> None:
                choose_decoding(loop)
                ckpt.save(loop.train_state, step=loop.step, metadata=_metadata(loop))

            loop, stop = run_steps(ctx, loop, end, save)
            choose_decoding(loop)  # a resumed run that had ended without the choice
            if stop:
                log({"stopped": loop.step}, f"stop requested at step {loop.step}: checkpoint saved, exiting")
                stopped_early = True
            ckpt.save(loop.train_state, step=loop.step, metadata=_metadata(loop), force=True)
            ckpt.wait()
            if guard.should_stop and not stopped_early:
                # the signal came after the last check (during the final save): honour it all the same
                log({"stopped": loop.step}, f"stop requested at step {loop.step}, after the last step: "
                                            f"checkpoint saved, exiting")
                stopped_early = True
    finally:
        metrics_file.close()
        ckpt.wait()
        ckpt.close()
    return TrainResult(loop.train_state, config.with_decisions(loop.decisions), parts, loop.evaluation,
                       loop.decisions, stopped_early)


def _choose_decoding(config: RunConfig, parts: RunParts, loop: LoopState, sequences: TrainData, log: Callable) -> dict:
    """``{"decoding_temperature": τ}`` chosen on the training ``sequences``, with ``loop``'s π and A replaced by
    the chain refitted with it (the final M-step of the chain on the decoding's emissions); logged."""
    trained = config.with_decisions(loop.decisions)
    state = loop.train_state
    temperature, log_pi, log_A, fits = evaluation.choose_decoding(trained, parts, state, sequences)
    change = float(np.abs(np.exp(log_A) - np.exp(np.asarray(state.log_A))).mean())
    loop.train_state = evaluation.with_chain(state, log_pi, log_A)
    estimator, num_t = evaluation.final_decoding(trained)
    log({"decoding_temperature": temperature, "decoding_temperature_fit": [float(f) for f in fits],
         "refit_A_change": change},
        f"step {loop.step}: decoding temperature {temperature:.3g} ({estimator}, {num_t} t-draws; the E-step's is "
        f"{trained.em.temperature.final:.3g}), with π and A refitted to those emissions (A moves by {change:.4f} "
        f"per entry): the chain adds {float(fits.max()):.3f} nats per frame on "
        f"{min(len(sequences.images), evaluation.DECODING_FIT_SEQUENCES)} training sequences")
    return {"decoding_temperature": temperature}


def _choose_restart(config: RunConfig, parts: RunParts, split: restarts.Split, data: TrainData, ctx: RunContext,
                    logger: Callable, run_steps: Callable, init_params: Any) -> LoopState | None:
    """Trains every candidate for ``restarts.steps`` steps on ``split.train``, logs each one's held-out bound,
    and returns the best one's loop state on all of ``data`` (its clamp widened, the choice in its
    decisions); None when a stop was requested."""
    r_config = config.restarts
    key = jax.random.fold_in(streams(config.seed).eval, restarts.BOUND_STREAM)
    best, scores = None, []
    for r in range(r_config.count):
        c = restarts.candidate_config(config, r)
        cand = LoopState(0, init_state(c, parts, init_params))
        log = logger({"restart": r}, f"restart {r}: ", lambda: cand.step)
        labels, record = phase_labels(c, split.train)
        held = f" (held for all {c.warm_start.steps} steps: no EM)" if restarts.is_held(config, r) else ""
        log({"warm_start": record or {"method": c.warm_start.method}, "seed": c.seed, "held": bool(held)},
            (describe_start(record) if record else f"warm start {c.warm_start.method}, seed {c.seed}") + held)
        cand_ctx = RunContext(c, parts, split.train, ctx.heldout, labels, streams(c.seed), ctx.true_A, log, ctx.advance)
        end = r_config.candidate_steps(config.loop.train_steps)
        snapshots = _Snapshots(config, parts, split.heldout, key, c.warm_start.steps, end, log)
        cand, stop = run_steps(cand_ctx, cand, end, snapshots.offer)
        if stop:
            return None
        cand, score = snapshots.keep_best(cand)
        scores.append(score)
        log({"restart_scores": score._asdict()},
            f"on the {len(split.heldout.images)} held-out training images, nats per image: bound {score.bound:.3f}"
            if data.mask is None else  # the mixture has no chain: its bound is its frame-wise bound
            f"on the {len(split.heldout.images)} held-out training sequences, nats per frame: bound {score.bound:.3f}, "
            f"frame-wise {score.framewise:.3f}, chain {score.chain:.3f}")
        value = getattr(score, r_config.criterion)
        if np.isfinite(value) and (best is None or value > getattr(scores[best[0]], r_config.criterion)):
            best = (r, cand)
    if best is None:
        raise FloatingPointError(f"every restart diverged (held-out scores {scores}): lower optim.learning_rate")
    r, cand = best
    choice = {"chosen": r, "seed": restarts.candidate_seed(config.seed, r), "criterion": r_config.criterion,
              "snapshot": cand.decisions.get("snapshot"),
              "scores": [getattr(s, r_config.criterion) for s in scores],
              "bounds": [s.bound for s in scores], "chain": [s.chain for s in scores],
              "warm_start": restarts.candidate_config(config, r).warm_start.method,
              "held": restarts.is_held(config, r)}
    return LoopState(cand.step, cand.train_state, {**cand.decisions, "restarts": choice},
                     restarts.widen_clamp(cand.clamp, split.train_index, data.labels.shape), cand.evaluation)


class _Snapshots:
    """One candidate's snapshots (``restarts.snapshot_every``): :meth:`offer` after every step scores the state on
    the held-out sequences when a snapshot is due and keeps a copy of the best; :meth:`keep_best` at the end
    returns the candidate, or its best snapshot where that is higher by ``restarts.snapshot_z`` paired standard
    errors, with its :class:`restarts.Scores`. All scores use one key, as the candidates' do."""

    def __init__(self, config: RunConfig, parts: RunParts, heldout: TrainData, key: jax.Array, first: int, end: int,
                 log: Callable):
        self.config, self.parts, self.heldout, self.key, self.log = config, parts, heldout, key, log
        self.every, self.first, self.end = config.restarts.snapshot_every, first, end
        self.prev = 0
        self.best: tuple | None = None  # (criterion per sequence, per-sequence scores, copy of the loop state)

    def _score(self, state: TrainState) -> tuple[np.ndarray, tuple]:
        scores = restarts.sequence_scores(self.config, self.parts, state, self.heldout, self.key)
        return restarts.criterion_per_sequence(self.config, scores[0], scores[1]), scores

    def offer(self, loop: LoopState) -> None:
        prev, self.prev = self.prev, loop.step
        if not (crossed(prev, loop.step, self.every) and self.first <= loop.step < self.end):
            return
        values, scores = self._score(loop.train_state)
        value = getattr(restarts.per_frame(*scores), self.config.restarts.criterion)
        best = bool(self.best is None or values.sum() > self.best[0].sum())
        if best:
            copy = LoopState(loop.step, jax.tree.map(jnp.copy, loop.train_state), dict(loop.decisions), loop.clamp,
                             dict(loop.evaluation))
            self.best = (values, scores, copy)
        self.log({"snapshot": {"step": loop.step, self.config.restarts.criterion: value, "best": best}},
                 f"step {loop.step}: snapshot, held-out {self.config.restarts.criterion} {value:.3f} nats per frame"
                 + (" (the best so far)" if best else ""))

    def keep_best(self, cand: LoopState) -> tuple[LoopState, restarts.Scores]:
        values, scores = self._score(cand.train_state)
        last = restarts.per_frame(*scores)
        if self.best is None:
            return cand, last
        snap_values, snap_scores, snap = self.best
        kept = restarts.per_frame(*snap_scores)
        criterion = self.config.restarts.criterion
        z = moves.paired_z(snap_values - values)
        record = {"step": snap.step, "z": float(z), criterion: getattr(kept, criterion),
                  f"{criterion}_last": getattr(last, criterion), "kept": bool(z >= self.config.restarts.snapshot_z)}
        message = (f"step {cand.step}: the step-{snap.step} snapshot against the last state, held-out {criterion} "
                   f"{getattr(kept, criterion):.3f} vs {getattr(last, criterion):.3f} nats per frame (paired z = "
                   f"{z:.1f}, {self.config.restarts.snapshot_z:g} needed)")
        self.log({"snapshot_choice": record}, message + (f": the candidate is its step-{snap.step} state"
                                                          if record["kept"] else ": the last state is kept"))
        if not record["kept"]:
            return cand, last
        # the snapshot takes the candidate's step count: the candidate ends there, it is not trained to the end again
        state = snap.train_state.replace(step=jnp.asarray(cand.step, snap.train_state.step.dtype))
        decisions = {**snap.decisions, "snapshot": record}
        return LoopState(cand.step, state, decisions, snap.clamp, snap.evaluation), kept
