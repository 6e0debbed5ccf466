"""The label-free split–merge move: on a constructed assignment with two clusters forced into one state and
one cluster shared by two states (the fixed point EM and dead-state re-seeding cannot leave), it finds the
one move that repairs it, and on a correct assignment it proposes nothing."""
import numpy as np
import pytest

from hmdm_jax import matching, moves
from hmdm_jax.run.batches import TrainData
from hmdm_jax.run.hooks import revived_labels, split_merge_labels

CLUSTERS = 4


def clustered(rng, per_cluster=(150,) * CLUSTERS, dims=6, spread=0.3):
    centres = 3.0 * np.eye(CLUSTERS, dims)
    truth = np.repeat(np.arange(CLUSTERS), per_cluster)
    return centres[truth] + spread * rng.standard_normal((len(truth), dims)), truth


def merged_and_shared(truth, rng):
    """State 0 holds clusters 0 and 1; cluster 2 is split at random between states 1 and 2; state 3 = cluster 3."""
    states = np.select([truth <= 1, truth == 2], [0, 1 + rng.integers(0, 2, len(truth))], 3).astype(np.int32)
    assert matching.matched_accuracy(truth, states, CLUSTERS, CLUSTERS)[0] < 0.8
    return states


def test_the_move_splits_the_double_state_and_merges_the_shared_pair():
    rng = np.random.default_rng(0)
    x, truth = clustered(rng)
    move = moves.split_merge_move(x, merged_and_shared(truth, rng), CLUSTERS)
    assert move is not None and move.split == 0 and sorted(move.merge) == [1, 2]
    # held out, the split of two clusters gains and the merge of one cluster's two halves costs nothing
    assert move.gain > 0 > move.loss and move.net_per_frame > 0
    assert matching.matched_accuracy(truth, move.states, CLUSTERS, CLUSTERS)[0] == 1.0


def test_no_move_where_only_a_pair_shares_one_cluster_though_in_sample_likelihoods_would_flip_it():
    # K = 5 states on 4 clusters: cluster 3 shared at random by states 3 and 4, no state holds two clusters.
    # In-sample every split gains and the shared pair's merge loses little, so an in-sample criterion
    # splits a one-cluster state for nothing (and the next check splits it back); held out, no split gains.
    rng = np.random.default_rng(3)
    x, truth = clustered(rng)
    states = np.where(truth == 3, 3 + rng.integers(0, 2, len(truth)), truth).astype(np.int32)
    z = x - x.mean(0)
    r = 1e-2 * float(np.mean(np.var(z, axis=0)))
    from sklearn.cluster import KMeans
    m0 = np.flatnonzero(states == 0)
    half = KMeans(2, n_init=3, random_state=0).fit_predict(z[m0])
    in_sample_gain = sum(moves.gaussian_log_likelihood(z[m0[half == h]], r) for h in (0, 1)) \
        - moves.gaussian_log_likelihood(z[m0], r)
    pair = np.flatnonzero(states >= 3)
    in_sample_loss = sum(moves.gaussian_log_likelihood(z[states == k], r) for k in (3, 4)) \
        - moves.gaussian_log_likelihood(z[pair], r)
    assert in_sample_gain > in_sample_loss  # what made the in-sample move flip back and forth
    assert moves.split_merge_move(x, states, CLUSTERS + 1) is None


def test_a_move_whose_gain_is_noise_is_refused():
    # State 0 holds a close pair of blobs; an equally close pair is shared by states 1 and 2. Splitting 0 and
    # merging 1, 2 only swaps which pair is merged: its true net gain is 0, yet gain > loss by chance in
    # about half the draws, and taken, the next check can swap it back. The paired z-test refuses all of
    # them, and still takes the real repair far above its bar.
    taken_without, taken_with = 0, 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        centres = np.zeros((5, 6))
        centres[1, 0] = centres[3, 2] = 2.7  # each pair 9 σ apart
        centres[2:4, 1], centres[4, 3], centres[0:2, 4] = 6.0, 6.0, -6.0
        truth = np.repeat(np.arange(5), 150)
        x = centres[truth] + 0.3 * rng.standard_normal((len(truth), 6))
        states = np.array([0, 0, 1, 2, 3], np.int32)[truth]
        taken_without += moves.split_merge_move(x, states, 4, seed=seed, min_z=-np.inf) is not None
        move = moves.split_merge_move(x, states, 4, seed=seed)
        taken_with += move is not None
    assert taken_without >= 5 and taken_with == 0
    rng = np.random.default_rng(0)
    x, truth = clustered(rng)
    repair = moves.split_merge_move(x, merged_and_shared(truth, rng), CLUSTERS)
    assert repair is not None and repair.z > 10 * moves.MIN_Z


def test_a_correct_assignment_gets_no_move_and_a_dead_state_is_revived():
    rng = np.random.default_rng(1)
    x, truth = clustered(rng)
    assert moves.split_merge_move(x, truth, CLUSTERS) is None
    dead = np.where(truth == 1, 0, truth)  # clusters 0 and 1 in state 0; state 1 empty
    move = moves.split_merge_move(x, dead, CLUSTERS)
    assert move is not None and move.split == 0 and 1 in move.merge and move.loss == pytest.approx(0.0, abs=1e-6)
    assert matching.matched_accuracy(truth, move.states, CLUSTERS, CLUSTERS)[0] == 1.0


