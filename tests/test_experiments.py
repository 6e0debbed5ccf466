"""End-to-end smoke tests of the experiment scripts, run in-process through their ``main(argv)``.

Tiny settings (4 training and 4 held-out sequences of 6 frames, a 1-block MLP of width 32, T = 100
diffusion steps, 4 training steps), so the time is jit compilation. The HMDM run, the mixture run and
the ablation rows share one network/schedule/step configuration, so the session's persistent
compilation cache (tests/conftest.py) turns their repeated compilations into lookups.
The numbers are checked for being well-formed (finite, in range, the right shapes), not for quality.

The fast set (``-m "not slow"``) runs the HMDM pipeline: experiments/hmdm.py, evaluate.py on its run
(accuracy, NLL, FID, figures), decode.py on ragged sequences, plus the error and ablation-config checks.
The mixture pipeline and the ablations end to end are marked slow (each adds its own compilations).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import ablations  # noqa: E402
import decode  # noqa: E402
import evaluate  # noqa: E402
import hmdm as hmdm_experiment  # noqa: E402
import mixture as mixture_experiment  # noqa: E402

from hmdm_jax import checkpoint  # noqa: E402
from hmdm_jax import data as hdata  # noqa: E402
from hmdm_jax import em  # noqa: E402
from hmdm_jax import run  # noqa: E402

# As many training as held-out sequences, one batch of them: every decode has the same shape (one compile).
SEQUENCES = ["--num-sequences", "4", "--heldout-sequences", "4", "--length", "6"]
SETS = ["loop.batch_size=4", "evaluation.every=0", "evaluation.final_num_t=2", "network.mlp_width=32",
        "network.mlp_depth=1", "diffusion.timesteps=100", "warm_start.steps=2", "loop.log_every=2",
        "restarts.count=1"]  # 4 sequences leave no held-out share for restarts (tests/test_restarts.py)
EVAL = ["--nll-max-items", "2", "--num-samples", "24", "--sample-batch", "24", "--classifier-steps", "5",
        "--no-progress"]
K = 10


def tiny(*extra_sets: str) -> list[str]:
    return ["--steps", "4", "--no-progress", "--set", *SETS, *extra_sets]


def finite_in_unit(x) -> bool:
    return x is not None and math.isfinite(x) and 0.0 <= x <= 1.0


@pytest.fixture(scope="module")
def hmdm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hmdm_run")
    results = hmdm_experiment.main(["--workdir", str(workdir), *SEQUENCES, "--no-figures", *tiny()])
    return workdir, results


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """A mixture trained on an npz of 64 digits (so that the data set, and every decode, is small)."""
    workdir = tmp_path_factory.mktemp("mixture_run")
    digits = hdata.load_digits()
    path = workdir / "digits64.npz"
    np.savez(path, images=(digits.images[:64, :, :, 0] + 1.0) / 2.0, labels=digits.labels[:64], num_classes=K)
    results = mixture_experiment.main(["--data", f"npz:{path}", "--workdir", str(workdir / "run"), "--no-figures",
                                       *tiny("loop.batch_size=16")])
    return workdir / "run", path, results


def test_hmdm_script_results(hmdm_run):
    workdir, results = hmdm_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["steps"] == 4 and saved["model"] == "hmdm"
    assert finite_in_unit(saved["heldout_accuracy"])
    assert np.allclose(np.sum(saved["A_learned"], axis=1), 1.0, atol=1e-3)
    assert finite_in_unit(saved["heldout_framewise_accuracy"])  # the same emissions without the chain
    b = saved["baselines"]
    assert b["gaussian_hmm_best_pca_by_labels"]["accuracy"] >= b["gaussian_hmm"]["accuracy"]  # a max over d
    assert (workdir / "metrics.jsonl").exists() and (workdir / "checkpoints").is_dir()


def test_evaluate_hmdm(hmdm_run):
    workdir, _ = hmdm_run
    ev = evaluate.main(["--workdir", str(workdir), *EVAL, "--nll-num-t", "3", "--recon-levels", "0.5"])
    saved = json.loads((workdir / "evaluation.json").read_text())
    assert saved["model"] == "hmdm" and saved["step"] == 4
    acc = saved["accuracy"]
    assert finite_in_unit(acc["accuracy"]) and finite_in_unit(acc["accuracy_train_matching"])
    assert math.isfinite(acc["ari"]) and finite_in_unit(acc["nmi"])
    assert len(acc["matching"]) == K and "A_mae" in acc
    nll = saved["nll"]
    assert math.isfinite(nll["bits_per_dim"]) and nll["bits_per_dim"] > 0
    assert nll["elbo_num_t"] == 3 and not nll["elbo_full_bound"] and nll["sequences"] == 2 and nll["frames"] == 12
    fid = saved["fid"]
    assert math.isfinite(fid["fid"]) and fid["fid"] >= -1e-6
    assert fid["num_samples"] == 24 and fid["sampler"] == "ddpm-ancestral" and fid["steps"] == 100 and fid["ema"]
    assert "digit-cnn" in fid["feature_net"] and "NOT comparable" in fid["feature_net"]
    names = {Path(p).name for p in saved["figures"]}
    assert names >= {"samples_per_class.png", "reconstructions.png", "confusion.png", "transition_matrix.png",
                     "training_curves.png"}
    assert all(Path(p).stat().st_size > 0 for p in saved["figures"])
    assert ev["accuracy"]["accuracy"] == acc["accuracy"]


def test_evaluate_choose_temperature_is_the_runs_own_choice_for_a_run_without_one(hmdm_run):
    """The preset's HMDM run chose its decoding temperature and refitted its chain at the end (a saved decision);
    evaluate.py's --choose-temperature keeps a run's own, and for a run without one makes the choice the run
    makes (``run.evaluation.choose_decoding``), its chain included."""
    workdir, _ = hmdm_run
    config, parts, state, metadata = run.load_run(workdir)
    chosen = metadata["decisions"]["decoding_temperature"]
    assert config.evaluation.choose_temperature and config.evaluation.temperature == chosen
    data = evaluate.rebuild_data(config, workdir)
    kept_config, kept_state = evaluate.choose_temperature(config, parts, state, data)
    assert kept_config is config and kept_state is state
    unchosen = config.replace(evaluation=dataclasses.replace(config.evaluation, temperature=None))
    tau, log_pi, log_A, _ = run.evaluation.choose_decoding(unchosen, parts, state, data.train)
    new_config, new_state = evaluate.choose_temperature(unchosen, parts, state, data)
    assert new_config.evaluation.temperature == tau
    np.testing.assert_allclose(new_state.log_A, log_A, atol=1e-6)
    np.testing.assert_allclose(new_state.log_pi, log_pi, atol=1e-6)


def test_decode_hmdm_ragged(hmdm_run, tmp_path):
    workdir, _ = hmdm_run
    args = hmdm_experiment.parse_args(["--workdir", str(workdir), *SEQUENCES])
    _, held, _ = hmdm_experiment.sequences_from_args(args)
    lengths = np.array([6, 4, 6, 2])
    mask = np.arange(6)[None, :] < lengths[:, None]
    ds = hdata.SequenceDataset(np.where(mask[..., None, None, None], held.images, 0.0), mask,
                               np.where(mask, held.labels, -1), K)
    inp, out = tmp_path / "held.npz", tmp_path / "decoded.npz"
    hdata.save_sequences_npz(inp, ds)
    decode.main(["--workdir", str(workdir), "--input", str(inp), "--output", str(out), "--num-t", "2", "--no-progress"])
    r = np.load(out)
    assert r["states"].shape == (4, 6) and r["states"].dtype == np.int32
    assert np.all(r["states"][~mask] == -1) and np.all((r["states"][mask] >= 0) & (r["states"][mask] < K))
    assert r["log_joint"].shape == (4,) and np.all(np.isfinite(r["log_joint"]))
    assert r["marginals"].shape == (4, 6, K)
    assert np.allclose(r["marginals"][mask].sum(-1), 1.0, atol=1e-4) and np.allclose(r["marginals"][~mask], 0.0)


class _StopAfterFirstStep:
    """Stands in for checkpoint.PreemptionGuard: as if Ctrl-C arrived during the first step."""

    should_stop, signal_name = True, "SIGINT"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_interrupted_script_saves_and_skips_evaluation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "PreemptionGuard", _StopAfterFirstStep)
    workdir = tmp_path / "run"
    out = hmdm_experiment.main(["--workdir", str(workdir), *SEQUENCES, "--no-figures", *tiny()])
    assert out == {"stopped_early": True, "steps": 1}
    assert not (workdir / "results.json").exists()
    assert "--resume" in capsys.readouterr().out
    assert checkpoint.read_config(workdir / "checkpoints") and run.load_run(workdir)[2].step == 1


def test_mixture_script_holds_out_the_hmdm_image_pool_and_scores_the_masked_labels(tmp_path):
    """--heldout-fraction trains on one pool and scores the other (the pools of experiments/hmdm.py); with half
    the labels observed, the accuracy on the other half is reported (the label loss is on). With every label
    observed there is nothing masked to score: tests/test_cli.py's every-label run checks that."""
    digits = hdata.load_digits()
    path = tmp_path / "digits40.npz"
    np.savez(path, images=(digits.images[:40, :, :, 0] + 1.0) / 2.0, labels=digits.labels[:40], num_classes=K)
    results = mixture_experiment.main(["--data", f"npz:{path}", "--workdir", str(tmp_path / "run"), "--no-figures",
                                       "--heldout-fraction", "0.25", "--seed", "3", "--observed-labels", "0.5",
                                       *tiny("loop.batch_size=8")])
    pools = hdata.split_images(hdata.load_source(f"npz:{path}"), 0.25, 3)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    record = dict(config["data"])
    n_held = len(pools.heldout.images)
    assert 0 < n_held < 40 and record["num_images"] == len(pools.train.images) == 40 - n_held
    assert record["heldout_fraction"] == 0.25
    assert finite_in_unit(results["heldout_accuracy"]) and finite_in_unit(results["heldout_accuracy_train_matching"])
    # each held-out image is scored once: Hungarian accuracy is a multiple of 1/n_held
    assert results["heldout_accuracy"] * n_held == pytest.approx(round(results["heldout_accuracy"] * n_held))
    assert finite_in_unit(results["masked_label_accuracy"]) and finite_in_unit(results["accuracy"])
    assert config["em"]["labels"]["loss_weight"] == 0.1


