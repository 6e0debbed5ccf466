"""Tests of hmdm_jax.checkpoint: round trips, exact resume, clear errors, crash safety, signals.

The subprocess tests run tests/checkpoint_worker.py with the same interpreter and kill it with real
signals (SIGKILL mid-save, SIGTERM and SIGINT mid-run), with bounded timeouts.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmdm_jax.checkpoint import (
    TMP_DIR_SUFFIX,
    CheckpointError,
    CheckpointNotFoundError,
    Checkpointer,
    PreemptionGuard,
    config_to_json,
    latest_step,
    read_config,
)
from tests.checkpoint_worker import MATCHING, ToyConfig, ToyNet, toy_state, toy_train_step

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "checkpoint_worker.py"
CPU = jax.devices("cpu")[0]


def run_steps(state, n):
    for _ in range(n):
        state = toy_train_step(state)
    return state


def assert_states_identical(a, b):
    """Same tree structure and every leaf bit-for-bit equal (same dtype)."""
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A directory with steps 2 and 4 of the toy run (save_every=2), and the state at step 4."""
    directory = tmp_path_factory.mktemp("saved_run") / "ckpt"
    state = toy_state()
    with Checkpointer.open(directory, save_every=2, config=ToyConfig()) as ckpt:
        for _ in range(4):
            state = toy_train_step(state)
            ckpt.save(state, step=int(state.step), metadata={"state_to_label": MATCHING})
    return directory, state


def copy_of(saved_run, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(saved_run[0], directory)
    return directory


# ------------------------------------------------------------------------------- save / restore


def test_round_trip_save_every_and_metadata(tmp_path):
    state = toy_state()
    saved = {}
    with Checkpointer.open(tmp_path / "run", save_every=3, max_to_keep=2, config=ToyConfig()) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        for _ in range(7):
            state = toy_train_step(state)
            did = ckpt.save(state, step=int(state.step), metadata={"state_to_label": MATCHING, "note": "x"})
            saved[int(state.step)] = did
            if did:
                ckpt.wait()
        assert [s for s, did in saved.items() if did] == [3, 6]
        assert ckpt.save(state, step=int(state.step), force=True)               # step 7, not a multiple of 3
        assert not ckpt.save(state, step=int(state.step), force=True)           # already saved: never rewritten
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]                 # max_to_keep=2 dropped step 3
        assert ckpt.latest_step() == 7

    template = toy_state()
    ckpt = Checkpointer.open(tmp_path / "run", create=False)
    restored, meta = ckpt.restore(template)
    assert_states_identical(restored, state)
    assert restored.key.dtype == jnp.uint32 and restored.step.dtype == jnp.int32
    assert meta == {}                                     # the forced save had no metadata
    at6, meta6 = ckpt.restore(template, step=6)
    assert int(at6.step) == 6 and meta6 == {"state_to_label": MATCHING, "note": "x"}
    assert not np.array_equal(np.asarray(at6.params["w"]), np.asarray(state.params["w"]))
    ckpt.close()

    assert read_config(tmp_path / "run") == {
        "num_classes": 3, "net": {"width": 5}, "learning_rate": 0.05, "ema_decay": 0.9}


def test_exact_resume_in_process(tmp_path):
    """Stopping after step 6 and resuming from the checkpoint reproduces 10 straight steps exactly."""
    straight = run_steps(toy_state(), 10)
    with Checkpointer.open(tmp_path / "run", save_every=1000) as ckpt:
        first = run_steps(toy_state(), 6)
        assert ckpt.save(first, step=int(first.step), force=True)
    with Checkpointer.open(tmp_path / "run") as ckpt:
        resumed, _ = ckpt.restore(toy_state(seed=123))  # template values must not matter
    assert int(resumed.step) == 6
    assert_states_identical(run_steps(resumed, 4), straight)


def test_config_to_json():
    assert config_to_json(None) == {}
    assert config_to_json({"a": (1, 2), "b": np.float32(0.5)}) == {"a": [1, 2], "b": 0.5}

    @dataclasses.dataclass(frozen=True)
    class Bad:
        net: ToyNet = ToyNet()
        fn: object = print

    with pytest.raises(CheckpointError, match=r"config\.fn"):
        config_to_json(Bad())
    with pytest.raises(CheckpointError, match="dataclass or a mapping"):
        config_to_json(42)