def test_swap_costs_are_the_mean_score_lost_by_swapping_a_pair():
    rng = np.random.default_rng(4)
    k, n = 4, 40
    log_b, states = rng.standard_normal((n, k)), rng.integers(0, k, n)
    costs = moves.swap_costs(log_b, states, k)
    for i in range(k):
        for j in range(k):
            if i == j:
                assert costs[i, j] == np.inf
                continue
            lost = sum(log_b[f, states[f]] - log_b[f, j if states[f] == i else i]
                       for f in range(n) if states[f] in (i, j))
            assert costs[i, j] == pytest.approx(lost / np.isin(states, [i, j]).sum(), rel=1e-10)


def test_the_models_choice_of_merge_pair_is_taken_and_the_proxy_decides_whether_to_move():
    rng = np.random.default_rng(0)
    x, truth = clustered(rng)
    states = merged_and_shared(truth, rng)
    free = moves.split_merge_move(x, states, CLUSTERS)
    costs = np.full((CLUSTERS, CLUSTERS), 5.0)
    costs[1, 2] = costs[2, 1] = 0.1  # the model says: 1 and 2 are one cluster
    chosen = moves.split_merge_move(x, states, CLUSTERS, merge_costs=costs)
    assert chosen is not None and sorted(chosen.merge) == [1, 2] and chosen.loss == pytest.approx(free.loss)
    np.testing.assert_array_equal(chosen.states, free.states)
    costs = np.full((CLUSTERS, CLUSTERS), 5.0)
    costs[1, 3] = costs[3, 1] = 0.1  # a model that pairs two different clusters: its pair is merged, at a cost
    other = moves.split_merge_move(x, states, CLUSTERS, merge_costs=costs)
    assert sorted(other.merge) == [1, 3] and other.loss > free.loss
    # whether a move is made stays the proxy's: a correct assignment gets none, whatever the costs
    assert moves.split_merge_move(x, truth, CLUSTERS, merge_costs=np.zeros((CLUSTERS, CLUSTERS))) is None
    with pytest.raises(ValueError, match="merge_costs must be"):
        moves.split_merge_move(x, states, CLUSTERS, merge_costs=np.zeros((2, 2)))


def test_gaussian_log_likelihood_is_the_closed_form():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 0.7]])
    from scipy.stats import multivariate_normal
    cov = np.cov(x.T, bias=True) + 0.1 * np.eye(3)
    expected = multivariate_normal(x.mean(0), cov).logpdf(x).sum()
    assert moves.gaussian_log_likelihood(x, 0.1) == pytest.approx(expected, rel=1e-10)
    # fitted on one set, scored on another: the closed form with the fit's mean and covariance
    y = rng.standard_normal((20, 3))
    expected = multivariate_normal(x.mean(0), cov).logpdf(y).sum()
    assert moves.gaussian_log_likelihood(y, 0.1, fit=x) == pytest.approx(expected, rel=1e-10)


def test_the_hook_clamps_the_repair_where_dead_state_reseeding_sees_nothing_to_do():
    """Sequences of frames decoded into the merged-and-shared states: re-seeding finds no dead state (the old
    default leaves it), the split–merge labels clamp exactly the three involved states to the repair, and
    nothing is moved when some labels are observed."""
    rng = np.random.default_rng(3)
    x, truth = clustered(rng, (150, 150, 300, 150))  # the shared cluster's halves are used well above 0.5 / K
    order = rng.permutation(len(truth))
    shape = (30, 25)
    images, labels = x[order].reshape(shape + (x.shape[1],)), truth[order].reshape(shape).astype(np.int32)
    states = merged_and_shared(labels.reshape(-1), rng).reshape(shape)
    data = TrainData(images.astype(np.float32), labels, np.zeros(shape, bool), np.ones(shape, bool))
    assert revived_labels(data, states, CLUSTERS, min_usage=0.5, seed=0) is None
    clamp, move = split_merge_labels(data, states, CLUSTERS, seed=0)
    involved = np.isin(states, [move.split, *move.merge])
    assert np.all(clamp[~involved] == -1) and np.all(clamp[involved] >= 0)
    assert matching.matched_accuracy(labels[involved], clamp[involved], CLUSTERS, CLUSTERS)[0] == 1.0
    # the hook's path with the model's scores: emissions that score the shared pair alike pick the same move
    log_b = np.where(np.eye(CLUSTERS)[states] > 0, 0.0, -3.0)
    log_b[..., 1:3] = np.where(np.isin(states, [1, 2])[..., None], 0.0, log_b[..., 1:3])
    with_scores = split_merge_labels(data, states, CLUSTERS, seed=0, log_emissions=log_b)
    np.testing.assert_array_equal(with_scores[0], clamp)
    observed = TrainData(data.images, labels, rng.random(shape) < 0.1, data.mask)
    assert split_merge_labels(observed, states, CLUSTERS, seed=0) is None


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one entry per frame"):
        moves.split_merge_move(np.zeros((10, 2)), np.zeros(9, int), 3)
    with pytest.raises(ValueError, match="K >= 3"):
        moves.split_merge_move(np.zeros((10, 2)), np.zeros(10, int), 2)