@pytest.mark.slow
def test_evaluate_and_decode_mixture(mixture_run, tmp_path):
    workdir, npz, results = mixture_run
    assert finite_in_unit(results["accuracy"])
    ev = evaluate.main(["--workdir", str(workdir), *EVAL, "--nll-num-t", "0", "--sampler", "ddim",
                        "--sampling-steps", "3", "--recon-levels", "0.5"])
    saved = json.loads((workdir / "evaluation.json").read_text())
    assert saved["model"] == "mixture"
    assert finite_in_unit(saved["accuracy"]["accuracy"]) and "64 images" in saved["accuracy"]["evaluated_on"]
    nll = saved["nll"]
    assert nll["elbo_full_bound"] and nll["elbo_num_t"] == 100 and nll["images"] == 2
    assert math.isfinite(nll["bits_per_dim"]) and nll["bits_per_dim"] > 0
    fid = saved["fid"]
    assert math.isfinite(fid["fid"]) and fid["fid"] >= -1e-6 and fid["sampler"].startswith("ddim") and fid["steps"] == 3
    assert {Path(p).name for p in saved["figures"]} >= {"samples_per_class.png", "reconstructions.png",
                                                        "confusion.png", "training_curves.png"}
    assert ev["nll"]["bits_per_dim"] == nll["bits_per_dim"]

    out = tmp_path / "decoded.npz"
    decode.main(["--workdir", str(workdir), "--input", str(npz), "--output", str(out), "--num-t", "2", "--no-progress"])
    r = np.load(out)
    assert r["states"].shape == (64,) and r["states"].dtype == np.int32 and np.all((r["states"] >= 0) & (r["states"] < K))
    assert r["marginals"].shape == (64, K) and np.allclose(r["marginals"].sum(-1), 1.0, atol=1e-4)


