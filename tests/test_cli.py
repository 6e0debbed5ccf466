"""The training and decoding scripts as a new user meets them: every bad input is one line
``error: ...`` on stderr with exit code 2 (no traceback), and nothing half-made is left behind.

Most cases call a script's entry point in-process (``cli``): ``common.main_of(main)(argv)`` is exactly what
``python experiments/NAME.py ARGS`` runs, so the exit code and stderr are the script's own, and an exception
that would print a traceback fails the test; the interpreter start (the imports) is paid once.
Each script also gets a real subprocess run (``script``) for a bad flag, and so does everything that
happens at interpreter exit (the damaged-checkpoint fallback, once known to end in "Event loop is closed").
"""
import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import common  # noqa: E402

TINY = ["--steps", "2", "--no-progress", "--no-figures", "--num-sequences", "6", "--heldout-sequences", "3",
        "--length", "5", "--set", "loop.batch_size=2", "warm_start.steps=0", "band.choose=false", "evaluation.every=0",
        "evaluation.final_num_t=1", "network.mlp_width=16", "network.mlp_depth=1", "diffusion.timesteps=20",
        "loop.log_every=1"]


def script(name, *args):
    """``python experiments/NAME.py ARGS`` in a subprocess (tests/conftest.py's compilation cache is inherited)."""
    return subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture
def cli(capsys):
    """``cli(NAME, *ARGS)``: the script's entry point in-process, as a CompletedProcess (code, stdout, stderr)."""
    def run(name, *args):
        argv = list(map(str, args))
        capsys.readouterr()
        try:
            common.main_of(importlib.import_module(name).main)(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        out = capsys.readouterr()
        return subprocess.CompletedProcess([name, *argv], code, out.out, out.err)
    return run


def assert_input_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") or "error:" in last, last
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr[-1000:])


@pytest.mark.parametrize("name, flags, message", [
    ("hmdm", ["--num-classes", "0"], "--num-classes: must be >= 1, got 0"),
    ("mixture", ["--steps", "0"], "--steps: must be >= 1, got 0"),
    ("decode", ["--input", "in.npz", "--output", "out.npz", "--num-t", "0"], "--num-t: must be >= 1, got 0"),
    ("evaluate", ["--seed", "-1"], "--seed: must be >= 0, got -1"),
])
def test_each_script_run_as_a_program_reports_a_bad_flag_in_one_line(tmp_path, name, flags, message):
    proc = script(name, "--workdir", tmp_path / "run", *flags)
    assert proc.returncode == 2 and f"{name}.py: error: argument {message}" in proc.stderr, proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--num-classes", "0"], "--num-classes: must be >= 1, got 0"),
    (["--num-classes", "-3"], "--num-classes: must be >= 1, got -3"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--seed", "-1"], "--seed: must be >= 0, got -1"),
    (["--observed-labels", "2"], "error: --observed-labels must be in [0, 1], got 2.0"),
    (["--classes", "0,11"], "has classes 0..9; no class 11"),
    (["--classes", "0,x"], "comma-separated integers"),
    (["--classes", "3"], "at least two distinct classes"),
])
def test_zero_and_negative_flags_are_refused_not_replaced(cli, tmp_path, flags, message):
    proc = cli("hmdm", "--workdir", tmp_path / "run", *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("loop.batch_size=abc", "'loop.batch_size' expects int, got 'abc'"),
    ("loop.batch_size=0", "loop.batch_size must be >= 1, got 0"),
    ("loop.batch_size=-4", "loop.batch_size must be >= 1, got -4"),
    ("loop.batch_size=500", "loop.batch_size 500 exceeds the 6 training sequences"),
    ("em.temprature=1", "unknown config field 'em.temprature'"),
    ("reseed.trial_z=-1", "reseed.trial_z must be finite and >= 0, got -1.0"),
])
def test_bad_config_values_are_one_line_errors_and_leave_no_workdir(cli, tmp_path, override, message):
    proc = cli("hmdm", "--workdir", tmp_path / "run", *TINY, override)
    assert_input_error(proc, message)
    assert not (tmp_path / "run").exists()


