"""experiments/generalisation.py: its settings, the user's .npz it writes, and a table that resumes from the
results already in its workdir (the runs themselves are experiments/hmdm.py, tested in test_experiments.py)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import generalisation  # noqa: E402
from hmdm_jax import data as hdata  # noqa: E402


def test_settings_are_the_flags_of_hmdm_py_and_unknown_ones_fail_first():
    assert generalisation.setting_flags("sticky0.9") == ["--transition", "sticky", "--stay", "0.9"]
    assert generalisation.setting_flags("npz-cyclic0.5") == ["--transition", "cyclic", "--stay", "0.5"]
    assert generalisation.setting_flags("dirichlet") == ["--transition", "dirichlet"]
    with pytest.raises(ValueError, match="unknown setting 'wobbly'"):
        generalisation.parse_args(["--workdir", "x", "--settings", "sticky0.9,wobbly"])


def test_written_npz_is_a_valid_sequence_file_with_the_cut_lengths(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (5, 20)).astype(np.int32)
    seqs = hdata.SequenceDataset(rng.uniform(-1, 1, (5, 20, 8, 8, 1)).astype(np.float32), np.ones((5, 20), bool),
                                 labels, 3)
    generalisation.write_npz(tmp_path / "s.npz", seqs, rng)
    back = hdata.load_sequences_npz(tmp_path / "s.npz")
    lengths = back.mask.sum(1)
    assert back.num_classes == 3 and np.all((12 <= lengths) & (lengths <= 20))
    np.testing.assert_array_equal(back.labels[back.mask], labels[back.mask])
    np.testing.assert_allclose(back.images[back.mask], seqs.images[back.mask], atol=1 / 127.5)


def test_the_table_is_read_from_finished_runs_without_training(tmp_path):
    done = {"heldout_accuracy": 0.98, "A_mae": 0.01, "heldout_framewise_accuracy": 0.9, "train_seconds": 60,
            "eval_seconds": 30, "baselines": {"gaussian_hmm": {"accuracy": 0.9}, "gmm": {"accuracy": 0.8},
                                              "kmeans": {"accuracy": 0.7}}}
    restarted = {**done, "decisions": {"restarts": {"chosen": 2, "warm_start": "ghmm", "bounds": [-3.0, -2.0, -1.0]}}}
    for name, results in (("sticky0.9_s0", restarted), ("npz-sticky0.9_s0", done), ("mixture_s0", {"heldout_accuracy": 0.93})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    rows = generalisation.main(["--workdir", str(tmp_path), "--settings", "sticky0.9,npz-sticky0.9"])
    assert [r["setting"] for r in rows] == ["sticky0.9", "npz-sticky0.9"]
    table = (tmp_path / "generalisation.md").read_text()
    assert ("| sticky0.9 | 0 | 0.9800 | 0.0100 | 0.9000 | 0.9000 | – | 0.8000 | 0.7000 | 0.9300 | +0.0800 | 2: ghmm "
            "| 1.5 |") in table
    assert "| npz-sticky0.9 | 0 | 0.9800 | 0.0100 | 0.9000 | 0.9000 | – | 0.8000 | 0.7000 | 0.9300 | +0.0800 | – |" in table