@pytest.mark.parametrize("exists", [True, False])
def test_evaluate_without_checkpoint_is_a_clear_error(tmp_path, capsys, exists):
    workdir = tmp_path / "no_run"
    if exists:
        workdir.mkdir()
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--workdir", str(workdir)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(workdir) in err and "Traceback" not in err


def test_ablation_rows_are_the_documented_configs():
    args = ablations.parse_args(["--steps", "30", "--rows", "paper,untempered", "finetune"])
    assert args.row_names == ["paper", "untempered", "finetune"]
    data = ablations.Data(None, None, None, K, (8, 8, 1), {"source": "digits"})
    notes = []
    base = ablations.base_config(args, data, notes)
    assert base.warm_start.steps == 10 and notes  # shortened: 500 >= 30 steps
    rows = {r.name: ablations.row_config(base, r) for r in ablations.ROWS}
    assert rows["paper"].em == em.EMConfig.paper(K)
    assert rows["paper_last_decoder"].em == em.EMConfig.paper(K).replace(scoring=dict(estimator="last_decoder"))
    assert rows["paper_multi_t"].em.scoring.estimator == "multi_t" and rows["paper_multi_t"].em.scoring.num_t > 1
    assert rows["paper_elbo"].em.scoring.estimator == "elbo" and rows["paper_elbo"].em.scoring.num_t == 10
    preset_em = em.EMConfig(K, scoring=em.Scoring(num_t=1))  # the HMDM preset's E-step
    assert base.em == preset_em
    assert rows["untempered"].em == preset_em.replace(temperature=em.Temperature(1.0))
    assert rows["default"].em == preset_em and rows["default"].warm_start.method == "kmeans"
    assert rows["default_no_warm_start"].warm_start.method == "none"
    assert rows["finetune"].warm_start.method == "none" and rows["finetune"].em == preset_em


