"""The run layer: presets, overrides, warm starts, batches, hooks, the loop (resume, fused steps, stops,
workdirs) and the defects fixed in its redesign, on the 2-D blobs of tests/blobs.py."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmdm_jax import checkpoint, em, emission, hmdm, models, run, warm_start
from hmdm_jax import matching as am
from hmdm_jax.run import batches, evaluation, hooks, presets
from hmdm_jax.run import config as rc
from hmdm_jax.run import parts as rp
from hmdm_jax.run.batches import TrainData
from hmdm_jax.steps import dirichlet_log_probs
from tests.blobs import K, STICKY_A, blob_config, blobs, markov_labels, with_em

ROOT = Path(__file__).resolve().parents[1]


def mixture_data(rng, n=64):
    labels = rng.integers(0, K, n).astype(np.int32)
    return TrainData(blobs(rng, labels), labels, np.zeros(n, bool))


@pytest.mark.parametrize("model_type", ["mixture", "hmdm"])
def test_fully_labelled_step_counts_are_the_label_counts(model_type):
    """With every label observed and count_decay = 1, the step's π/A statistics are exactly the counts
    of the labels (so clamped classes reached the M-step unchanged)."""
    rng = np.random.default_rng(4)
    config = blob_config(model_type, 1, 4)
    config = dataclasses.replace(config, em=config.em.replace(priors=dict(count_decay=1.0, learn_pi=True)))
    parts = rp.build_parts(config)
    state = rp.init_state(config, parts)
    step = rp.make_step(config, parts)
    if model_type == "mixture":
        labels = rng.integers(0, K, 32).astype(np.int32)
        state, _ = step(state, {"images": blobs(rng, labels), "labels": labels})
        np.testing.assert_array_equal(np.asarray(state.class_counts), np.bincount(labels, minlength=K))
        expected_pi = (np.bincount(labels, minlength=K) + 1.0) / (len(labels) + K)
        np.testing.assert_allclose(np.exp(np.asarray(state.log_pi)), expected_pi, rtol=1e-6)
    else:
        labels = markov_labels(rng, 4, 10)
        mask = np.ones(labels.shape, bool)
        mask[1, 7:] = False  # a padded tail: its labels must not count
        batch = {"images": blobs(rng, labels), "labels": np.where(mask, labels, -1), "mask": mask}
        state, _ = step(state, batch)
        trans = np.zeros((K, K))
        for seq, m in zip(labels, mask):
            seq = seq[m]
            np.add.at(trans, (seq[:-1], seq[1:]), 1)
        np.testing.assert_array_equal(np.asarray(state.transition_counts), trans)
        np.testing.assert_array_equal(np.asarray(state.class_counts), np.bincount(labels[:, 0], minlength=K))


@pytest.mark.parametrize("model_type", ["mixture", "hmdm"])
def test_label_loss_weight_adds_the_term_to_the_step_and_zero_keeps_the_old_draws(model_type):
    """With α > 0 the step reports a positive label loss; with α = 0 it splits the step key into three
    as before the term existed (runs stay bit-identical) and reports none."""
    rng = np.random.default_rng(9)
    key = jax.random.PRNGKey(3)
    plain = blob_config(model_type, 1, 4)
    assert em.step_keys(plain.em, key)[3] is None
    np.testing.assert_array_equal(jax.random.key_data(jnp.stack(em.step_keys(plain.em, key)[:3])),
                                  jax.random.key_data(jax.random.split(key, 3)))
    config = dataclasses.replace(plain, em=plain.em.replace(labels=dict(loss_weight=1.0)))
    parts = rp.build_parts(config)
    if model_type == "mixture":
        labels = rng.integers(0, K, 16).astype(np.int32)
        batch = {"images": blobs(rng, labels), "labels": np.where(np.arange(16) < 4, labels, -1).astype(np.int32)}
    else:
        labels = markov_labels(rng, 4, 6)
        batch = {"images": blobs(rng, labels), "labels": np.where(rng.random(labels.shape) < 0.3, labels, -1).astype(np.int32)}
    _, metrics = rp.make_step(config, parts)(rp.init_state(config, parts), batch)
    assert np.isfinite(float(metrics["label_loss"])) and float(metrics["label_loss"]) > 0.1  # ≈ log K untrained
    _, metrics = rp.make_step(plain, rp.build_parts(plain))(rp.init_state(plain, parts), batch)
    assert "label_loss" not in metrics


def test_mixture_recovers_blobs_from_random_start(tmp_path):
    rng = np.random.default_rng(0)
    train_labels, held_labels = rng.integers(0, K, 512), rng.integers(0, K, 256)
    data = TrainData(blobs(rng, train_labels), train_labels.astype(np.int32), np.zeros(512, bool))
    held = TrainData(blobs(rng, held_labels), held_labels.astype(np.int32), np.zeros(256, bool))
    config = blob_config("mixture", 400, 128)
    result = run.train(config, data, tmp_path, heldout=held, progress=False)
    ev = evaluation.evaluate(config, result.parts, result.state, data, held, num_t=16)
    assert ev["heldout_accuracy"] >= 0.95, ev
    assert min(ev["class_usage"]) > 0.2  # no dead or swallowed class
    np.testing.assert_allclose(np.exp(np.asarray(result.state.log_pi)), 1.0 / K, rtol=1e-6)  # π fixed by default


def test_hmdm_recovers_transitions_and_decodes_heldout(tmp_path):
    rng = np.random.default_rng(0)
    train_labels, held_labels = markov_labels(rng, 64, 20), markov_labels(rng, 32, 20)
    full = lambda x: np.ones(x.shape, bool)
    data = TrainData(blobs(rng, train_labels), train_labels, ~full(train_labels), full(train_labels))
    held = TrainData(blobs(rng, held_labels), held_labels, ~full(held_labels), full(held_labels))
    config = blob_config("hmdm", 400, 8)
    result = run.train(config, data, tmp_path, heldout=held, progress=False, true_A=STICKY_A)
    ev = evaluation.evaluate(config, result.parts, result.state, data, held, num_t=16, true_A=STICKY_A)
    assert ev["heldout_accuracy"] >= 0.95, ev
    assert ev["A_mae"] <= 0.05, ev
    rows = np.exp(np.asarray(result.state.log_A)).sum(1)
    np.testing.assert_allclose(rows, 1.0, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["mixture", "hmdm"])
def test_resume_is_bit_exact(tmp_path, model_type):
    """A run stopped after 6 steps and resumed equals an uninterrupted 12-step run, bit for bit."""
    rng = np.random.default_rng(5)
    if model_type == "mixture":
        labels = rng.integers(0, K, 64).astype(np.int32)
        data = TrainData(blobs(rng, labels), labels, np.zeros(64, bool))
        batch = 16
    else:
        labels = markov_labels(rng, 16, 6)
        data = TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))
        batch = 4
    config = blob_config(model_type, 12, batch, warm_start_steps=0)
    config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, checkpoint_every=3))
    whole = run.train(config, data, tmp_path / "whole", progress=False).state
    run.train(config, data, tmp_path / "split", progress=False, stop_after=6)
    _, _, stopped, _ = rp.load_run(tmp_path / "split")
    assert int(stopped.step) == 6
    resumed = run.train(config, data, tmp_path / "split", progress=False, resume=True).state
    assert int(resumed.step) == 12
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(stopped.params), jax.tree.leaves(resumed.params))]
    assert any(moved)  # the second half did train


def test_fused_steps_equal_single_steps(tmp_path):
    """``loop.steps_per_call = 3`` (one lax.scan over 3 steps, then single steps for the remainder of 7)
    trains the same run as one step per call, to float32 rounding. (The fusing wraps any model's step
    alike; HMDM's, with its sequence masks, stands for both.)"""
    rng = np.random.default_rng(6)
    labels = markov_labels(rng, 16, 6)
    data = TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))
    single = blob_config("hmdm", 7, 4, warm_start_steps=0, steps_per_call=1)
    fused = dataclasses.replace(single, loop=dataclasses.replace(single.loop, steps_per_call=3))
    a = run.train(single, data, tmp_path / "single", progress=False).state
    b = run.train(fused, data, tmp_path / "fused", progress=False).state
    assert int(a.step) == int(b.step) == 7
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-4, atol=1e-5)
    init = rp.init_state(single, rp.build_parts(single))
    assert not np.allclose(np.asarray(jax.tree.leaves(init.params)[0]), np.asarray(jax.tree.leaves(b.params)[0]))