def test_classes_selects_and_relabels_a_subset_of_the_source(cli, tmp_path):
    import json
    proc = cli("hmdm", "--workdir", tmp_path / "run", "--classes", "7,2,5", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["em"]["num_classes"] == 3
    assert dict(config["data"])["classes"] == "7,2,5"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["class_usage"]) == 3 and np.asarray(results["A_true"]).shape == (3, 3)


def test_evaluate_a_mixture_trained_with_every_label(cli, tmp_path):
    # the supervised reference of the paper's tables: no label is masked, so there is no masked-label accuracy
    workdir = tmp_path / "run"
    images = tmp_path / "images.npz"  # 60 digits: the script's decoding and baselines stay quick
    rng = np.random.default_rng(0)
    np.savez(images, images=rng.integers(0, 256, (60, 8, 8), np.uint8), labels=np.arange(60) % 3)
    trained = cli("mixture", "--workdir", workdir, "--data", f"npz:{images}", "--steps", "2",
                  "--observed-labels", "1", "--no-progress",
                  "--no-figures", "--set", "loop.batch_size=8", "warm_start.steps=0", "evaluation.final_num_t=2",
                     "network.mlp_width=16", "network.mlp_depth=1", "diffusion.timesteps=20", "band.choose=false")
    assert trained.returncode == 0, trained.stderr[-2000:]
    import json
    reported = json.loads((workdir / "results.json").read_text())  # mixture.py's own report: nothing masked either
    assert "masked_label_accuracy" not in reported and 0.0 <= reported["accuracy"] <= 1.0
    evaluated = cli("evaluate", "--workdir", workdir, "--no-nll", "--no-fid", "--no-figures", "--no-progress",
                    "--num-t", "2")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    accuracy = json.loads((workdir / "evaluation.json").read_text())["accuracy"]
    assert "masked_label_accuracy" not in accuracy and "every label was observed" in accuracy["note"]


def test_a_workdir_that_is_a_file(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_input_error(cli("hmdm", "--workdir", tmp_path / "file", *TINY), "is not a directory")
    assert_input_error(cli("mixture", "--workdir", tmp_path / "file" / "run", "--steps", "2"),
                       f"{tmp_path / 'file'} is a file, not a folder")


@pytest.mark.parametrize("name, flags, message", [
    ("decode", ["--num-t", "0"], "--num-t: must be >= 1, got 0"),
    ("evaluate", ["--accuracy-max-items", "0"], "--accuracy-max-items: must be >= 1, got 0"),
    ("evaluate", ["--seed", "-1"], "--seed: must be >= 0, got -1"),
])
def test_zero_and_negative_flags_of_decode_and_evaluate(cli, tmp_path, name, flags, message):
    extra = ["--input", tmp_path / "in.npz", "--output", tmp_path / "out.npz"] if name == "decode" else []
    proc = cli(name, "--workdir", tmp_path / "run", *extra, *flags)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]


def test_decode_output_that_is_a_folder(cli, tmp_path):
    proc = cli("decode", "--workdir", tmp_path / "run", "--input", tmp_path / "in.npz", "--output", tmp_path)
    assert_input_error(proc, "is a folder")


