"""``reseed.check_moves``: a split–merge move is checked one re-seeding period later by the chain's share of
the HMDM bound on training sequences against the run without the move (a copy trained over the same steps
on the same batches), undone when it is lower (the states decoded before it clamped back, no further move),
kept otherwise; moves are only taken where their check fits in the run, and a move pending at a stop is
checked after the resume exactly as without the stop."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from hmdm_jax import moves, run
from hmdm_jax.run import config as rc
from hmdm_jax.run import hooks
from hmdm_jax.run import parts as rp
from hmdm_jax.run.batches import Clamp, TrainData
from tests.blobs import K, blob_config, blobs, markov_labels


def sequences(seed=2, n=16, length=6):
    rng = np.random.default_rng(seed)
    labels = markov_labels(rng, n, length)
    return TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))


def checked_config(steps=20, **loop):
    config = blob_config("hmdm", steps, 4, warm_start_steps=0, **loop)
    # min_usage 0: no state counts as dead, so every check may propose a move
    return config.replace(reseed=rc.ReseedConfig(every=4, steps=2, min_usage=0.0, split_merge=True, check_moves=True))


@pytest.fixture
def fake_moves(monkeypatch):
    """Every check proposes a move (clamping the decoded states). ``score(step, with_move)`` sets the chain
    share: the scores alternate, the run without the move (at the move) then the run with it (at its check)."""
    calls, scored = [], []

    def propose(data, states, num_classes, seed, log_emissions=None, min_z=moves.MIN_Z):
        calls.append(np.array(states))
        move = moves.SplitMerge(0, (1, 2), 10.0, 1.0, 5.0, np.zeros(data.valid.sum(), np.int32))
        return np.where(data.valid, states, -1).astype(np.int32), move

    def score(ctx, state):
        scored.append(jax.device_get(state))  # the loop donates the state it goes on with
        return float(control["score"](int(state.step), len(scored) % 2 == 0))

    monkeypatch.setattr(hooks, "split_merge_labels", propose)
    control = {"score": lambda step, with_move: 0.0, "scored": scored}
    monkeypatch.setattr(hooks, "move_score", score)
    return calls, control


def records(workdir, name):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if name in r]


def test_a_move_that_lowers_the_chain_share_is_undone_and_ends_the_moves(tmp_path, fake_moves):
    calls, control = fake_moves
    control["score"] = lambda step, with_move: -step - with_move  # the move at step 4 is undone at 8
    result = run.train(checked_config(), sequences(), tmp_path, progress=False)
    assert len(calls) == 1 and result.decisions["moves_undone"] == [4]
    (check,) = records(tmp_path, "move_check")
    assert check["step"] == 8 and check["move_check"] == {"step": 4, "check_step": 8, "chain_without": -8.0,
                                                          "chain_with": -9.0, "kept": False}


def test_a_move_that_keeps_the_chain_share_is_kept_and_no_move_is_taken_too_late_to_check(tmp_path, fake_moves):
    calls, control = fake_moves
    control["score"] = lambda step, with_move: -step  # equal at the check: kept
    result = run.train(checked_config(), sequences(), tmp_path, progress=False)
    # checks at 4, 8, 12, 16 (step + 2 clamped steps < 20); a move's check must fit: 4, 8, 12, not 16
    assert len(calls) == 3 and "moves_undone" not in result.decisions
    assert [r["move_check"]["kept"] for r in records(tmp_path, "move_check")] == [True, True, True]
    late = [r for r in records(tmp_path, "split_merge") if r["split_merge"] is None]
    assert [r["step"] for r in late] == [16]


def test_the_undo_clamps_the_states_decoded_before_the_move(fake_moves):
    _, control = fake_moves
    data = sequences()
    config = checked_config()
    parts = rp.build_parts(config)
    state = rp.init_state(config, parts).replace(step=np.int32(9))
    before = np.random.default_rng(0).integers(0, K, data.labels.shape).astype(np.int32)
    logged = []
    ctx = hooks.RunContext(config, parts, data, None, None, rp.streams(0), None, lambda r, m: logged.append(m), None)
    control["score"] = lambda step, with_move: -10.0
    loop = hooks.LoopState(9, state, pending_move=hooks.PendingMove(5, 9, -9.0, before))
    assert hooks.check_move(ctx, loop)
    assert loop.pending_move is None and loop.clamp.until == 9 + config.reseed.steps
    np.testing.assert_array_equal(loop.clamp.labels, before)
    assert "undone" in logged[0] and loop.decisions["moves_undone"] == [5]
    kept = hooks.LoopState(9, state, clamp=Clamp(3, before), pending_move=hooks.PendingMove(5, 9, -10.0, before))
    assert not hooks.check_move(ctx, kept) and kept.clamp.until == 3 and "kept" in logged[1]


def test_a_pending_move_survives_a_stop_and_the_resumed_run_is_bit_exact(tmp_path, fake_moves):
    calls, control = fake_moves
    control["score"] = lambda step, with_move: -step - with_move
    config = checked_config(checkpoint_every=3)
    whole = run.train(config, sequences(), tmp_path / "whole", progress=False)
    run.train(config, sequences(), tmp_path / "split", progress=False, stop_after=6)  # the move at 4 is pending
    resumed = run.train(config, sequences(), tmp_path / "split", progress=False, resume=True)
    assert resumed.decisions["moves_undone"] == whole.decisions["moves_undone"] == [4]
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_run_without_the_move_is_the_run_without_split_merge(tmp_path, fake_moves):
    """The state scored as "without the move" is bit for bit the state a run with no moves has at the check step."""
    _, control = fake_moves
    config = checked_config(steps=12)  # one move, at step 4, checked at 8
    run.train(config, sequences(), tmp_path / "moves", progress=False)
    without = control["scored"][0]
    assert int(without.step) == 8
    plain = config.replace(reseed=dataclasses.replace(config.reseed, split_merge=False, check_moves=False))
    reference = run.train(plain, sequences(), tmp_path / "plain", progress=False, stop_after=8).state
    for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and the move changed the run: the state checked with the move differs
    with_move = control["scored"][1]
    assert int(with_move.step) == 8 and not np.array_equal(np.asarray(with_move.log_A), np.asarray(without.log_A))


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
    assert hooks.move_score(ctx, state) == pytest.approx(expected) and np.isfinite(expected)


def test_check_moves_is_refused_for_the_mixture():
    config = blob_config("mixture", 10, 8)
    bad = config.replace(reseed=dataclasses.replace(config.reseed, check_moves=True))
    with pytest.raises(ValueError, match="check_moves"):
        bad.check()