def test_band_and_temperature_chosen_after_warm_start_are_saved_and_resume_exactly(tmp_path, monkeypatch):
    """band.choose and band.temperature: the band chosen at the end of the k-means warm start is the argmax
    of the agreement written to metrics.jsonl, the temperature the argmax of its fit in that band; both are
    the checkpoint's decisions (its metadata), the run trains and decodes with them, and a resumed run keeps
    them."""
    rng = np.random.default_rng(6)
    labels = rng.integers(0, K, 64).astype(np.int32)
    data = TrainData(blobs(rng, labels), labels, np.zeros(64, bool))
    config = blob_config("mixture", 12, 16, warm_start="kmeans", warm_start_steps=4, choose_band=True,
                         band_frames=48, band_temperature=True, checkpoint_every=3)
    whole = run.train(config, data, tmp_path / "whole", progress=False)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    (choice,) = [r for r in records if "t_range" in r]
    agreement = list(choice["band_agreement"].values())
    assert choice["step"] == 4 and tuple(choice["t_range"]) == em.CANDIDATE_BANDS[int(np.argmax(agreement))]
    assert whole.config.em.scoring.t_range == tuple(choice["t_range"])
    (calibration,) = [r for r in records if "temperature_fit" in r]
    fit = calibration["temperature_fit"]
    assert calibration["step"] == 4 and calibration["temperature"] == em.TEMPERATURE_GRID[int(np.argmax(fit))]
    assert whole.config.em.temperature.final == calibration["temperature"] != config.em.temperature.final
    trained, _, _, metadata = rp.load_run(tmp_path / "whole")
    assert trained == whole.config == config.with_decisions(metadata["decisions"]) != config
    assert tuple(metadata["decisions"]["t_range"]) == whole.config.em.scoring.t_range
    assert metadata["decisions"]["temperature"] == whole.config.em.temperature.final

    run.train(config, data, tmp_path / "split", progress=False, stop_after=6)
    resumed = run.train(config, data, tmp_path / "split", progress=False, resume=True)
    assert resumed.config.em.scoring.t_range == whole.config.em.scoring.t_range
    assert resumed.config.em.temperature == whole.config.em.temperature

    # the re-seed check at the end of the warm start decodes with the band chosen there
    decoded_with = []
    real = hooks.predict_states

    def recording(config, *args, **kwargs):
        decoded_with.append(config.em.scoring.t_range)
        return real(config, *args, **kwargs)

    monkeypatch.setattr(hooks, "predict_states", recording)
    run.train(config.replace(reseed=dataclasses.replace(config.reseed, every=4, steps=2)), data, tmp_path / "reseed",
              progress=False)
    assert decoded_with[0] == whole.config.em.scoring.t_range != config.em.scoring.t_range
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    no_assignment = blob_config("mixture", 12, 16, choose_band=True)  # warm_start="none"
    with pytest.raises(ValueError, match="band.choose"):
        run.train(no_assignment, data, tmp_path / "none", progress=False)
    # restarts each make their own start: with none of them active the run is refused before anything is written
    no_starts = dataclasses.replace(config, warm_start=dataclasses.replace(config.warm_start, steps=0),
                                    restarts=dataclasses.replace(config.restarts, count=2, criterion="bound"))
    with pytest.raises(ValueError, match="band.choose"):
        run.train(no_starts, data, tmp_path / "restarts", progress=False)
    assert not (tmp_path / "restarts").exists()