def test_ablation_rows_saved_before_a_config_field_existed_are_reused():
    """A row saved before the config class gained a field (at its default) is the same config; a changed
    value is not."""
    config = run.preset("cpu-small", "hmdm", K, (8, 8, 1))
    current = ablations._json(config.to_dict())
    saved = json.loads(json.dumps(current))
    del saved["loop"]["observed_batch_fraction"]
    assert ablations._same_config(saved, current)
    saved["loop"]["train_steps"] += 1
    assert not ablations._same_config(saved, current)
    assert not ablations._same_config(None, current)


@pytest.mark.slow
def test_ablations_end_to_end(tmp_path, hmdm_run):
    # hmdm_run first: the default and finetune rows then reuse its compiled train step and decoders.
    workdir = tmp_path / "abl"
    argv = ["--workdir", str(workdir), "--rows", "default,finetune", *SEQUENCES, *tiny()]
    summary = ablations.main(argv)
    rows = {r["row"]: r for r in summary["rows"]}
    assert list(rows) == ["pretrained", "default", "finetune"]
    for r in rows.values():
        assert "error" not in r, r
        assert finite_in_unit(r["results"]["accuracy"]) and finite_in_unit(r["results"]["class_usage_min"])
        assert r["train_seconds"] > 0 and r["trained_steps"] == 4
        assert (workdir / r["row"] / "checkpoints").is_dir() and (workdir / r["row"] / "row.json").exists()
    table = (workdir / "ablations.md").read_text()
    assert all(f"| {name} |" in table for name in rows)
    assert json.loads((workdir / "ablations.json").read_text())["table"] == summary["table"]
    # A second call reuses the finished rows instead of training again.
    again = ablations.main(["--workdir", str(workdir), "--rows", "default", *SEQUENCES, *tiny()])
    assert again["rows"][0]["results"] == rows["default"]["results"]


def test_fid_of_colour_data_without_inception_weights_is_skipped_with_a_message(capsys):


    args = evaluate.parse_args(["--workdir", "unused"])
    config = run.preset("cpu-small", "mixture", 2, (8, 8, 3), source="npz:colour.npz")
    images = np.zeros((4, 8, 8, 3), np.float32)
    data = evaluate.RunData(run.TrainData(images, np.array([0, 1, 0, 1]), np.zeros(4, bool)), None, None, 2, [])
    record = evaluate.fid_section(args, config, None, None, data, {})
    assert "--inception-weights" in record["skipped"] and "fid" not in record
    assert "FID skipped" in capsys.readouterr().out