# ---------------------------------------------------------------------------------- clear errors


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        Checkpointer.open(missing, create=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_config(missing)
    assert latest_step(missing) is None
    assert not missing.exists()


def test_empty_directory_and_unknown_step(tmp_path, saved_run):
    (tmp_path / "empty").mkdir()
    with Checkpointer.open(tmp_path / "empty") as ckpt:
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
            ckpt.restore(toy_state())
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
        read_config(tmp_path / "empty")
    # a run killed during its first save leaves only a temporary directory: still no committed step
    (tmp_path / "empty" / ("1" + TMP_DIR_SUFFIX)).mkdir()
    assert latest_step(tmp_path / "empty") is None
    assert latest_step(saved_run[0]) == 4
    with Checkpointer.open(saved_run[0], read_only=True) as ckpt:
        with pytest.raises(CheckpointNotFoundError, match=r"step 3 .*saved steps: \[2, 4\]"):
            ckpt.restore(toy_state(), step=3)
        with pytest.raises(CheckpointError, match="read_only"):
            ckpt.save(saved_run[1], step=int(saved_run[1].step), force=True)


def _garbage(path):
    Path(path).write_bytes(b"\x00not a checkpoint\xff" * 4)


def _truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


# Tensorstore callbacks of the failed read may report a closed event loop afterwards; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [
    "metadata_file_garbage", "array_data_truncated", "manifest_garbage", "config_json_garbage",
    "label_metadata_garbage", "state_item_removed",
])
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_good_step(tmp_path, saved_run, damage, caplog):
    """The latest step damaged: restoring it by number is a clear error naming it; restoring the latest
    (no step) warns and returns the newest good step; with every step damaged, a clear error."""
    directory = copy_of(saved_run, tmp_path)
    step_dir = directory / "4"
    if damage == "metadata_file_garbage":
        _garbage(step_dir / "state" / "_METADATA")
    elif damage == "array_data_truncated":
        files = glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)
        assert files
        for f in files:
            _truncate(f)
    elif damage == "manifest_garbage":
        for f in glob.glob(str(step_dir / "state" / "**" / "manifest.ocdbt"), recursive=True):
            _garbage(f)
    elif damage == "config_json_garbage":
        _garbage(step_dir / "config" / "metadata")
    elif damage == "label_metadata_garbage":
        _garbage(step_dir / "metadata" / "metadata")
    elif damage == "state_item_removed":
        shutil.rmtree(step_dir / "state")
    with Checkpointer.open(directory, create=False) as ckpt:
        with pytest.raises(CheckpointError, match=r"/4 is unreadable"):
            ckpt.restore(toy_state(), step=4)
        with caplog.at_level("WARNING", logger="hmdm_jax.checkpoint"):
            state2, meta2 = ckpt.restore(toy_state())
    assert int(state2.step) == 2 and meta2 == {"state_to_label": MATCHING}
    assert "/4 is unreadable" in caplog.text and "restored step 2" in caplog.text
    shutil.rmtree(directory / "2" / "state")
    with Checkpointer.open(directory, create=False) as ckpt:
        with pytest.raises(CheckpointError, match=r"every saved step .* is corrupted: \[4, 2\]"):
            ckpt.restore(toy_state())


def test_mismatched_num_classes_names_field_and_config_key(saved_run):
    with Checkpointer.open(saved_run[0], read_only=True, config=ToyConfig(num_classes=4)) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(toy_state(ToyConfig(num_classes=4)))
    msg = str(info.value)
    assert "does not fit the current config: log_pi: checkpoint has shape (3,), the current " \
           "config expects (4,)" in msg
    assert "num_classes (checkpoint: 3, current: 4)" in msg
    assert "net.width" not in msg


def test_mismatched_width_names_parameter_path(saved_run):
    with Checkpointer.open(saved_run[0], read_only=True, config=ToyConfig(net=ToyNet(width=6))) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(toy_state(ToyConfig(net=ToyNet(width=6))))
    msg = str(info.value)
    assert "params.b: checkpoint has shape (2, 5), the current config expects (2, 6)" in msg
    assert "net.width (checkpoint: 5, current: 6)" in msg
    assert "num_classes" not in msg


def test_mismatched_structure_and_dtype(saved_run):
    with Checkpointer.open(saved_run[0], read_only=True) as ckpt:
        extra = toy_state(big=3)  # a parameter the checkpoint does not have (a deeper network)
        with pytest.raises(CheckpointError, match=r"params\.big: expected by the current config, "
                                                  r"but not in the checkpoint"):
            ckpt.restore(extra)
        fewer = toy_state()
        fewer = fewer.replace(params={"w": fewer.params["w"]})
        with pytest.raises(CheckpointError, match=r"params\.b: in the checkpoint, but the current "
                                                  r"config has no such leaf"):
            ckpt.restore(fewer)
        half = toy_state()
        half = half.replace(log_pi=half.log_pi.astype(jnp.float16))
        with pytest.raises(CheckpointError, match=r"log_pi: checkpoint has dtype float32, the "
                                                  r"current config expects float16"):
            ckpt.restore(half)


# ------------------------------------------------------------------------------- signal handling


def test_preemption_guard_in_process():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert not guard.should_stop and guard.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not guard.should_stop and time.monotonic() < deadline:
            time.sleep(0.001)
        assert guard.should_stop and guard.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the save
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert signal.getsignal(signal.SIGINT) is before_int