def test_hmdm_e_step_temperature_is_where_the_chain_explains_the_e_steps_own_scores_best(tmp_path, capsys):
    """HMDM's ``band.temperature`` with ``band.temperature_every``: at the end of the warm start the temperature
    is the argmax of ``hmdm.decoding_fit`` (chain refitted at each τ, the run's priors) on the first training
    sequences scored
    exactly as the E-step scores them (its band, one draw, the current parameters, the documented keys),
    recomputed here from the checkpoint of that step; the run trains with it, and its A is not replaced."""
    rng = np.random.default_rng(8)
    labels = markov_labels(rng, 20, 10)
    data = TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))
    base = blob_config("hmdm", 8, 4, warm_start="kmeans", warm_start_steps=4, band_temperature=True,
                       checkpoint_every=4, reseed_every=0)
    config = base.replace(band=dataclasses.replace(base.band, temperature_every=100))  # once within 8 steps
    result = run.train(config, data, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (calibration,) = [r for r in records if "temperature_fit" in r]
    assert calibration["step"] == 4 and result.config.em.temperature.final == calibration["temperature"]

    _, parts, state, _ = rp.load_run(tmp_path / "run", step=4)
    scoring = config.em.replace(temperature=em.Temperature(final=1.0))
    key = jax.random.fold_in(jax.random.fold_in(rp.streams(config.seed).heuristics, 4), 2)
    batch = config.evaluation.batch_size
    log_b = np.concatenate([np.asarray(hmdm.sequence_log_emissions(
        scoring, parts.eps_fn, state.params, parts.schedule, jnp.asarray(data.images[i:i + batch]),
        jax.random.fold_in(key, i), state.step)) for i in range(0, 20, batch)])
    fit = hmdm.decoding_fit(jnp.asarray(log_b), jnp.asarray(data.mask), state.log_pi, state.log_A,
                            priors=config.em.priors, grid=tuple(em.TEMPERATURE_GRID)).fits
    np.testing.assert_allclose(calibration["temperature_fit"], np.asarray(fit), rtol=1e-4, atol=1e-5)
    assert calibration["temperature"] == em.TEMPERATURE_GRID[int(np.argmax(fit))]
    # A stays the M-step of the training's own counts (the refit only scores each τ)
    np.testing.assert_allclose(np.asarray(state.log_A), np.asarray(dirichlet_log_probs(
        state.transition_counts, config.em.priors.pseudo_count, config.em.priors.sticky_count)), atol=1e-6)
    assert "the chain adds" in capsys.readouterr().out


def test_hmdm_e_step_temperature_is_chosen_again_every_period_and_resumes_exactly(tmp_path):
    """``band.temperature_every``: after the warm start's choice (step 4) the temperature is chosen again at
    steps 8 and 12 (not at the last step, 14), each time the argmax of its logged fit; the run trains with the
    last one, and a run stopped at step 6 and resumed equals the uninterrupted one bit for bit. The mixture
    refuses the option."""
    rng = np.random.default_rng(9)
    labels = markov_labels(rng, 20, 10)
    data = TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))
    base = blob_config("hmdm", 14, 4, warm_start="kmeans", warm_start_steps=4, band_temperature=True, reseed_every=0)
    config = base.replace(band=dataclasses.replace(base.band, temperature_every=4))
    whole = run.train(config, data, tmp_path / "whole", progress=False)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    choices = [r for r in records if "temperature_fit" in r]
    assert [r["step"] for r in choices] == [4, 8, 12]
    for r in choices:
        assert r["temperature"] == em.TEMPERATURE_GRID[int(np.argmax(r["temperature_fit"]))]
    assert choices[1]["temperature_fit"] != choices[0]["temperature_fit"]  # scored with the later network
    assert whole.config.em.temperature.final == choices[-1]["temperature"] == whole.decisions["temperature"]
    run.train(config, data, tmp_path / "split", progress=False, stop_after=6)
    resumed = run.train(config, data, tmp_path / "split", progress=False, resume=True)
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mixture = blob_config("mixture", 14, 4, band_temperature=True)
    with pytest.raises(ValueError, match="band.temperature_every"):
        mixture.replace(band=dataclasses.replace(mixture.band, temperature_every=4)).check()


