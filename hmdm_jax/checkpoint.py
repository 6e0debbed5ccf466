"""Checkpoints of a :class:`~hmdm_jax.state.TrainState`, with Orbax, and clean stops on preemption.

Over 400 lines on purpose: the error paths (corruption, fallback, mismatched configs, multi-host) are
the point of the module, and each needs its own message.

A checkpoint directory holds one sub-directory per saved step (``<dir>/<step>/``), each with three
Orbax items:

* ``state``: every leaf of the ``TrainState`` pytree (step, params, ema_params, opt_state, log_pi,
  log_A, class_counts, transition_counts, key);
* ``config``: the run config given to :meth:`Checkpointer.open`, as JSON (``dataclasses.asdict``-style for a frozen dataclass, or any
  JSON-able mapping), so that a decoder can rebuild the model from the directory alone
  (:func:`read_config`);
* ``metadata``: a JSON dict given by the caller, e.g. ``{"state_to_label": [2, 0, 1]}`` (the
  state-to-label matching, which must travel with the checkpoint because of label switching).

Typical training loop::

    with Checkpointer.open(run_dir, save_every=1000) as ckpt, PreemptionGuard() as guard:
        state = create_train_state(...)              # also the restore template
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
        step = ckpt.latest_step() or 0               # the step count lives on the host
        while step < num_steps:
            state, step = train_step(state, batch), step + 1
            ckpt.save(state, step=step, metadata=meta)  # only every `save_every` steps; asynchronous
            if guard.should_stop:                    # SIGTERM (preemptible VM) or Ctrl-C
                break
        ckpt.save(state, step=step, metadata=meta, force=True)  # the last completed step
    # leaving the `with` waits for the pending write: the process can exit with code 0

Crash safety: Orbax writes each step into ``<dir>/<step>.orbax-checkpoint-tmp`` and renames it to
``<dir>/<step>`` only once every file is written (an atomic rename on local and POSIX file
systems). A process killed mid-save leaves only the temporary directory, which
:meth:`Checkpointer.latest_step`, :meth:`Checkpointer.all_steps` and :meth:`Checkpointer.restore`
never see; the previous step stays restorable, and the next writer (``open`` without
``read_only``) deletes the leftover.

Asynchrony: :meth:`Checkpointer.save` schedules the device-to-host copy of every array and
returns; the files are written by a background thread, so training does not wait on the disk (a
new save first waits for the previous one). JAX arrays are immutable, so the loop may go on
computing new states at once; donating the saved state's own buffers to the next step has not been
tested here. :meth:`Checkpointer.wait` (or ``close``, or leaving the ``with`` block) blocks until
pending writes are committed.

Multi-host: Orbax coordinates saving and restoring across JAX processes (barriers, one process
writing the shared files, each process writing its own shards). Every process must call
:meth:`Checkpointer.save`, :meth:`Checkpointer.restore` and :meth:`Checkpointer.wait` with the same
step, in the same order; nothing here adds its own coordination. A signal reaches each host at a
different step, so a multi-process loop must not stop on :attr:`PreemptionGuard.should_stop` alone
(hosts would disagree on the last step and deadlock in the save barrier): use
:meth:`Checkpointer.reached_preemption`, which is JAX's preemption sync point (enabled by
``jax.distributed.initialize``) and is True on every process at the same step. Only one job may
write to a directory (Orbax's contract); readers such as a decoder should open it ``read_only``.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from hmdm_jax.state import TrainState

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "Checkpointer",
    "PreemptionGuard",
    "config_to_json",
    "read_config",
]

_log = logging.getLogger(__name__)

_STATE, _CONFIG, _METADATA = "state", "config", "metadata"
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step still being written


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, corrupted, or written by an incompatible config."""


class _CorruptStep(CheckpointError):
    """One saved step cannot be read (the others may): ``restore`` of the latest step falls back."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory, or the requested step in it, does not exist."""


# --------------------------------------------------------------------------------------- config JSON


