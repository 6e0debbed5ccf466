"""Restarts chosen by the HMDM's held-out bound (``restarts`` in the config): the split, the candidates, the
choice, the exact continuation and resume, and that the bound ranks a model that found the states above one
that merged two, on the 2-D blobs of tests/blobs.py."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmdm_jax import checkpoint, run, warm_start
from hmdm_jax.run import parts as rp
from hmdm_jax.run import restarts
from hmdm_jax.run.batches import Clamp, TrainData
from tests.blobs import K, STICKY_A, blob_config, blobs, markov_labels, with_em


def sequences(seed, num_sequences=24, length=10):
    rng = np.random.default_rng(seed)
    labels = markov_labels(rng, num_sequences, length)
    return TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))


def with_restarts(config, **fields):
    return dataclasses.replace(config, restarts=dataclasses.replace(config.restarts, **fields))


def test_the_split_is_disjoint_seeded_and_leaves_a_batch():
    data = sequences(0, num_sequences=40)
    config = with_restarts(blob_config("hmdm", 20, 4), count=2, steps=10, heldout_fraction=0.25)
    split = restarts.split_sequences(config, data)
    held = np.setdiff1d(np.arange(40), split.train_index)
    assert len(split.train_index) == 30 and len(held) == 10
    np.testing.assert_array_equal(split.train.images, data.images[split.train_index])
    np.testing.assert_array_equal(split.heldout.labels, data.labels[held])
    np.testing.assert_array_equal(restarts.split_sequences(config, data).train_index, split.train_index)
    other = restarts.split_sequences(dataclasses.replace(config, seed=1), data).train_index
    assert not np.array_equal(other, split.train_index)
    with pytest.raises(ValueError, match="fewer than loop.batch_size = 36"):
        restarts.split_sequences(dataclasses.replace(config, loop=dataclasses.replace(config.loop, batch_size=36)), data)


def test_candidates_have_their_own_seed_and_warm_start_and_no_restarts():
    config = with_restarts(blob_config("hmdm", 20, 4, warm_start="kmeans"), count=3, steps=10,
                           methods=("kmeans", "ward"))
    cands = [restarts.candidate_config(config, r) for r in range(3)]
    assert cands[0].seed == config.seed and len({c.seed for c in cands}) == 3
    assert [c.warm_start.method for c in cands] == ["kmeans", "ward", "kmeans"]
    assert all(not c.restarts.active and c.loop == config.loop for c in cands)
    no_methods = restarts.candidate_config(with_restarts(config, methods=()), 1)
    assert no_methods.warm_start == config.warm_start
    held = with_restarts(config, methods=("kmeans", "ward:held"))
    assert [restarts.is_held(held, r) for r in range(3)] == [False, True, False]
    assert restarts.candidate_config(held, 1).warm_start == dataclasses.replace(config.warm_start, method="ward", steps=10)
    assert restarts.candidate_config(held, 2).warm_start == config.warm_start
    whole = with_restarts(held, steps=None)
    assert restarts.candidate_config(whole, 1).warm_start.steps == config.loop.train_steps


def test_widened_clamp_frees_the_heldout_sequences():
    clamp = Clamp(7, np.array([[1, 2], [0, -1]], np.int32))
    wide = restarts.widen_clamp(clamp, np.array([0, 2]), (3, 2))
    assert wide.until == 7
    np.testing.assert_array_equal(wide.labels, [[1, 2], [-1, -1], [0, -1]])
    assert restarts.widen_clamp(None, np.array([0]), (1, 2)) is None


@pytest.mark.parametrize("fields, match", [
    (dict(count=2, steps=31), "must be at most loop.train_steps"),
    (dict(count=2, steps=5), "must cover the warm start"),
])
def test_bad_restart_settings_are_refused_before_anything_is_written(tmp_path, fields, match):
    config = with_restarts(blob_config("hmdm", 30, 4, warm_start="kmeans", warm_start_steps=10), **fields)
    with pytest.raises(ValueError, match=match):
        run.train(config, sequences(0), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    mixture = with_restarts(blob_config("mixture", 30, 4), count=2, steps=10)
    with pytest.raises(ValueError, match="it has no chain"):
        run.train(mixture, TrainData(np.zeros((8, 2), np.float32), np.zeros(8, np.int32), np.zeros(8, bool)),
                  tmp_path / "mix", progress=False)
    for methods in (("kmeans", "spectral"), ("kmeans:hold",), ("none:held",)):
        with pytest.raises(ValueError, match="restarts.methods"):
            with_restarts(config, methods=methods)


def test_the_run_continues_the_best_candidate_exactly_and_resumes_without_restarting(tmp_path):
    """Three candidates of 8 steps: the one of highest logged chain share continues; its state at the choice equals that
    candidate's config trained alone on the same share; a run stopped after the choice and resumed equals
    the uninterrupted one bit for bit, without training candidates again."""
    data = sequences(1)
    config = with_restarts(blob_config("hmdm", 14, 4, warm_start="kmeans", warm_start_steps=4, reseed_every=0),
                           count=3, steps=8, heldout_fraction=0.25, methods=("kmeans", "ward"), num_t=8, criterion="chain")
    whole = run.train(config, data, tmp_path / "whole", progress=False)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    scores = {r["restart"]: r["restart_scores"] for r in records if "restart_scores" in r}
    chain = {r: s["chain"] for r, s in scores.items()}
    choice = next(r["restarts"] for r in records if "restarts" in r)
    assert sorted(scores) == [0, 1, 2] and len(set(chain.values())) == 3 and choice["criterion"] == "chain"
    assert choice["chosen"] == max(chain, key=chain.get) and choice["scores"] == [chain[r] for r in range(3)]
    assert choice["bounds"] == [scores[r]["bound"] for r in range(3)]
    for s in scores.values():
        assert s["chain"] == pytest.approx(s["bound"] - s["framewise"])
    assert whole.decisions["restarts"] == choice and int(whole.state.step) == 14

    # the continued state is the chosen candidate's: its config trained alone on the candidates' share
    split = restarts.split_sequences(config, data)
    alone = run.train(restarts.candidate_config(config, choice["chosen"]), split.train, tmp_path / "alone",
                      progress=False, stop_after=8).state
    _, _, at_choice, metadata = rp.load_run(tmp_path / "whole", step=8)
    assert metadata["decisions"]["restarts"] == choice
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(at_choice)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    run.train(config, data, tmp_path / "split", progress=False, stop_after=2)
    assert checkpoint.latest_step(tmp_path / "split" / "checkpoints") == 10
    resumed = run.train(config, data, tmp_path / "split", progress=False, resume=True)
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    after = lines[[i for i, line in enumerate(lines) if '"resumed"' in line][0]:]
    assert not any('"restart"' in line for line in after)
    assert resumed.decisions["restarts"] == choice


def test_the_stationary_distribution_solves_pi_A_equals_pi():
    two = np.log(np.array([[0.9, 0.1], [0.3, 0.7]]))
    np.testing.assert_allclose(np.exp(restarts.stationary_log_distribution(two)), [0.75, 0.25], atol=1e-6)
    cycle = np.log(np.roll(np.eye(4), 1, axis=1) + 1e-30)  # periodic: powers of A never converge, π is uniform
    np.testing.assert_allclose(np.exp(restarts.stationary_log_distribution(cycle)), np.full(4, 0.25), atol=1e-6)
    pi = np.exp(restarts.stationary_log_distribution(np.log(STICKY_A)))
    np.testing.assert_allclose(pi @ STICKY_A, pi, atol=1e-6)


def test_the_scores_rank_the_true_states_above_a_merged_pair(tmp_path):
    """The same network trained with every label observed, once with the true states and once with blobs 1
    and 2 given one state (state 2 empty): on held-out sequences the bound and the chain's share of the true
    states are higher; for the same network a uniform chain explains nothing beyond the frames (chain share 0,
    the bound equal to the frame-wise one) and the true chain scores above it. Scores that ignored the chain
    or the states could not pass."""
    data, held = sequences(2, num_sequences=32, length=12), sequences(3, num_sequences=16, length=12)
    config = with_restarts(blob_config("hmdm", 300, 8, reseed_every=0), num_t=32)
    bounds = {}
    for name, labels in (("true", data.labels), ("merged", np.where(data.labels == 2, 1, data.labels))):
        observed = TrainData(data.images, labels.astype(np.int32), np.ones(labels.shape, bool), data.mask)
        result = run.train(config, observed, tmp_path / name, progress=False)
        parts, state = result.parts, result.state
        key = jax.random.PRNGKey(0)
        bounds[name] = restarts.heldout_scores(config, parts, state, held, key)
        if name == "true":
            uniform = state.replace(log_pi=jnp.full(K, -np.log(K)), log_A=jnp.full((K, K), -np.log(K)))
            bounds["uniform chain"] = restarts.heldout_scores(config, parts, uniform, held, key)
            np.testing.assert_allclose(np.exp(np.asarray(state.log_A)), STICKY_A, atol=0.06)
    true, merged, uniform = bounds["true"], bounds["merged"], bounds["uniform chain"]
    assert true.bound > merged.bound + 0.1 and true.chain > merged.chain + 0.1, bounds
    assert true.bound > uniform.bound + 0.1 and true.chain > 0.1, bounds
    assert abs(uniform.chain) < 1e-4 and uniform.framewise == pytest.approx(true.framewise, abs=0.05), bounds


def test_whole_run_candidates_keep_the_chosen_one_as_the_result(tmp_path):
    """``restarts.steps=None``: every candidate trains the whole run and the chosen one is the result, step
    for step the candidate trained alone on the candidates' share (nothing continues on the held-out share)."""
    data = sequences(4)
    config = with_restarts(blob_config("hmdm", 8, 4, warm_start="kmeans", warm_start_steps=4, reseed_every=0),
                           count=2, heldout_fraction=0.25, methods=("kmeans", "ward"), num_t=8, criterion="bound")
    assert config.restarts.steps is None and config.restarts.candidate_steps(8) == 8
    result = run.train(config, data, tmp_path / "whole", progress=False)
    choice = result.decisions["restarts"]
    assert int(result.state.step) == 8 and choice["criterion"] == "bound"
    assert choice["chosen"] == int(np.argmax(choice["bounds"]))
    alone = run.train(restarts.candidate_config(config, choice["chosen"]), restarts.split_sequences(config, data).train,
                      tmp_path / "alone", progress=False).state
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(result.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_whose_em_would_end_below_its_start_keeps_the_start_held_and_says_so(tmp_path, capsys):
    """The constructed failure: a mixture on the three blobs whose E-step is so flat (temperature 1e4) that EM
    spreads every blob over every class and ends near chance, far below its k-means start. With the start
    also trained held (``"kmeans:held"``, the start clamped for the whole candidate), the mixture's bound on the
    held-out images chooses the held candidate, the run ends at least at its start's accuracy, and the log says
    why. Without the held candidate (the old default) the same run ends below its start."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, K, 600).astype(np.int32)
    data = TrainData(blobs(rng, labels), labels, np.zeros(600, bool))
    flat = with_em(blob_config("mixture", 400, 64, warm_start="kmeans", warm_start_steps=50, reseed_every=0),
                   temperature=dict(final=1e4))
    accuracy = lambda result: run.score_states(labels, run.predict_states(
        result.config, result.parts, result.state, data.images, None, num_t=16)["states"], K)["accuracy"]
    start = run.score_states(labels, warm_start.kmeans_labels(data.images, K, seed=0), K)["accuracy"]
    assert start > 0.99  # the blobs are separated: k-means finds them

    em_only = run.train(flat, data, tmp_path / "em", progress=False)
    assert accuracy(em_only) < start - 0.2  # EM alone ends far below its start

    guarded = with_restarts(flat, count=2, methods=("kmeans", "kmeans:held"), criterion="bound", num_t=16,
                            heldout_fraction=0.2)
    result = run.train(guarded, data, tmp_path / "guarded", progress=False)
    choice = result.decisions["restarts"]
    assert choice["chosen"] == 1 and choice["held"] and choice["scores"][1] > choice["scores"][0] + 0.1, choice
    assert accuracy(result) >= start - 0.01
    assert "start held for all 400 steps scores above every EM candidate" in capsys.readouterr().out


def test_a_candidate_that_drifts_from_its_start_is_kept_at_its_best_snapshot_and_says_so(tmp_path, capsys):
    """The constructed drift: HMDM on the sticky blob sequences, k-means start held for 200 steps, then an E-step
    so flat (temperature 1e4) that EM samples the states from the chain alone, the classes' networks become
    alike and the chain explains nothing any more. Without snapshots the run ends far below its start. With
    ``restarts.snapshot_every`` (two candidates from k-means) the chosen one's best held-out chain share among
    its snapshots beats its last state's by two standard errors, the run keeps that snapshot (its parameters
    and chain bit for bit those of the candidate trained alone to that step), ends at its start's accuracy, and
    the log says so. A run that does not
    drift (the E-step at its usual temperature) keeps its last state."""
    data, held = sequences(6, num_sequences=40, length=12), sequences(7, num_sequences=16, length=12)
    flat = with_em(blob_config("hmdm", 500, 8, warm_start="kmeans", warm_start_steps=200, reseed_every=0),
                   temperature=dict(final=1e4))
    usual = blob_config("hmdm", 500, 8).em.temperature  # decoded at the usual temperature, not the flat one
    accuracy = lambda result: run.score_states(held.labels, run.predict_states(
        with_em(result.config, temperature=usual), result.parts, result.state, held.images, held.mask,
        num_t=16)["states"], K)["accuracy"]
    start = run.score_states(data.labels.reshape(-1), warm_start.kmeans_labels(data.images.reshape(-1, 2), K, seed=0),
                             K)["accuracy"]
    assert start > 0.99

    drifted = run.train(flat, data, tmp_path / "em", progress=False)
    assert accuracy(drifted) < start - 0.2

    guarded = with_restarts(flat, count=2, methods=("kmeans", "kmeans"), snapshot_every=50, num_t=8,
                            heldout_fraction=0.25)
    result = run.train(guarded, data, tmp_path / "guarded", progress=False)
    chosen = result.decisions["restarts"]["chosen"]
    records = [json.loads(line) for line in (tmp_path / "guarded" / "metrics.jsonl").read_text().splitlines()]
    offered = {r["snapshot"]["step"]: r["snapshot"]["chain"] for r in records
               if "snapshot" in r and r["restart"] == chosen}
    assert sorted(offered) == [200, 250, 300, 350, 400, 450]
    snapshot = result.decisions["snapshot"]
    best = max(offered, key=offered.get)
    assert snapshot["kept"] and snapshot["step"] == best and snapshot["z"] > 2, snapshot
    assert snapshot["chain"] == pytest.approx(offered[best]) and snapshot["chain"] > snapshot["chain_last"] + 0.01
    assert result.decisions["restarts"]["snapshot"] == snapshot
    assert int(result.state.step) == 500 and accuracy(result) >= start - 0.01
    alone = run.train(restarts.candidate_config(guarded, chosen), restarts.split_sequences(guarded, data).train,
                      tmp_path / "alone", progress=False, stop_after=best).state
    for a, b in zip(jax.tree.leaves((alone.params, alone.log_A)), jax.tree.leaves((result.state.params, result.state.log_A))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = capsys.readouterr().out
    assert f"the step-{best} snapshot against the last state" in out and f"the candidate is its step-{best} state" in out

    steady = run.train(with_restarts(blob_config("hmdm", 300, 8, warm_start="kmeans", warm_start_steps=50,
                                                 reseed_every=0), count=2, snapshot_every=100, num_t=8,
                                     heldout_fraction=0.25),
                       data, tmp_path / "steady", progress=False)
    assert not steady.decisions.get("snapshot", {"kept": False})["kept"] and accuracy(steady) > 0.99