def test_decoding_temperature_is_chosen_at_the_end_on_training_sequences_saved_and_used(tmp_path):
    """evaluation.choose_temperature: after the last step the run chooses the final decoding's temperature,
    the argmax of the fit it logs, on the training sequences (after restarts too); it is a saved decision, the
    trained config decodes with it (the E-step's stays), a resumed run ends with the same one, and the
    mixture (no chain) refuses the option."""
    rng = np.random.default_rng(7)
    labels = markov_labels(rng, 20, 6)
    data = TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))
    base = blob_config("hmdm", 8, 4, warm_start="kmeans", warm_start_steps=2, checkpoint_every=3)
    config = base.replace(evaluation=dataclasses.replace(base.evaluation, choose_temperature=True, final_num_t=4),
                          restarts=dataclasses.replace(base.restarts, count=2, heldout_fraction=0.2))
    whole = run.train(config, data, tmp_path / "whole", progress=False)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    (choice,) = [r for r in records if "decoding_temperature" in r]
    assert choice["step"] == 8
    assert choice["decoding_temperature"] == em.TEMPERATURE_GRID[int(np.argmax(choice["decoding_temperature_fit"]))]
    assert whole.config.evaluation.temperature == choice["decoding_temperature"]
    assert whole.config.em.temperature == config.em.temperature  # training's own is untouched
    trained, parts, state, metadata = rp.load_run(tmp_path / "whole")
    assert trained == whole.config and metadata["decisions"]["decoding_temperature"] == choice["decoding_temperature"]
    # the fit is the one of the training sequences, scored as the final decoding scores them, and the saved
    # chain is the one refitted at the chosen τ: with it, unrefitted, that τ's fit is the logged maximum
    tau = choice["decoding_temperature"]
    untempered = trained.replace(evaluation=dataclasses.replace(trained.evaluation, temperature=1.0))
    log_b = evaluation.predict_states(untempered, parts, state, data.images, data.mask, num_t=4,
                                      key=jax.random.fold_in(rp.streams(config.seed).eval,
                                                             evaluation.DECODING_FIT_STREAM))["log_emissions"]
    (fit,) = hmdm.decoding_fit(jnp.asarray(log_b), jnp.asarray(data.mask), state.log_pi, state.log_A, grid=(tau,)).fits
    assert float(fit) == pytest.approx(max(choice["decoding_temperature_fit"]), abs=1e-4)
    assert choice["refit_A_change"] > 0  # the chain learned in training was refitted
    assert evaluation.decoding_config(trained, None, 4).temperature.final == tau

    run.train(config, data, tmp_path / "split", progress=False, stop_after=3)
    resumed = run.train(config, data, tmp_path / "split", progress=False, resume=True)
    assert resumed.decisions["decoding_temperature"] == choice["decoding_temperature"]
    np.testing.assert_array_equal(np.asarray(resumed.state.log_A), np.asarray(state.log_A))
    with pytest.raises(ValueError, match="choose_temperature"):
        run.train(config.replace(model_type="mixture", restarts=base.restarts), TrainData(data.images[:, 0],
                  labels[:, 0], np.zeros(20, bool)), tmp_path / "mixture", progress=False)


def test_warm_start_clusters_are_numbered_as_the_observed_labels():
    """With observed labels, state k means label k: the k-means warm start must use the same numbering.
    Two relabellings of the same images: k-means sees the same pixels, so only a renumbering that follows
    the observed labels can agree with both."""
    rng = np.random.default_rng(4)
    blob_of = rng.integers(0, K, 300)
    images = blobs(rng, blob_of)
    observed = rng.random(300) < 0.1
    config = blob_config("mixture", 10, 8, warm_start="kmeans")
    for perm in ([0, 1, 2], [2, 0, 1]):
        labels = np.asarray(perm)[blob_of].astype(np.int32)
        (warm, after), record = batches.phase_labels(config, TrainData(images, labels, observed))
        assert record == {}  # a clustering decides nothing worth logging
        np.testing.assert_array_equal(warm[observed], labels[observed])
        np.testing.assert_array_equal(after, np.where(observed, labels, -1))
        assert np.mean(warm[~observed] == labels[~observed]) > 0.95


def test_gaussian_hmm_warm_start_uses_the_chain_where_frame_clusters_cannot():
    """Overlapping blobs on a sticky chain: k-means on the frames mislabels the overlap, the Gaussian HMM's
    Viterbi path (fitted without labels) pools the neighbours and recovers the states; the warm start
    follows observed labels, records what it chose, and is refused for the mixture."""
    rng = np.random.default_rng(21)
    states = markov_labels(rng, 60, 40, A=np.full((K, K), 0.025) + 0.925 * np.eye(K))
    images = blobs(rng, states, spread=0.45)
    observed = rng.random(states.shape) < 0.05
    data = TrainData(images, states, observed, np.ones(states.shape, bool))
    (warm, after), record = batches.phase_labels(blob_config("hmdm", 10, 8, warm_start="ghmm"), data)
    (kmeans, _), _ = batches.phase_labels(blob_config("hmdm", 10, 8, warm_start="kmeans"), data)
    accuracy = lambda labels: am.matched_accuracy(states.reshape(-1), labels.reshape(-1), K, K)[0]
    assert accuracy(kmeans) < 0.9 and accuracy(warm) > 0.97, (accuracy(kmeans), accuracy(warm))
    np.testing.assert_array_equal(warm[observed], states[observed])  # renumbered onto the observed labels
    np.testing.assert_array_equal(after, np.where(observed, states, -1))
    assert record["method"] == "ghmm" and record["pca_dim"] == 2 and len(record["restart_scores"]) == 3
    assert record["restart_scores"][record["best_restart"]] == max(record["restart_scores"])
    with pytest.raises(ValueError, match="needs sequences"):
        blob_config("mixture", 10, 8, warm_start="ghmm")