def test_preemption_guard_needs_main_thread():
    errors = []

    def enter():
        try:
            with PreemptionGuard():
                pass
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=enter)
    t.start()
    t.join(5)
    assert len(errors) == 1 and "main thread" in str(errors[0])


# --------------------------------------------------------------------------------- subprocesses


class Worker:
    """A checkpoint_worker.py subprocess whose stdout lines are read by a thread (no blocking)."""

    def __init__(self, tmp_path, *args):
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
        self.stderr_path = tmp_path / f"worker_{time.monotonic_ns()}.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), *map(str, args)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._queue.put(line.strip())
        self._queue.put(None)

    def wait_for(self, predicate, timeout=60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                raise AssertionError(f"worker output ended or timed out; lines {self.lines[-5:]}; "
                                     f"stderr: {self.stderr_path.read_text()[-2000:]}")
            self.lines.append(line)
            if predicate(line):
                return line

    def finish(self, timeout=30.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        deadline = time.monotonic() + 5
        while True:  # drain the remaining lines
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        self._stderr.close()
        return rc

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    """SIGKILL while step 2 is being written: step 1 stays restorable, the partial step is ignored."""
    size = 2_000_000  # 8 MB per array, 4 arrays: the write takes a fraction of a second
    directory = tmp_path / "crash"
    for attempt in range(3):
        shutil.rmtree(directory, ignore_errors=True)
        worker = Worker(tmp_path, "crash", directory, size)
        worker.wait_for(lambda line: line == "IN_FLIGHT")  # printed as soon as save() returned
        worker.kill()
        entries = sorted(os.listdir(directory))
        if entries == ["1", "2" + TMP_DIR_SUFFIX]:
            break  # the kill landed mid-save
        assert entries == ["1", "2"], entries  # the save finished first: try again
    else:
        pytest.fail("the kill never landed while step 2 was being written")

    template = toy_state(big=size)
    with Checkpointer.open(directory, read_only=True) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        restored, meta = ckpt.restore(template)
    assert (directory / ("2" + TMP_DIR_SUFFIX)).exists()  # a reader deletes nothing
    assert int(restored.step) == 1 and meta == {}
    assert_states_identical(restored, template.replace(step=jnp.ones((), jnp.int32)))

    # A new writer removes the partial directory (in the background, before its first save) and
    # can save step 2 again.
    with Checkpointer.open(directory) as ckpt:
        assert ckpt.save(template.replace(step=jnp.full((), 2, jnp.int32)), step=2)
    assert sorted(os.listdir(directory)) == ["1", "2"]


def _step_of(line):
    return int(line.split()[1])


def test_sigterm_then_resume_and_sigint_exact(tmp_path):
    """SIGTERM mid-run: exit 0 after a final save of the last completed step; a resumed run
    continues from it, is stopped by SIGINT, and its state equals an uninterrupted run's."""
    directory = tmp_path / "run"
    save_every = 5

    first = Worker(tmp_path, "train", directory, 10_000, save_every, 0.05)
    first.wait_for(lambda line: line.startswith("STEP") and _step_of(line) >= 6)
    os.kill(first.proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    assert first.finish(timeout=30) == 0, first.stderr_path.read_text()[-2000:]
    assert time.monotonic() - sent < 20
    steps = [_step_of(line) for line in first.lines if line.startswith("STEP")]
    assert first.lines[-1] == f"STOPPED {steps[-1]} SIGTERM"
    stopped_at = steps[-1]
    with Checkpointer.open(directory, read_only=True) as ckpt:
        assert ckpt.latest_step() == stopped_at
        assert ckpt.all_steps()[:-1] == [s for s in range(5, stopped_at, 5)][-2:]
        assert ckpt.read_config()["net"] == {"width": 5}

    second = Worker(tmp_path, "train", directory, 10_000, save_every, 0.05)
    assert second.wait_for(lambda line: line.startswith("START")) == f"START {stopped_at}"
    second.wait_for(lambda line: line.startswith("STEP") and _step_of(line) >= stopped_at + 3)
    os.kill(second.proc.pid, signal.SIGINT)
    assert second.finish(timeout=30) == 0, second.stderr_path.read_text()[-2000:]
    steps2 = [_step_of(line) for line in second.lines if line.startswith("STEP")]
    assert steps2[0] == stopped_at + 1
    assert second.lines[-1] == f"STOPPED {steps2[-1]} SIGINT"

    with jax.default_device(CPU):
        straight = run_steps(toy_state(), steps2[-1])
        with Checkpointer.open(directory, read_only=True) as ckpt:
            assert ckpt.latest_step() == steps2[-1]
            resumed, meta = ckpt.restore(toy_state())
    assert meta == {"state_to_label": MATCHING}
    assert_states_identical(resumed, straight)
