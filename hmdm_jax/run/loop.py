"""The one training loop, for both the mixture and HMDM.

``train`` runs jitted steps on deterministic batches, calls the hooks (evaluation, dead-state re-seeding,
the band choice) after each, writes ``metrics.jsonl`` and Orbax checkpoints, resumes exactly, and stops
cleanly on SIGTERM/Ctrl-C (checkpoint, then return). The step count lives on the host, so the loop never
waits on the device to know where it is.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from hmdm_jax import checkpoint, parallel, warm_start
from hmdm_jax.run.batches import Clamp, TrainData, check_data, make_batch, phase_labels
from hmdm_jax.run.config import RunConfig
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
) -> TrainResult:
    """Trains ``config`` on ``data``, writing ``config.json``, ``metrics.jsonl`` and checkpoints to ``workdir``.

    Args:
      heldout: data for the periodic evaluation (labels are used only there).
      resume: continue from the latest checkpoint in ``workdir/checkpoints`` (error if none).
      overwrite: replace a run already in ``workdir`` (otherwise that is an error, so runs never mix).
      true_A: the data's transition matrix, to report A's error after matching (synthetic sequences).
      init_params: start from these ε-network parameters (fine-tuning a pretrained diffusion).
      stop_after: stop (with a checkpoint) after this many steps in this call (tests and demos of resume).
      hooks: the periodic hooks (default :func:`~hmdm_jax.run.hooks.default_hooks`).

    Input errors (data that do not fit the config, a used workdir, nothing to resume) raise ``ValueError``
    before anything is written.
    """
    check_data(config, data)
    workdir = Path(workdir)
    _prepare_workdir(workdir, resume, overwrite)
    parts = build_parts(config)
    keys = streams(config.seed)
    labels, start_record = phase_labels(config, data)
    if config.band.choose and not (labels[0] >= 0).any():
        raise ValueError("band.choose picks the band from the warm-start assignment: set warm_start.method "
                         "(or observe some labels)")
    hooks = default_hooks(config) if hooks is None else tuple(hooks)
    mesh = parallel.data_mesh() if len(jax.devices()) > 1 else None
    if mesh is not None:
        parallel.check_divisible(config.loop.batch_size, mesh)
    # several hosts: each passes its share and the global array is assembled over the mesh
    place = (lambda b: parallel.global_batch(b, mesh)) if jax.process_count() > 1 else (lambda b: b)

    state = init_state(config, parts, init_params)
    ckpt = checkpoint.Checkpointer.open(workdir / "checkpoints", max_to_keep=config.loop.keep_checkpoints,
                                        save_every=config.loop.checkpoint_every or 10**12, config=config)
    loop = LoopState(0, state)
    if resume:
        state, metadata = ckpt.restore(state)
        loop = LoopState(int(state.step), state, dict(metadata.get("decisions", {})),
                         _restored_clamp(metadata, data.labels.shape))
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    metrics_file = open(workdir / "metrics.jsonl", "a" if resume else "w")

    def log(record: dict, message: str | None) -> None:
        metrics_file.write(json.dumps({"step": loop.step, **_jsonable(record)}) + "\n")
        metrics_file.flush()
        if message and progress:
            tqdm.write(message)
        elif message:
            print(message, flush=True)

    ctx = RunContext(config, parts, data, heldout, labels, keys, true_A, log)
    if start_record and not resume:
        log({"warm_start": start_record}, warm_start.describe(start_record))
    if resume:
        log({"resumed": loop.step}, f"resuming from step {loop.step} of {config.loop.train_steps}")

    step_fns: dict = {}

    def step_fn(n: int):
        em_config = config.with_decisions(loop.decisions)
        key = (em_config.em, n)
        if key not in step_fns:
            step_fns[key] = make_step(em_config, parts, mesh, fused=n)
        return step_fns[key]

    fused, start = config.loop.steps_per_call, loop.step
    end = config.loop.train_steps if stop_after is None else min(config.loop.train_steps, start + stop_after)
    frames_per_step = config.loop.batch_size * (1 if data.mask is None else data.images.shape[1])
    bar = tqdm(total=end - start, disable=not progress, desc=config.model_type, unit="step")
    t_last, step_last, stopped_early = time.perf_counter(), start, False
    try:
        with checkpoint.PreemptionGuard() as guard:
            while loop.step < end:
                n = fused if end - loop.step >= fused else 1
                if n > 1:
                    batches = [make_batch(config, data, labels, loop.step + i, loop.clamp) for i in range(n)]
                    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
                    loop.train_state, metrics = step_fn(n)(loop.train_state, place(stacked))
                    metrics = jax.tree.map(lambda m: m[-1], metrics)
                else:
                    batch = make_batch(config, data, labels, loop.step, loop.clamp)
                    loop.train_state, metrics = step_fn(1)(loop.train_state, place(batch))
                prev = loop.step
                loop.step += n
                bar.update(n)
                if crossed(prev, loop.step, config.loop.log_every) or loop.step == end:
                    now = time.perf_counter()
                    rate = (loop.step - step_last) * frames_per_step / max(now - t_last, 1e-9)
                    t_last, step_last = now, loop.step
                    record = {**_jsonable(metrics), "frames_per_sec": rate}
                    log(record, None)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", fps=f"{rate:.0f}")
                for hook in hooks:
                    loop = hook(ctx, loop, prev)
                ckpt.save(loop.train_state, step=loop.step, metadata=_metadata(loop))
                # multi-host: every process must stop at the same step, which JAX's preemption sync decides
                if ckpt.reached_preemption(loop.step) if jax.process_count() > 1 else guard.should_stop:
                    log({"stopped": loop.step}, f"stop requested at step {loop.step}: checkpoint saved, exiting")
                    stopped_early = True
                    break
            ckpt.save(loop.train_state, step=loop.step, metadata=_metadata(loop), force=True)
            ckpt.wait()
            if guard.should_stop and not stopped_early:
                # the signal came after the last check (during the final save): honour it all the same
                log({"stopped": loop.step}, f"stop requested at step {loop.step}, after the last step: "
                                            f"checkpoint saved, exiting")
                stopped_early = True
    finally:
        bar.close()
        metrics_file.close()
        ckpt.wait()
        ckpt.close()
    return TrainResult(loop.train_state, config.with_decisions(loop.decisions), parts, loop.evaluation,
                       loop.decisions, stopped_early)