def test_ward_warm_start_separates_blobs_follows_observed_labels_and_refuses_huge_data(monkeypatch):
    """Ward on three blobs: one cluster per blob (any numbering), renumbered to the observed labels by the
    training loop, deterministic; beyond its O(N²) memory limit a clear error."""
    rng = np.random.default_rng(9)
    blob_of = rng.integers(0, K, 300)
    images = blobs(rng, blob_of)
    ward = warm_start.cluster_labels(images, K, "ward", pca_dims=None)
    assert am.matched_accuracy(blob_of, ward, K, K)[0] == 1.0
    np.testing.assert_array_equal(ward, warm_start.cluster_labels(images, K, "ward", pca_dims=None, seed=5))
    observed = rng.random(300) < 0.1
    config = blob_config("mixture", 10, 8, warm_start="ward")
    (warm, _), _ = batches.phase_labels(config, TrainData(images, blob_of.astype(np.int32), observed))
    np.testing.assert_array_equal(warm, blob_of)
    monkeypatch.setattr(warm_start, "MAX_WARD_FRAMES", 100)
    with pytest.raises(ValueError, match="O\\(N²\\) memory"):
        warm_start.cluster_labels(images, K, "ward")
    with pytest.raises(ValueError, match="warm_start.method must be one of"):
        blob_config("mixture", 10, 8, warm_start="spectral")


def test_observed_batch_fraction_draws_that_share_from_labelled_items():
    rng = np.random.default_rng(10)
    labels = rng.integers(0, K, 200).astype(np.int32)
    observed = rng.random(200) < 0.05
    data = TrainData(blobs(rng, labels), labels, observed)
    config = blob_config("mixture", 10, 16, observed_batch_fraction=0.5)
    clamped = np.stack([np.where(observed, labels, -1)] * 2)
    plain = blob_config("mixture", 10, 16)
    for step in range(6):
        batch = batches.make_batch(config, data, clamped, step)
        from_observed = batch["labels"] >= 0
        assert from_observed[8:].all() and len(batch["labels"]) == 16  # the second half: labelled items
        # the first half is the plain batch's first half; the whole is a function of (seed, step)
        np.testing.assert_array_equal(batch["images"][:8], batches.make_batch(plain, data, clamped, step)["images"][:8])
        np.testing.assert_array_equal(batch["images"], batches.make_batch(config, data, clamped, step)["images"])
    shares = np.mean([(batches.make_batch(plain, data, clamped, s)["labels"] >= 0).mean() for s in range(40)])
    assert shares < 0.1  # without it, about the 5 % observed
    unsupervised = data._replace(observed=np.zeros(200, bool))  # nothing to weight up: plain batches
    np.testing.assert_array_equal(batches.make_batch(config, unsupervised, clamped, 3)["images"],
                                  batches.make_batch(plain, unsupervised, clamped, 3)["images"])
    with pytest.raises(ValueError, match="observed_batch_fraction must be in"):
        rc.LoopConfig(observed_batch_fraction=1.0)


def test_presets_final_estimator_and_observed_batch_fraction():
    """The mixture is finally classified by its grid ELBO, weights labelled images up and, when labels are
    observed, adds the label loss; HMDM keeps its tempered training scorer, uniform batches and no label
    loss. Both choose their band and temperature from the data."""
    mix = presets.preset("cpu-small", "mixture", 10, (8, 8, 1), num_images=1797)
    assert (mix.evaluation.final_estimator, mix.evaluation.final_num_t) == ("elbo", 50)
    assert mix.loop.observed_batch_fraction == 0.5 and mix.band.choose and mix.warm_start.method == "ward"
    # Ward's O(N²) memory: image sets above its limit keep k-means (the run would otherwise be refused)
    assert presets.preset("cpu-small", "mixture", 10, (28, 28, 1), num_images=60_000).warm_start.method == "kmeans"
    unlabelled = presets.preset("cpu-small", "mixture", 10, (8, 8, 1), observed_labels=0.0)
    labelled = presets.preset("cpu-small", "mixture", 10, (8, 8, 1), observed_labels=0.1)
    assert (unlabelled.em.labels.loss_weight, unlabelled.loop.train_steps) == (0, 3000)
    assert (labelled.em.labels.loss_weight, labelled.loop.train_steps) == (0.1, 6000)
    assert presets.preset("cpu-small", "hmdm", 10, (8, 8, 1), observed_labels=0.1).em.labels.loss_weight == 0
    hm = presets.preset("cpu-small", "hmdm", 10, (8, 8, 1))
    assert hm.evaluation.final_estimator is None and hm.loop.observed_batch_fraction == 0
    assert hm.band.choose and hm.band.temperature and mix.band.temperature
    assert hm.warm_start.method == "kmeans"
    assert hm.reseed.split_merge and not unlabelled.reseed.split_merge  # the move is measured on HMDM only
    # HMDM: one pass scores all K classes, which pays for restarts from three different warm starts
    assert hm.network.class_heads == mix.network.class_heads == "multi_head"
    assert (hm.restarts.count, hm.restarts.methods) == (3, ("kmeans", "ward", "ghmm")) and not mix.restarts.active
    assert hm.restarts.steps is None and hm.restarts.criterion == "chain" and hm.reseed.copy_parent
    assert hm.restarts.snapshot_every == 0  # snapshots kept undertrained networks (RESULTS.md, stop 35)
    assert hm.band.temperature_every == mix.band.temperature_every == 0  # measured, not adopted (stop 35)
    many = presets.preset("cpu-small", "hmdm", 10, (28, 28, 1), num_sequences=2000, length=30)
    assert many.restarts.methods == ("umap", "kmeans", "ghmm")  # 60k frames: too many for Ward
    # the main job's 200 sequences of 30 frames start one candidate from UMAP; 20 of 30 are too few for it
    assert presets.preset("cpu-small", "hmdm", 10, (8, 8, 1), num_sequences=200, length=30).restarts.methods[0] == "umap"
    assert presets.preset("cpu-small", "hmdm", 10, (8, 8, 1), num_sequences=20, length=30).restarts.methods[0] == "kmeans"
    hm.check()
    with pytest.raises(ValueError, match="final_estimator must be None or one of"):
        rc.EvalConfig(final_estimator="elbow")
    with pytest.raises(ValueError, match="unknown preset"):
        presets.preset("cpu-large", "hmdm", 10, (8, 8, 1))