def config_to_json(config: Any) -> dict:
    """The run config as a JSON-able dict (what is saved in each checkpoint's ``config`` item).

    Args:
      config: a (possibly nested) dataclass, a mapping with string keys, or None (-> ``{}``).
        Tuples become lists, enums their values, numpy scalars Python numbers, paths strings.

    Raises:
      CheckpointError: naming the field whose value cannot be written as JSON.
    """
    if config is None:
        return {}
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)) and not isinstance(
        config, Mapping
    ):
        raise CheckpointError(
            f"the run config must be a dataclass or a mapping to be saved as JSON, got "
            f"{type(config).__name__}"
        )
    return _to_json(config, "config")


def _to_json(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{where}: JSON keys must be strings, got {k!r}")
            out[k] = _to_json(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, enum.Enum):
        return _to_json(value.value, where)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            raise CheckpointError(f"{where}: {value} cannot be written as JSON")
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) <= 1 and np.size(value) <= 64:
        return _to_json(np.asarray(value).tolist(), where)
    raise CheckpointError(
        f"{where}: a value of type {type(value).__name__} cannot be saved in the JSON config"
    )


def _flatten_json(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten_json(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _config_differences(saved: Any, current: Any) -> list[str]:
    """``["key (checkpoint: a, current: b)", ...]`` for the dotted config keys that differ."""
    a, b = _flatten_json(saved), _flatten_json(current)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            sa = "absent" if va is missing else _short(va)
            sb = "absent" if vb is missing else _short(vb)
            diffs.append(f"{key} (checkpoint: {sa}, current: {sb})")
    return diffs


def _short(v: Any, n: int = 60) -> str:
    s = json.dumps(v)
    return s if len(s) <= n else s[: n - 3] + "..."


# ------------------------------------------------------------------------------------ tree checking


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey / FlattenedIndexKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{"params.Dense_0.kernel": (shape, dtype), ...}``, the dotted paths Orbax uses on disk.

    Orbax stores dataclass fields and NamedTuple fields by name and tuples by index, so
    ``opt_state[0].mu['w']`` is ``opt_state.0.mu.w`` on both sides.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        dtype = getattr(leaf, "dtype", None)
        dtype = np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype
        out[".".join(_key_name(k) for k in path)] = (shape, dtype)
    return out


def _tree_mismatches(saved: Mapping, expected: Mapping) -> list[str]:
    """Human-readable differences between the saved and the expected leaf specs, in path order."""
    problems = []
    for path in sorted(set(saved) | set(expected)):
        if path not in expected:
            problems.append(f"{path}: in the checkpoint, but the current config has no such leaf")
        elif path not in saved:
            problems.append(f"{path}: expected by the current config, but not in the checkpoint")
        else:
            (s_shape, s_dtype), (e_shape, e_dtype) = saved[path], expected[path]
            if s_shape != e_shape:
                problems.append(f"{path}: checkpoint has shape {s_shape}, the current config "
                                f"expects {e_shape}")
            elif s_dtype != e_dtype:
                problems.append(f"{path}: checkpoint has dtype {s_dtype}, the current config "
                                f"expects {e_dtype}")
    # `step`, `log_pi`, ... before the params: the first line names the most telling mismatch.
    order = {f.name: i for i, f in enumerate(dataclasses.fields(TrainState))}
    return sorted(problems, key=lambda p: order.get(p.split(".")[0].split(":")[0], len(order)))


def _error_summary(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


# ---------------------------------------------------------------------------------------- manager


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.StandardSave)
    registry.add(_STATE, ocp.args.StandardRestore)
    for item in (_CONFIG, _METADATA):
        registry.add(item, ocp.args.JsonSave)
        registry.add(item, ocp.args.JsonRestore)
    return registry


class Checkpointer:
    """Saves and restores :class:`TrainState` checkpoints in one directory (an Orbax manager).

    Create with :meth:`open`; use as a context manager or call :meth:`close`. Not thread-safe
    (call it from the training loop's thread); multi-process-safe as described in the module
    docstring.
    """

    def __init__(self, manager: ocp.CheckpointManager, directory: Path, save_every: int,
                 read_only: bool, config: Any = None):
        self._config = config
        self._manager = manager
        self._directory = directory
        self._save_every = save_every
        self._read_only = read_only

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_every: int = 1,
        create: bool = True,
        read_only: bool = False,
        config: Any = None,
    ) -> "Checkpointer":
        """Opens (and by default creates) a checkpoint directory.

        Args:
          directory: the run's checkpoint directory; step ``s`` is written to ``directory/s``.
          max_to_keep: keep the newest this many steps, delete older ones (None: keep all).
          save_every: :meth:`save` writes only when ``state.step % save_every == 0`` unless forced.
          create: create ``directory`` if missing; if False a missing directory is an error.
          config: the run's config (a dataclass or mapping): saved as JSON with every step, and compared
            with the saved one on restore (differences are named). None: saves ``{}``, no comparison.
          read_only: for readers (decoding, evaluation) while a trainer may still be writing:
            never saves, deletes or creates anything, and leaves the trainer's in-progress
            temporary directories alone. A writer (the default) deletes leftover temporary
            directories of saves that were killed.

        Raises:
          CheckpointNotFoundError: ``directory`` does not exist and ``create`` is False or
            ``read_only`` is True.
          CheckpointError: ``directory`` is a file, or bad ``save_every`` / ``max_to_keep``.
        """
        directory = Path(directory).expanduser().absolute()
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise CheckpointError(f"save_every must be a positive int, got {save_every!r}")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise CheckpointError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"checkpoint path {directory} exists but is not a directory")
        if not directory.exists():
            if read_only or not create:
                raise CheckpointNotFoundError(f"checkpoint directory {directory} does not exist")
            directory.mkdir(parents=True, exist_ok=True)
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0,
                enable_async_checkpointing=False,
            )
        else:
            options = ocp.CheckpointManagerOptions(
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=True,
                # Save on multiples of save_every, and at JAX's multi-host preemption sync point.
                # (Orbax's default also saves whenever the directory is empty; we don't.)
                save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
                    ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
                    ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]),
                preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
            )
        manager = ocp.CheckpointManager(directory, options=options,
                                        handler_registry=_handler_registry())
        config_to_json(config)  # a config that cannot be saved fails here, not at the first save
        return cls(manager, directory, save_every, read_only, config)

    # ---------------------------------------------------------------------------- properties

    @property
    def directory(self) -> Path:
        """The checkpoint directory (absolute)."""
        return self._directory

    @property
    def save_every(self) -> int:
        return self._save_every

    def all_steps(self) -> list[int]:
        """Committed steps, ascending (temporary directories of unfinished saves excluded)."""
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        """JAX's multi-host preemption sync point: True on every process at the same ``step``.

        Needs ``jax.distributed.initialize`` (whose preemption service catches the SIGTERM); always
        False in a single process, where :class:`PreemptionGuard` is the way to stop.
        """
        return bool(self._manager.reached_preemption(step))

    # ---------------------------------------------------------------------------------- save

    def save(self, state: TrainState, *, step: int, metadata: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Starts an asynchronous save of ``state`` at ``step``, the caller's host-side count of its steps
        (reading ``state.step`` would wait for the device on every call, saving or not).

        Writes all leaves of ``state``, the checkpointer's config as JSON and ``metadata``. Without ``force``,
        saves only when ``state.step`` is a multiple of ``save_every`` and newer than the latest
        saved step. A step that is already saved is never rewritten (returns False), so a final
        ``save(state, force=True)`` after the loop is always safe. Returns after the
        device-to-host copy; call :meth:`wait` before relying on the files.

        Args:
          state: the training state.
          step: ``state.step`` as the caller counts it.
          metadata: JSON-able dict saved beside the state, e.g. ``{"state_to_label": [2, 0, 1]}``.
          force: save regardless of ``save_every``.

        Returns:
          True when a save was started.

        Raises:
          CheckpointError: read-only checkpointer, non-JSON-able config or metadata, or an
            error of an earlier asynchronous save.
        """
        if self._read_only:
            raise CheckpointError(f"{self._directory} was opened read_only; cannot save")
        if not isinstance(state, TrainState):
            raise CheckpointError(f"save expects a TrainState, got {type(state).__name__}")
        step = int(step)
        if step < 0:
            raise CheckpointError(f"cannot save a negative step ({step})")
        if step in self._manager.all_steps():
            return False
        if not force and not self._manager.should_save(step):
            return False
        config_json = config_to_json(self._config)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise CheckpointError(f"metadata must be a dict, got {type(metadata).__name__}")
        metadata_json = _to_json(dict(metadata or {}), "metadata")
        return bool(self._manager.save(
            step,
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardSave(state),
                _CONFIG: ocp.args.JsonSave(config_json),
                _METADATA: ocp.args.JsonSave(metadata_json),
            }),
            force=True,  # the decision was taken above
        ))

    def wait(self) -> None:
        """Blocks until every pending save is committed (renamed into place)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------------------- restore

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(
                f"no checkpoint in {self._directory} (the directory holds no committed step)")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self._directory}; saved steps: {steps}")
        return int(step)

    def _read_json(self, step: int, item: str) -> Any:
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
            value = restored[item]
        except Exception as e:  # noqa: BLE001 — any failure here means an unusable checkpoint
            raise CheckpointError(
                f"checkpoint {self._directory / str(step)} is unreadable: its {item!r} item "
                f"cannot be read ({_error_summary(e)})") from None
        if value is None:
            raise CheckpointError(
                f"checkpoint {self._directory / str(step)} is unreadable: its {item!r} item is "
                f"missing")
        return value

    def read_config(self, step: int | None = None) -> dict:
        """The run config saved with ``step`` (default: the latest), as a JSON dict."""
        return self._read_json(self._check_step(step), _CONFIG)

    def restore(self, template_state: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict]:
        """Restores a checkpoint into the structure of ``template_state``.

        Without ``step``, the latest step that restores cleanly: a corrupted latest step (a torn disk,
        a damaged file) is logged as a warning naming it, and the newest earlier good step is used.

        Shapes, dtypes and leaf paths of the checkpoint are compared with the template before any
        array is read, so a checkpoint of another config fails with a message naming the first
        mismatching leaf (and the config keys that differ) rather than a deep Orbax error.

        Args:
          template_state: a TrainState built from the current config (e.g. by
            ``create_train_state``); gives the tree structure, shapes, dtypes and shardings.
            Arrays or ``jax.ShapeDtypeStruct`` leaves.
          step: the step to restore (a corrupted one is an error); default the latest good step.

        Returns:
          ``(state, metadata)``: the restored TrainState and the metadata dict saved with it (``{}`` if
          none was given).

        Raises:
          CheckpointNotFoundError: no committed checkpoint in the directory, or no such step.
          CheckpointError: the checkpoint (``step``, or every step) is unreadable or corrupted, or its
            shapes differ from the template's.
        """
        if not isinstance(template_state, TrainState):
            raise CheckpointError(
                f"restore expects a TrainState template, got {type(template_state).__name__}")
        if step is not None:
            return self._restore_step(template_state, self._check_step(step))
        self._check_step(None)
        corrupt = []
        for candidate in reversed(self.all_steps()):
            try:
                result = self._restore_step(template_state, candidate)
            except _CorruptStep as e:
                corrupt.append(candidate)
                _log.warning("%s; trying the previous step", e)
                continue
            if corrupt:
                _log.warning("restored step %d of %s instead of the corrupted step(s) %s", candidate,
                             self._directory, corrupt)
            return result
        raise CheckpointError(f"every saved step of {self._directory} is corrupted: {corrupt}")

    def _restore_step(self, template_state: TrainState, step: int) -> tuple[TrainState, dict]:
        where = self._directory / str(step)

        try:
            saved_config = self._read_json(step, _CONFIG)
        except CheckpointError as e:
            raise _CorruptStep(str(e)) from None
        config_diffs = ([] if self._config is None
                        else _config_differences(saved_config, config_to_json(self._config)))

        try:
            tree_metadata = self._manager.item_metadata(step)[_STATE]
            if tree_metadata is None:
                raise ValueError("no metadata for the 'state' item")
            saved_specs = _leaf_specs(tree_metadata)
        except Exception as e:  # noqa: BLE001
            raise _CorruptStep(
                f"checkpoint {where} is unreadable: the state's metadata cannot be read "
                f"({_error_summary(e)})") from None
        problems = _tree_mismatches(saved_specs, _leaf_specs(template_state))
        if problems:
            msg = (f"checkpoint {where} does not fit the current config: {problems[0]}")
            if len(problems) > 1:
                msg += f" (and {len(problems) - 1} more: " + "; ".join(problems[1:4])
                msg += "; ..." if len(problems) > 4 else ""
                msg += ")"
            if config_diffs:
                msg += ". Config keys that differ from the checkpoint's: " + ", ".join(config_diffs)
            raise CheckpointError(msg)
        if config_diffs:
            _log.warning("restoring %s with a config that differs from the saved one: %s",
                         where, ", ".join(config_diffs))

        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(template_state),
                _METADATA: ocp.args.JsonRestore(),
            }))
            state, metadata = restored[_STATE], restored[_METADATA]
            restored_step = int(jax.device_get(state.step))
        except Exception as e:  # noqa: BLE001
            raise _CorruptStep(
                f"checkpoint {where} is unreadable or corrupted ({_error_summary(e)}); "
                f"other saved steps: {[s for s in self.all_steps() if s != step]}") from None
        if restored_step != step:
            raise _CorruptStep(
                f"checkpoint {where} is corrupted: it holds step {restored_step}")
        if not isinstance(metadata, dict):
            raise _CorruptStep(f"checkpoint {where} is corrupted: its metadata is not a dict")
        return state, metadata


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest committed step in ``directory``; None when it is missing or holds no committed step
    (e.g. a run killed before its first save finished). Read-only, safe beside a running trainer."""
    if not Path(directory).is_dir():
        return None
    with Checkpointer.open(directory, read_only=True) as ckpt:
        return ckpt.latest_step()


def read_config(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The run config saved in ``directory`` at ``step`` (default: latest), without a template.

    Opens the directory read-only, so it is safe while a trainer is still writing to it.

    Raises:
      CheckpointNotFoundError: the directory does not exist or holds no checkpoint.
      CheckpointError: the config item is unreadable.
    """
    with Checkpointer.open(directory, read_only=True) as ckpt:
        return ckpt.read_config(step)


# ------------------------------------------------------------------------------------ preemption


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into a flag that the training loop polls between steps.

    Preemptible TPU/GPU VMs send SIGTERM some seconds before the kill; Ctrl-C sends SIGINT. The
    handler only records the signal; the loop checks :attr:`should_stop` after each step, then
    saves with ``force=True``, waits and exits normally. A second SIGINT raises
    ``KeyboardInterrupt`` at once, for a user who does not want to wait for the final save.
    The previous handlers come back on exit. Must be entered in the main thread (Python delivers
    signals there only). Single-process; for multi-process runs see
    :meth:`Checkpointer.reached_preemption`.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._received: int | None = None

    @property
    def should_stop(self) -> bool:
        """True once one of the signals was received."""
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received (``"SIGTERM"``), or None."""
        return None if self._received is None else signal.Signals(self._received).name

    def _handle(self, signum: int, frame: Any) -> None:
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self._received is None:
            self._received = signum

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread "
                               "(Python runs signal handlers only there)")
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