def test_bad_npz_inputs_of_the_training_scripts(cli, tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("these are my notes\n")
    assert_input_error(cli("hmdm", "--workdir", tmp_path / "a", "--data", f"npz:{text}", *TINY),
                       "is not an .npz file")
    assert_input_error(cli("hmdm", "--workdir", tmp_path / "b", "--data", f"npz:{tmp_path / 'missing.npz'}", *TINY),
                       "no such file")
    nan = tmp_path / "nan.npz"
    np.savez(nan, images=np.full((4, 5, 8, 8), np.nan, np.float32), lengths=np.full(4, 5))
    assert_input_error(cli("hmdm", "--workdir", tmp_path / "c", "--data", f"npz:{nan}", *TINY))
    seqs = tmp_path / "seqs.npz"
    np.savez(seqs, images=np.zeros((4, 5, 8, 8, 1), np.uint8), lengths=np.full(4, 5), labels=np.zeros((4, 5), np.int32))
    mix = cli("mixture", "--workdir", tmp_path / "d", "--data", f"npz:{seqs}", "--steps", "2", "--no-figures")
    assert_input_error(mix, "holds sequences", "experiments/hmdm.py")
    assert "channels" not in mix.stderr
    bare = tmp_path / "bare_seqs.npz"  # [N, n, H, W] without lengths or labels: not "8 channels"
    np.savez(bare, images=np.zeros((4, 5, 8, 8), np.uint8))
    mix = cli("mixture", "--workdir", tmp_path / "e", "--data", f"npz:{bare}", "--steps", "2", "--no-figures")
    assert_input_error(mix, "looks like a sequence file", "experiments/hmdm.py")


def checkpoints(workdir):
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def test_used_workdir_is_refused_and_overwrite_replaces_it(cli, tmp_path):
    workdir = tmp_path / "run"
    first = cli("hmdm", "--workdir", workdir, *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    assert checkpoints(workdir) == ["2"]
    again = cli("hmdm", "--workdir", workdir, *TINY, "loop.train_steps=3")
    assert_input_error(again, "already holds a run", "--resume", "--overwrite")
    assert checkpoints(workdir) == ["2"]  # the old run untouched
    replaced = cli("hmdm", "--workdir", workdir, "--overwrite", *TINY, "loop.train_steps=3")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert checkpoints(workdir) == ["3"]  # only the new run's checkpoint
    frames = tmp_path / "frames.npz"
    np.savez(frames, images=np.zeros((2, 5, 8, 8), np.uint8))
    decoded = cli("decode", "--workdir", workdir, "--input", frames, "--output", tmp_path / "decoded", "--num-t", "1",
                     "--no-progress")
    assert decoded.returncode == 0, decoded.stderr[-2000:]
    assert (tmp_path / "decoded").is_file() and not (tmp_path / "decoded.npz").exists()  # the path as given
    assert np.load(tmp_path / "decoded")["states"].shape == (2, 5)
    # guidance samples from the null class, which a run without label dropout never trained
    guided = cli("evaluate", "--workdir", workdir, "--guidance-weight", "2", "--no-nll", "--no-figures",
                    "--no-progress")
    assert_input_error(guided, "never trained", "em.labels.dropout")


def test_resume_says_its_step_and_checkpoint_errors_are_one_line(cli, tmp_path):
    workdir = tmp_path / "run"
    first = cli("hmdm", "--workdir", workdir, *TINY)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli("hmdm", "--workdir", workdir, "--resume", *TINY[2:], "loop.train_steps=3")
    assert resumed.returncode == 0 and "resuming from step 2 of 3" in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]
    assert checkpoints(workdir) == ["2", "3"]
    assert_input_error(cli("hmdm", "--workdir", tmp_path / "empty", "--resume", *TINY), "nothing to resume")
    other_k = cli("hmdm", "--workdir", workdir, "--resume", "--num-classes", "4", *TINY[2:], "loop.train_steps=4")
    assert_input_error(other_k, "does not fit the current config")
    assert checkpoints(workdir) == ["2", "3"]
    missing = cli("decode", "--workdir", workdir, "--input", tmp_path / "x.npz", "--output", tmp_path / "no" / "out.npz")
    assert_input_error(missing, "does not exist")  # the output folder, checked before anything is decoded
    # a damaged latest checkpoint: decode falls back to the previous good step, says so, and ends cleanly
    (workdir / "checkpoints" / "3" / "state" / "_METADATA").write_bytes(b"\x00not a checkpoint\xff" * 4)
    frames = tmp_path / "frames.npz"
    np.savez(frames, images=np.zeros((2, 5, 8, 8), np.uint8))
    fallback = script("decode", "--workdir", workdir, "--input", frames, "--output", tmp_path / "out.npz",
                      "--num-t", "1", "--no-progress")
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "restored step 2" in fallback.stderr + fallback.stdout, fallback.stderr[-2000:]
    assert "Traceback" not in fallback.stderr and "Event loop is closed" not in fallback.stderr, fallback.stderr[-3000:]