def test_overrides_name_unknown_fields_and_check_types():
    config = blob_config("mixture", 10, 8)
    changed = rc.apply_overrides(config, ["em.temperature.final=0.3", "loop.train_steps=7", "em.scoring.t_range=[0.1, 0.4]",
                                          "evaluation.final_estimator=elbo", "em.temperature.final=1"])
    assert changed.em.temperature.final == 1.0 and changed.loop.train_steps == 7 and changed.em.scoring.t_range == (0.1, 0.4)
    assert changed.evaluation.final_estimator == "elbo"
    assert rc.RunConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(ValueError, match="em.temprature"):
        rc.apply_overrides(config, ["em.temprature=0.3"])
    with pytest.raises(ValueError, match="'loop.batch_size' expects int, got 'abc'"):
        rc.apply_overrides(config, ["loop.batch_size=abc"])
    with pytest.raises(ValueError, match="loop.batch_size must be >= 1"):
        rc.apply_overrides(config, ["loop.batch_size=0"])
    with pytest.raises(ValueError, match="seed must be"):
        rc.apply_overrides(config, ["seed=-1"])
    for raw in ("kmeans,ward", '["kmeans", "ward"]'):  # a tuple of names: comma-separated or JSON
        assert rc.apply_overrides(config, [f"restarts.methods={raw}"]).restarts.methods == ("kmeans", "ward")
    with pytest.raises(ValueError, match="restarts.methods must name warm starts"):
        rc.apply_overrides(config, ["restarts.methods=kmeans,wrd"])


def test_em_options_are_grouped_and_a_config_of_another_layout_is_refused():
    """EMConfig is four groups (scoring, temperature, priors, labels); options that mean something only
    together are validated together, ``replace`` changes one field of a group, and a saved config whose
    fields this version does not have (the flat EMConfig of before) is an error, not silent defaults."""
    config = blob_config("hmdm", 10, 8)
    assert [f.name for f in dataclasses.fields(em.EMConfig)] == [
        "num_classes", "scoring", "temperature", "priors", "labels", "balance_classes", "balance_loss"]
    changed = config.em.replace(scoring=dict(num_t=3), priors=dict(sticky_count=2.0))
    assert changed.scoring == dataclasses.replace(config.em.scoring, num_t=3)
    assert changed.priors.sticky_count == 2.0 and changed.temperature == config.em.temperature
    with pytest.raises(ValueError, match="initial and temperature.anneal_steps"):
        em.Temperature(final=0.15, initial=1.0)  # an annealing without a length
    with pytest.raises(ValueError, match="initial and temperature.anneal_steps"):
        rc.apply_overrides(config, ["em.temperature.anneal_steps=100"])
    # a pair is set together by giving the group as a JSON object
    annealed = rc.apply_overrides(config, ['em.temperature={"initial": 2.0, "anneal_steps": 100}'])
    assert annealed.em.temperature == em.Temperature(final=0.15, initial=2.0, anneal_steps=100)
    with pytest.raises(ValueError, match="expects Temperature|unknown config field"):
        rc.apply_overrides(config, ["em.temperature=0.2"])  # the flat path of before names the group
    old = config.to_dict()
    old["em"] = {"num_classes": 10, "estimator": "eps_mse", "temperature": 0.3}
    with pytest.raises(ValueError, match=r"config.em has fields \['estimator'\]"):
        rc.RunConfig.from_dict(old)


