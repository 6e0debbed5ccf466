"""``reseed.check_moves``: a split–merge move, and a re-seeding, is first tried. Two copies of the run train one
re-seeding period on the same batches, with and without the move; the move is taken only when the chain's share
of the HMDM bound on training sequences is higher with it by ``reseed.trial_z`` standard errors (paired over the
sequences). A move that loses leaves the run exactly as a run without moves, and no further move is tried; a
re-seeding that loses makes states that used no longer dead; nothing is tried where its trial would not fit."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from hmdm_jax import moves, run
from hmdm_jax.run import config as rc
from hmdm_jax.run import hooks
from hmdm_jax.run import parts as rp
from hmdm_jax.run.batches import TrainData
from tests.blobs import blob_config, blobs, markov_labels


def sequences(seed=2, n=16, length=6):
    rng = np.random.default_rng(seed)
    labels = markov_labels(rng, n, length)
    return TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))


def checked_config(steps=20, **loop):
    config = blob_config("hmdm", steps, 4, warm_start_steps=0, **loop)
    # min_usage 0: no state counts as dead, so every check may propose a move
    return config.replace(reseed=rc.ReseedConfig(every=4, steps=2, min_usage=0.0, split_merge=True, check_moves=True,
                                                 copy_parent=True))


def without_moves(config):
    return config.replace(reseed=dataclasses.replace(config.reseed, split_merge=False, check_moves=False))


@pytest.fixture
def fake_moves(monkeypatch):
    """Every check proposes a move (clamping the decoded states, one of them moved). ``score(step, with_move)``
    sets the chain share: a trial scores the copy without the move, then the copy with it."""
    calls, scored = [], []

    def propose(data, states, num_classes, seed, log_emissions=None, min_z=moves.MIN_Z):
        calls.append(np.array(states))
        moved = np.where(states == 0, 2, states)  # a change the trained copies must show
        move = moves.SplitMerge(0, (1, 2), 10.0, 1.0, 5.0, moved[data.valid])
        return np.where(data.valid, moved, -1).astype(np.int32), move

    def score(ctx, state):
        scored.append(jax.device_get(state))  # the loop donates the states it trains on
        n = min(hooks.MOVE_CHECK_SEQUENCES, len(ctx.data.images))
        per_frame = np.broadcast_to(control["score"](int(state.step), len(scored) % 2 == 0), (n,))
        return per_frame * ctx.data.valid[:n].sum(axis=1)  # per sequence, summed over its frames

    monkeypatch.setattr(hooks, "split_merge_labels", propose)
    control = {"score": lambda step, with_move: 0.0, "scored": scored}
    monkeypatch.setattr(hooks, "move_score", score)
    return calls, control


def records(workdir, name):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if name in r]


def assert_same_state(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_move_that_loses_its_trial_is_not_taken_and_the_run_is_the_run_without_moves(tmp_path, fake_moves):
    calls, control = fake_moves
    control["score"] = lambda step, with_move: -float(with_move)
    config = checked_config()
    result = run.train(config, sequences(), tmp_path / "moves", progress=False)
    assert len(calls) == 1 and result.decisions["moves_rejected"] == [4]
    (move,) = records(tmp_path / "moves", "split_merge")
    assert move["step"] == 4 and move["split_merge"]["trial"] == {"step": 8, "chain_without": 0.0, "chain_with": -1.0,
                                                                  "z": -np.inf, "taken": False}
    assert "clamped_until" not in move
    reference = run.train(without_moves(config), sequences(), tmp_path / "plain", progress=False)
    assert_same_state(result.state, reference.state)
    # the copy trained without the move is bit for bit that run at the trial's end
    without = control["scored"][0]
    assert int(without.step) == 8
    assert_same_state(without, run.train(without_moves(config), sequences(), tmp_path / "plain8", progress=False,
                                         stop_after=8).state)


def test_a_move_that_wins_is_taken_as_tried_and_no_move_is_tried_too_late(tmp_path, fake_moves):
    calls, control = fake_moves
    control["score"] = lambda step, with_move: float(with_move)
    config = checked_config(steps=14)
    result = run.train(config, sequences(), tmp_path, progress=False)
    # checks at 4, 8 (step + 2 clamped steps < 14; 12 + 2 is not); a trial must fit: 4 and 8, not 12
    assert len(calls) == 2 and "moves_rejected" not in result.decisions
    taken = [r for r in records(tmp_path, "split_merge") if r["split_merge"] is not None]
    assert [r["step"] for r in taken] == [4, 8] and all(r["split_merge"]["trial"]["taken"] for r in taken)
    assert [r["clamped_until"] for r in taken] == [6, 10]
    # the copy tried with the first move is the state the run then had at step 8 (scored again by its check)
    with_move, without = control["scored"][1], control["scored"][0]
    assert int(with_move.step) == 8 and not np.array_equal(np.asarray(with_move.log_A), np.asarray(without.log_A))
    # (a 10-step run takes the move at 4 and no other: at 8 the hook does nothing, 8 + 2 clamped steps do not fit)
    stopped = run.train(checked_config(steps=10), sequences(), tmp_path / "to8", progress=False, stop_after=8)
    assert_same_state(with_move, stopped.state)


def test_a_run_stopped_after_a_move_resumes_bit_exact(tmp_path, fake_moves):
    _, control = fake_moves
    control["score"] = lambda step, with_move: float(with_move)
    config = checked_config(checkpoint_every=3)
    whole = run.train(config, sequences(), tmp_path / "whole", progress=False)
    run.train(config, sequences(), tmp_path / "split", progress=False, stop_after=6)  # inside the move's clamp
    resumed = run.train(config, sequences(), tmp_path / "split", progress=False, resume=True)
    assert_same_state(whole.state, resumed.state)


def test_a_tie_or_a_gain_within_the_noise_is_not_taken(tmp_path, fake_moves):
    calls, control = fake_moves
    control["score"] = lambda step, with_move: 0.0
    assert "moves_rejected" in run.train(checked_config(), sequences(), tmp_path / "tie", progress=False).decisions
    # a mean gain of 0.05 nats per frame whose sequences scatter by ±1: z = 0.05 √16 ≈ 0.2 < 2
    scatter = np.where(np.arange(16) % 2 == 0, 1.0, -1.0)
    control["score"] = lambda step, with_move: 0.05 + scatter if with_move else np.zeros(16)
    result = run.train(checked_config(), sequences(), tmp_path / "noise", progress=False)
    (move,) = records(tmp_path / "noise", "split_merge")
    assert move["split_merge"]["trial"]["chain_with"] == pytest.approx(0.05)
    assert 0 < move["split_merge"]["trial"]["z"] < 1 and result.decisions["moves_rejected"] == [4]
    # the same gain without the scatter is significant
    control["score"] = lambda step, with_move: 0.05 * float(with_move) + 0.001 * scatter
    result = run.train(checked_config(), sequences(), tmp_path / "gain", progress=False)
    assert "moves_rejected" not in result.decisions


def test_move_score_is_the_chain_share_on_the_first_training_sequences():
    data = sequences(n=40)
    config = checked_config()
    parts = rp.build_parts(config)
    state = rp.init_state(config, parts)
    ctx = hooks.RunContext(config, parts, data, None, None, rp.streams(0), None, lambda r, m: None, None)
    n = hooks.MOVE_CHECK_SEQUENCES
    first = TrainData(data.images[:n], data.labels[:n], data.observed[:n], data.mask[:n])
    key = jax.random.fold_in(rp.streams(0).heuristics, hooks.MOVE_STREAM)
    expected = run.restarts.heldout_scores(config, parts, state, first, key).chain
    per_sequence = hooks.move_score(ctx, state)
    assert per_sequence.shape == (n,) and np.isfinite(expected)
    assert per_sequence.sum() / first.mask.sum() == pytest.approx(expected)


def test_check_moves_is_refused_for_the_mixture():
    config = blob_config("mixture", 10, 8)
    bad = config.replace(reseed=dataclasses.replace(config.reseed, check_moves=True))
    with pytest.raises(ValueError, match="check_moves"):
        bad.check()


@pytest.fixture
def fake_scores(monkeypatch):
    """``score(with_move)`` sets the chain share (nats per frame) of the copy trained with a move or without."""
    control = {"score": lambda with_move: 0.0, "calls": 0}

    def score(ctx, state):
        control["calls"] += 1  # a trial scores the copy without the move, then the copy with it
        n = min(hooks.MOVE_CHECK_SEQUENCES, len(ctx.data.images))
        return np.full(n, control["score"](control["calls"] % 2 == 0)) * ctx.data.valid[:n].sum(axis=1)

    monkeypatch.setattr(hooks, "move_score", score)
    return control


def reseed_config(steps=20, min_usage=1.0):
    config = blob_config("hmdm", steps, 4, warm_start_steps=0)
    # min_usage 1: a state used by fewer than 1/K of the frames counts as dead, and with a number of frames
    # that K does not divide (reseed_data) one always is
    return config.replace(reseed=rc.ReseedConfig(every=4, steps=2, min_usage=min_usage, check_moves=True,
                                                 copy_parent=True))


def reseed_data():
    return sequences(length=7)


def test_a_reseeding_that_loses_its_trial_makes_that_usage_legitimate_and_leaves_the_run_untouched(tmp_path,
                                                                                                 fake_scores):
    fake_scores["score"] = lambda with_move: -float(with_move)
    result = run.train(reseed_config(), reseed_data(), tmp_path / "lost", progress=False)
    tried = records(tmp_path / "lost", "reseed")
    assert tried and all(len(r["reseed"]) == 1 and not r["trial"]["taken"] for r in tried)  # the least used alone
    usages = [r["reseed"][0]["usage"] for r in tried]
    # after each loss only a state used less than the refused one is dead
    assert all(later < earlier for earlier, later in zip(usages, usages[1:]))
    assert result.decisions["reseed_refused_usage"] == usages[-1]
    assert not any("clamped_until" in r for r in tried)
    reference = run.train(reseed_config(min_usage=0.0), reseed_data(), tmp_path / "plain", progress=False)
    assert_same_state(result.state, reference.state)


def test_a_reseeding_that_wins_is_clamped_and_none_is_tried_too_late(tmp_path, fake_scores):
    fake_scores["score"] = lambda with_move: float(with_move)
    result = run.train(reseed_config(steps=15), reseed_data(), tmp_path, progress=False)
    tried = records(tmp_path, "reseed")
    # checks at 4 and 8 fit a 4-step trial; at 12 the clamp fits (12 + 2 < 15) but the trial would end past 15
    assert [r["step"] for r in tried] == [4, 8, 12]
    assert [r["trial"]["taken"] for r in tried[:2]] == [True, True] and tried[2]["trial"] is None
    assert [r.get("clamped_until") for r in tried] == [6, 10, None]
    assert "reseed_refused_usage" not in result.decisions


def test_a_state_no_frame_decodes_to_is_reseeded_untried(tmp_path, fake_scores, monkeypatch):
    fake_scores["score"] = lambda with_move: -float(with_move)  # any trial would lose
    decode = hooks.predict_states

    def without_state_2(*args, **kwargs):
        decoded = decode(*args, **kwargs)
        return {**decoded, "states": np.where(decoded["states"] == 2, 0, decoded["states"])}

    monkeypatch.setattr(hooks, "predict_states", without_state_2)
    result = run.train(reseed_config(steps=7), reseed_data(), tmp_path, progress=False)
    (record,) = records(tmp_path, "reseed")
    assert record["reseed"] == [{"dead": 2, "split": record["reseed"][0]["split"], "usage": 0.0}]
    assert "trial" not in record and record["clamped_until"] == 6 and fake_scores["calls"] == 0
    assert "reseed_refused_usage" not in result.decisions
