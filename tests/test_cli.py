"""The training and decoding scripts as a new user meets them: every bad input is one line
``error: ...`` on stderr with exit code 2 (no traceback), and nothing half-made is left behind."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "2", "--no-progress", "--no-figures", "--num-sequences", "6", "--heldout-sequences", "3",
        "--length", "5", "--set", "loop.batch_size=2", "warm_start.steps=0", "evaluation.every=0",
        "evaluation.final_num_t=1", "network.mlp_width=16", "network.mlp_depth=1", "diffusion.timesteps=20",
        "loop.log_every=1"]


def script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def assert_input_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") or "error:" in last, last
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr[-1000:])


@pytest.mark.parametrize("flags, message", [
    (["--num-classes", "0"], "--num-classes: must be >= 1, got 0"),
    (["--num-classes", "-3"], "--num-classes: must be >= 1, got -3"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--seed", "-1"], "--seed: must be >= 0, got -1"),
])
def test_zero_and_negative_flags_are_refused_not_replaced(tmp_path, flags, message):
    proc = script("hmdm", "--workdir", tmp_path / "run", *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("loop.batch_size=abc", "'loop.batch_size' expects int, got 'abc'"),
    ("loop.batch_size=0", "loop.batch_size must be >= 1, got 0"),
    ("loop.batch_size=-4", "loop.batch_size must be >= 1, got -4"),
    ("loop.batch_size=500", "loop.batch_size 500 exceeds the 6 training sequences"),
    ("em.temprature=1", "unknown config field 'em.temprature'"),
])
def test_bad_config_values_are_one_line_errors_and_leave_no_workdir(tmp_path, override, message):
    proc = script("hmdm", "--workdir", tmp_path / "run", *TINY, override)
    assert_input_error(proc, message)
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_input_error(script("hmdm", "--workdir", tmp_path / "file", *TINY), "is not a directory")


def test_bad_npz_inputs_of_the_training_scripts(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("these are my notes\n")
    assert_input_error(script("hmdm", "--workdir", tmp_path / "a", "--data", f"npz:{text}", *TINY),
                       "is not an .npz file")
    assert_input_error(script("hmdm", "--workdir", tmp_path / "b", "--data", f"npz:{tmp_path / 'missing.npz'}", *TINY),
                       "no such file")
    nan = tmp_path / "nan.npz"
    np.savez(nan, images=np.full((4, 5, 8, 8), np.nan, np.float32), lengths=np.full(4, 5))
    assert_input_error(script("hmdm", "--workdir", tmp_path / "c", "--data", f"npz:{nan}", *TINY))
    seqs = tmp_path / "seqs.npz"
    np.savez(seqs, images=np.zeros((4, 5, 8, 8, 1), np.uint8), lengths=np.full(4, 5), labels=np.zeros((4, 5), np.int32))
    mix = script("mixture", "--workdir", tmp_path / "d", "--data", f"npz:{seqs}", "--steps", "2", "--no-figures")
    assert_input_error(mix, "holds sequences", "experiments/hmdm.py")
    assert "channels" not in mix.stderr


def test_used_workdir_resume_overwrite_and_checkpoint_errors(tmp_path):
    """One tiny run, then every way a user can misuse its workdir."""
    workdir = tmp_path / "run"
    first = script("hmdm", "--workdir", workdir, *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    again = script("hmdm", "--workdir", workdir, *TINY, "loop.train_steps=3")
    assert_input_error(again, "already holds a run", "--resume", "--overwrite")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]  # the old run untouched
    resumed = script("hmdm", "--workdir", workdir, "--resume", *TINY[2:], "loop.train_steps=3")
    assert resumed.returncode == 0 and "resuming from step 2 of 3" in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]
    assert_input_error(script("hmdm", "--workdir", tmp_path / "empty", "--resume", *TINY), "nothing to resume")
    other_k = script("hmdm", "--workdir", workdir, "--resume", "--num-classes", "4", *TINY[2:], "loop.train_steps=4")
    assert_input_error(other_k, "does not fit the current config")
    replaced = script("hmdm", "--workdir", workdir, "--overwrite", *TINY)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    missing = script("decode", "--workdir", workdir, "--input", tmp_path / "x.npz", "--output", tmp_path / "no" / "out.npz")
    assert_input_error(missing, "does not exist")