def test_reseed_revives_dead_states_and_keeps_observed_labels():
    """An untrained network decodes the blobs into fewer than K states; the re-seed clamp splits the
    largest state so that every state gets frames, and never overrides an observed label."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, 256).astype(np.int32)
    observed = np.arange(256) < 5
    labels[:5] = 2
    data = TrainData(blobs(rng, labels), labels, observed)
    config = blob_config("mixture", 60, 64)
    parts = rp.build_parts(config)
    state = rp.init_state(config, parts)
    decoded = evaluation.predict_states(config, parts, state, data.images, None, num_t=config.reseed.num_t)["states"]
    assert np.bincount(decoded, minlength=K).min() < 0.5 * 256 / K  # the premise: a dead state
    clamp, splits = hooks.revived_labels(data, decoded, K, config.reseed.min_usage, config.seed)
    assert splits and all(np.bincount(decoded, minlength=K)[d] < 0.5 * 256 / K for d, _ in splits)
    np.testing.assert_array_equal(clamp[:5], 2)
    assigned = np.where(clamp >= 0, clamp, decoded)
    assert np.bincount(assigned, minlength=K).min() >= 0.5 * 256 / K
    assert hooks.revived_labels(data, assigned, K, config.reseed.min_usage, config.seed) is None  # all alive


# ------------------------------------------------------------------------------------------ defects fixed


def test_random_streams_are_independent_of_every_step_key():
    """The init, eval and heuristics keys are split from the seed once: none equals a training step key
    (``fold_in(train, step)``) over the gpu preset's 50k steps, and the hooks get a fresh key each time.
    (Before: the init key was ``fold_in(PRNGKey(seed), 1)``, the key of step 1, and the re-seed key, the
    same at every re-seed, was the key of step 24,301.)"""
    keys = rp.streams(0)
    steps = jnp.arange(50_000)
    step_keys = np.asarray(jax.vmap(jax.random.fold_in, (None, 0))(keys.train, steps))
    as_rows = {tuple(row) for row in step_keys}
    for name in ("init", "eval", "heuristics"):
        assert tuple(np.asarray(getattr(keys, name))) not in as_rows, name
    heuristic = np.asarray(jax.vmap(jax.random.fold_in, (None, 0))(keys.heuristics, jnp.array([500, 1000, 1500])))
    assert len({tuple(r) for r in heuristic}) == 3 and not {tuple(r) for r in heuristic} & as_rows
    config = blob_config("mixture", 4, 16)
    parts = rp.build_parts(config)
    state = rp.init_state(config, parts)
    np.testing.assert_array_equal(np.asarray(state.key), np.asarray(keys.train))
    from_init = models.init_params(keys.init, parts.model, config.event_shape)
    from_step1 = models.init_params(jax.random.fold_in(state.key, 1), parts.model, config.event_shape)
    for a, b, c in zip(jax.tree.leaves(state.params), jax.tree.leaves(from_init), jax.tree.leaves(from_step1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(np.asarray(a), np.asarray(c))
                   for a, c in zip(jax.tree.leaves(state.params), jax.tree.leaves(from_step1)))


def test_loop_keeps_the_step_count_on_the_host(tmp_path, monkeypatch):
    """20 steps without periodic checkpoints read nothing back from the device per step (before: the
    checkpointer called ``jax.device_get(state.step)`` after every step)."""
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real(x))
    rng = np.random.default_rng(1)
    run.train(blob_config("mixture", 20, 16, log_every=0), mixture_data(rng), tmp_path, progress=False)
    assert len(calls) <= 2, len(calls)  # the final save may read its state


def test_grid_elbo_decoding_is_untempered():
    """A likelihood bound is decoded at temperature 1: the mixture's posterior is exactly
    log_softmax(ELBO_k + log π) on the decoder's own draws (before: ELBO / training temperature)."""
    rng = np.random.default_rng(2)
    config = with_em(blob_config("mixture", 4, 16), temperature=dict(final=0.15))
    parts = rp.build_parts(config)
    state = rp.init_state(config, parts)
    state = state.replace(log_pi=jnp.log(jnp.array([0.5, 0.3, 0.2])))
    data = mixture_data(rng, 8)
    key = jax.random.PRNGKey(4)
    out = evaluation.predict_states(config, parts, state, data.images, num_t=8, estimator="elbo", key=key)
    elbo = emission.log_emission(parts.eps_fn, state.ema_params, parts.schedule, jnp.asarray(data.images),
                                 em.frame_keys(jax.random.fold_in(key, 0), 8), K, estimator="elbo", num_t=8)
    expected = jax.nn.log_softmax(elbo + state.log_pi, axis=-1)
    np.testing.assert_allclose(out["log_posterior"], np.asarray(expected), rtol=1e-5, atol=1e-4)
    assert evaluation.decoding_config(config, "elbo", 8).temperature.final == 1.0
    assert evaluation.decoding_config(config, None, 8).temperature.final == 0.15  # the tempered training scorer
    chosen = config.with_decisions({"decoding_temperature": 0.02})
    assert evaluation.decoding_config(chosen, None, 8).temperature.final == 0.02  # the decoding's own, when chosen
    assert evaluation.decoding_config(chosen, "elbo", 8).temperature.final == 0.02  # chosen for a bound too


@pytest.mark.parametrize("model_type", ["mixture", "hmdm"])
def test_epoch_prior_update_happens_inside_the_functional_step(model_type):
    """``priors.epoch_steps`` re-estimates π and A every ``epoch_steps`` steps in ``make_train_step``
    itself, from the counts of that epoch, then resets them (before: only ``train.train`` did it)."""
    rng = np.random.default_rng(3)
    config = with_em(blob_config(model_type, 4, 4), priors=dict(epoch_steps=2, learn_pi=True))
    parts = rp.build_parts(config)
    state = rp.init_state(config, parts)
    step = rp.make_step(config, parts)
    if model_type == "mixture":
        batches_ = [(lambda l: {"images": blobs(rng, l), "labels": l})(rng.integers(0, K, 16).astype(np.int32))
                    for _ in range(2)]
        first = lambda b: np.bincount(b["labels"], minlength=K)
        trans = lambda b: np.zeros((K, K))
    else:
        batches_ = [(lambda l: {"images": blobs(rng, l), "labels": l, "mask": np.ones(l.shape, bool)})(markov_labels(rng, 4, 6))
                    for _ in range(2)]
        first = lambda b: np.bincount(b["labels"][:, 0], minlength=K)

        def trans(b):
            t = np.zeros((K, K))
            for seq in b["labels"]:
                np.add.at(t, (seq[:-1], seq[1:]), 1)
            return t
    uniform = np.full(K, 1 / K)
    state, _ = step(state, batches_[0])
    np.testing.assert_allclose(np.exp(np.asarray(state.log_pi)), uniform, rtol=1e-6)  # mid-epoch: unchanged
    state, _ = step(state, batches_[1])
    counts = first(batches_[0]) + first(batches_[1])
    np.testing.assert_allclose(np.exp(np.asarray(state.log_pi)), (counts + 1) / (counts.sum() + K), rtol=1e-5)
    t = trans(batches_[0]) + trans(batches_[1])
    np.testing.assert_allclose(np.exp(np.asarray(state.log_A)), (t + 1) / (t + 1).sum(1, keepdims=True), rtol=1e-5)
    assert float(jnp.sum(state.class_counts)) == 0 and float(jnp.sum(state.transition_counts)) == 0
    with pytest.raises(ValueError, match="epoch_steps"):
        em.Priors(epoch_steps=0)


def test_the_core_and_run_layer_import_no_metrics_plotting_or_tensorflow():
    code = ("import sys, hmdm_jax, hmdm_jax.run, hmdm_jax.hmm, hmdm_jax.emission, hmdm_jax.diffusion\n"
            "bad = [m for m in ('hmdm_jax.metrics', 'matplotlib', 'tensorflow', 'tensorflow_datasets') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_make_demo_installs_the_core_only():
    """The README's first command installs no TensorFlow: the demo's install names no extra, and the core
    dependencies have no TensorFlow (it belongs to the data and test extras)."""
    dry = subprocess.run(["make", "-n", "-B", "demo", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    installs = [line for line in dry.splitlines() if "pip install" in line and "-e" in line]
    assert installs and not [line for line in installs if "[" in line], installs
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if "tensorflow" in d]
    assert any("tensorflow" in d for d in project["optional-dependencies"]["data"])


def test_a_used_workdir_is_refused_unless_overwrite(tmp_path):
    rng = np.random.default_rng(4)
    data, config = mixture_data(rng), blob_config("mixture", 3, 16)
    run.train(config, data, tmp_path, progress=False)
    first = checkpoint.latest_step(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="already holds a run .*--resume .*--overwrite"):
        run.train(dataclasses.replace(config, loop=dataclasses.replace(config.loop, train_steps=2)), data, tmp_path,
                  progress=False)
    assert checkpoint.latest_step(tmp_path / "checkpoints") == first == 3
    run.train(dataclasses.replace(config, loop=dataclasses.replace(config.loop, train_steps=2)), data, tmp_path,
              progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    assert all(json.loads(line)["step"] <= 2 for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        run.train(config, data, tmp_path / "file", progress=False)
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="nothing to resume"):
        run.train(config, data, tmp_path / "empty", progress=False, resume=True)
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("batch_size", [0, -2, 65])
def test_bad_batch_sizes_are_refused_before_the_workdir_is_made(tmp_path, batch_size):
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="batch_size"):
        config = blob_config("mixture", 3, batch_size)
        run.train(config, mixture_data(rng), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_stop_request_during_the_final_save_is_honoured(tmp_path, monkeypatch):
    """A SIGINT that arrives after the last stop check (here: during the final forced save) still ends the
    run as stopped, with its checkpoint and a message, so the caller skips its evaluation."""
    real_save = checkpoint.Checkpointer.save

    def save(self, state, **kwargs):
        if kwargs.get("force"):
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(self, state, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    rng = np.random.default_rng(6)
    result = run.train(blob_config("mixture", 3, 16), mixture_data(rng), tmp_path, progress=False)
    assert result.stopped_early and checkpoint.latest_step(tmp_path / "checkpoints") == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 3, "stopped": 3}


def test_resume_says_where_it_resumes(tmp_path, capsys):
    rng = np.random.default_rng(7)
    data, config = mixture_data(rng), blob_config("mixture", 6, 16)
    run.train(config, data, tmp_path, progress=False, stop_after=4)
    run.train(config, data, tmp_path, progress=False, resume=True)
    assert "resuming from step 4 of 6" in capsys.readouterr().out


def test_the_train_state_is_arrays_only_whatever_the_config():
    """Changing an option does not change the state's pytree structure (the config is not in the state;
    the checkpointer saves it beside)."""
    a, b = blob_config("mixture", 4, 16), with_em(blob_config("mixture", 4, 16), temperature=dict(final=0.5))
    structure = lambda c: jax.tree.structure(rp.init_state(c, rp.build_parts(c)))
    assert structure(a) == structure(b)
