"""Tests of hmdm_jax.gaussian_hmm: exact densities against scipy and hmmlearn, EM monotonicity, recovery
of a known Gaussian HMM, the label-free choices (PCA dimension, restart), padding and input errors.

Data are small and seeded; bounds are ones a wrong implementation cannot meet (e.g. a PCA dimension
that cannot separate the classes has to lose the held-out comparison, and is shown to fail on labels).
"""
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from hmdm_jax import gaussian_hmm as ghmm
from hmdm_jax.matching import matched_accuracy, transition_error


def random_model(rng, num_states, dim, num_features, residual_variance=0.3):
    """A GaussianHMM with random orthonormal components, SPD covariances and a random chain."""
    q, _ = np.linalg.qr(rng.standard_normal((num_features, num_features)))
    components = q[:, :dim].T
    means = 2.0 * rng.standard_normal((num_states, dim))
    factors = rng.standard_normal((num_states, dim, dim)) / np.sqrt(dim)
    covariances = factors @ np.swapaxes(factors, 1, 2) + 0.2 * np.eye(dim)
    pi = rng.dirichlet(np.ones(num_states))
    A = rng.dirichlet(np.ones(num_states), size=num_states)
    return ghmm.GaussianHMM(rng.standard_normal(num_features), components,
                            residual_variance if dim < num_features else 0.0, means, covariances,
                            np.log(pi), np.log(A))


def sample(rng, A, num_sequences, length, pi=None):
    """States ``[N, n]`` of a Markov chain with transition matrix ``A``."""
    num_states = A.shape[0]
    pi = np.full(num_states, 1.0 / num_states) if pi is None else pi
    states = np.zeros((num_sequences, length), np.int64)
    states[:, 0] = rng.choice(num_states, size=num_sequences, p=pi)
    cum = np.cumsum(A, axis=1)
    for i in range(1, length):
        u = rng.random(num_sequences)
        states[:, i] = np.minimum((u[:, None] > cum[states[:, i - 1]]).sum(axis=1), num_states - 1)
    return states


def sticky(num_states, stay):
    A = np.full((num_states, num_states), (1.0 - stay) / (num_states - 1))
    np.fill_diagonal(A, stay)
    return A


def low_rank_data(rng, states, num_features, rank, separation, noise, within=0.5):
    """Frames ``[N, n, D]``: class means in a random rank-``rank`` subspace, within-class spread there, noise."""
    num_states = states.max() + 1
    basis, _ = np.linalg.qr(rng.standard_normal((num_features, rank)))
    centres = separation * rng.standard_normal((num_states, rank))
    latent = centres[states] + within * rng.standard_normal(states.shape + (rank,))
    return latent @ basis.T + noise * rng.standard_normal(states.shape + (num_features,))


# ----------------------------------------------------------------------------------------------
# Densities
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [3, 7])
def test_log_emissions_equal_the_full_space_gaussian(dim):
    rng = np.random.default_rng(0)
    num_features, num_states = 7, 3
    model = random_model(rng, num_states, dim, num_features)
    frames = model.mean + 1.5 * rng.standard_normal((25, num_features))
    got = ghmm.log_emissions(model, frames)
    assert got.shape == (25, num_states)
    C = model.components
    complement = np.eye(num_features) - C.T @ C
    for k in range(num_states):
        cov = C.T @ model.covariances[k] @ C + model.residual_variance * complement
        want = multivariate_normal(model.mean + model.means[k] @ C, cov).logpdf(frames)
        np.testing.assert_allclose(got[:, k], want, rtol=1e-4)


def test_log_likelihood_equals_hmmlearn_score_when_d_is_D():
    hmmlearn = pytest.importorskip("hmmlearn.hmm")
    rng = np.random.default_rng(1)
    num_features, num_states, length = 4, 3, 9
    model = random_model(rng, num_states, num_features, num_features)
    C = model.components  # a rotation of R^D
    mask = np.arange(length)[None] < np.array([9, 5, 1, 7])[:, None]
    sequences = model.mean + 2.0 * rng.standard_normal((4, length, num_features))
    sequences[~mask] = np.nan  # padding is never read
    reference = hmmlearn.GaussianHMM(n_components=num_states, covariance_type="full", init_params="", params="")
    reference.startprob_ = np.exp(model.log_pi)
    reference.transmat_ = np.exp(model.log_A)
    reference.means_ = model.mean + model.means @ C
    reference.covars_ = np.einsum("di,kde,ej->kij", C, model.covariances, C)
    want = [reference.score(seq[m]) for seq, m in zip(sequences, mask)]
    got = ghmm.log_likelihood(model, sequences, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert reference.score(sequences[mask], lengths=mask.sum(1)) == pytest.approx(got.sum(), rel=1e-5)


def test_posteriors_and_decode_shapes_and_padding():
    rng = np.random.default_rng(2)
    model = random_model(rng, 3, 2, 5)
    mask = np.arange(6)[None] < np.array([6, 3])[:, None]
    sequences = rng.standard_normal((2, 6, 5))
    gamma = ghmm.posteriors(model, sequences, mask)
    np.testing.assert_allclose(gamma.sum(-1), mask.astype(float), atol=1e-5)
    states = ghmm.decode(model, sequences, mask)
    assert states.shape == (2, 6) and np.all(states[~mask] == -1) and np.all((states[mask] >= 0) & (states[mask] < 3))


# ----------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------


def test_em_log_likelihood_never_decreases():
    rng = np.random.default_rng(3)
    states = sample(rng, sticky(3, 0.7), 30, 20)
    x = low_rank_data(rng, states, 8, rank=3, separation=1.0, noise=0.3, within=0.8)  # overlapping classes
    for covariance_type in ("full", "diag"):
        fit = ghmm.fit_gaussian_hmm(x, None, 3, pca_dims=4, num_restarts=1, num_iters=40, tol=0.0,
                                    covariance_type=covariance_type)
        trace = fit.log_likelihood_trace
        assert len(trace) == fit.num_iters_run + 1 and fit.num_iters_run >= 10
        assert np.all(np.diff(trace) >= -1e-4), np.diff(trace).min()
        assert trace[-1] > trace[0] + 0.01  # EM did move
        assert fit.log_likelihood_per_frame == trace[-1]


def test_recovers_a_known_sticky_hmm():
    rng = np.random.default_rng(4)
    # Sticky with a preferred next state (a cycle): A is far from symmetric, so A^T would fail the bound.
    A_true = np.array([[0.85, 0.12, 0.02, 0.01],
                       [0.01, 0.85, 0.12, 0.02],
                       [0.02, 0.01, 0.85, 0.12],
                       [0.12, 0.02, 0.01, 0.85]])
    states = sample(rng, A_true, 80, 40)
    x = low_rank_data(rng, states, 20, rank=5, separation=3.0, noise=0.5)
    train, test = slice(0, 60), slice(60, 80)
    fit = ghmm.fit_gaussian_hmm(x[train], None, 4, seed=0)
    assert fit.candidate_dims == (5, 10, 20)  # 30 and 50 clipped to D = 20
    accuracy, mapping = matched_accuracy(states[test], ghmm.decode(fit.model, x[test]), 4, 4)
    assert accuracy >= 0.98
    train_accuracy, _ = matched_accuracy(states[train], ghmm.decode(fit.model, x[train]), 4, 4)
    assert train_accuracy >= 0.98
    A = np.exp(fit.model.log_A)
    np.testing.assert_allclose(A.sum(1), 1.0, atol=1e-12)
    assert transition_error(A, A_true, mapping) < 0.015 < transition_error(A.T, A_true, mapping)


def test_pca_basis_and_residual_variance_are_those_of_the_training_frames():
    rng = np.random.default_rng(9)
    states = sample(rng, sticky(3, 0.8), 10, 12)
    x = low_rank_data(rng, states, 9, rank=4, separation=2.0, noise=0.3)
    fit = ghmm.fit_gaussian_hmm(x, None, 3, pca_dims=3, num_restarts=1)
    frames = x.reshape(-1, 9)
    eigenvalues, vectors = np.linalg.eigh(np.cov(frames, rowvar=False, bias=True))
    eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
    model = fit.model
    np.testing.assert_allclose(model.mean, frames.mean(0), atol=1e-12)
    np.testing.assert_allclose(model.components @ model.components.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(model.components.T @ model.components, vectors[:, :3] @ vectors[:, :3].T, atol=1e-8)
    assert model.residual_variance == pytest.approx(eigenvalues[3:].mean(), rel=1e-8)
    assert fit.explained_variance_ratio == pytest.approx(eigenvalues[:3].sum() / eigenvalues.sum(), rel=1e-8)
    raw = ghmm.fit_gaussian_hmm(x, None, 3, pca_dims=None, num_restarts=1)  # raw coordinates, no residual
    assert raw.pca_dim == 9 and raw.model.residual_variance == 0.0
    np.testing.assert_array_equal(raw.model.components, np.eye(9))


def test_dim_choice_maximises_heldout_likelihood_and_skips_a_dim_that_cannot_separate():
    # The largest-variance direction (coordinate 0) is class-free noise, so d = 1 keeps only it; the
    # four classes sit at the corners of a tetrahedron in coordinates 1..3.
    rng = np.random.default_rng(5)
    states = sample(rng, sticky(4, 0.8), 50, 20)
    corners = 3.0 * np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
    x = 0.2 * rng.standard_normal(states.shape + (10,))
    x[..., 1:4] += corners[states] + 0.3 * rng.standard_normal(states.shape + (3,))
    x[..., 0] = 8.0 * rng.standard_normal(states.shape)
    fit = ghmm.fit_gaussian_hmm(x, None, 4, pca_dims=(1, 3, 6), num_restarts=2, seed=1)
    assert set(fit.dim_scores) == {1, 3, 6}
    assert fit.dim_scores[fit.pca_dim] == max(fit.dim_scores.values())
    assert fit.pca_dim != 1 and fit.dim_scores[1] < fit.dim_scores[fit.pca_dim] - 1.0
    assert len(fit.heldout_sequences) == 10
    good, _ = matched_accuracy(states, ghmm.decode(fit.model, x), 4, 4)
    assert good >= 0.97
    one = ghmm.fit_gaussian_hmm(x, None, 4, pca_dims=1, num_restarts=1)
    assert one.pca_dim == 1 and one.dim_scores == {}
    bad, _ = matched_accuracy(states, ghmm.decode(one.model, x), 4, 4)
    assert bad < 0.6  # d = 1 cannot separate the classes


def test_kept_restart_has_the_highest_training_likelihood():
    rng = np.random.default_rng(6)
    states = sample(rng, sticky(5, 0.6), 20, 15)
    x = low_rank_data(rng, states, 6, rank=4, separation=1.0, noise=0.3, within=1.0)  # ambiguous: restarts differ
    fit = ghmm.fit_gaussian_hmm(x, None, 5, pca_dims=4, num_restarts=4, seed=3)
    scores = np.asarray(fit.restart_scores)
    assert scores.shape == (4,) and np.ptp(scores) > 1e-3
    assert fit.best_restart == int(np.argmax(scores)) and fit.log_likelihood_per_frame == scores.max()
    # The recorded score is the kept model's own likelihood on the training frames.
    per_frame = ghmm.log_likelihood(fit.model, x).sum() / x[..., 0].size
    assert per_frame == pytest.approx(scores.max(), abs=1e-4)


def test_padding_changes_nothing():
    rng = np.random.default_rng(7)
    states = sample(rng, sticky(3, 0.8), 12, 10)
    x = low_rank_data(rng, states, 6, rank=3, separation=2.0, noise=0.3)
    settings = dict(pca_dims=(2, 4), num_restarts=2, seed=2)
    plain = ghmm.fit_gaussian_hmm(x, None, 3, **settings)

    padded = np.concatenate([x, 1e6 * rng.standard_normal((12, 5, 6))], axis=1)
    padded[:, -1] = np.nan
    mask = np.arange(15)[None] < 10
    fit = ghmm.fit_gaussian_hmm(padded, np.repeat(mask, 12, 0), 3, **settings)
    assert fit.pca_dim == plain.pca_dim and fit.dim_scores.keys() == plain.dim_scores.keys()
    np.testing.assert_allclose(list(fit.dim_scores.values()), list(plain.dim_scores.values()), rtol=1e-6)
    np.testing.assert_allclose(fit.restart_scores, plain.restart_scores, rtol=1e-6)
    for got, want in zip(fit.model, plain.model):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ghmm.decode(fit.model, padded, np.repeat(mask, 12, 0))[:, :10],
                                  ghmm.decode(plain.model, x))

    # Variable lengths: two different paddings of the same valid frames give the same fit.
    lengths = rng.integers(3, 11, size=12)
    mask_a = np.arange(10)[None] < lengths[:, None]
    a = np.where(mask_a[..., None], x, np.nan)
    b = np.concatenate([np.where(mask_a[..., None], x, -3e5), np.zeros((12, 4, 6))], axis=1)
    mask_b = np.arange(14)[None] < lengths[:, None]
    fit_a = ghmm.fit_gaussian_hmm(a, mask_a, 3, **settings)
    fit_b = ghmm.fit_gaussian_hmm(b, mask_b, 3, **settings)
    for got, want in zip(fit_b.model, fit_a.model):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    states_b = ghmm.decode(fit_b.model, b, mask_b)
    assert np.all(states_b[~mask_b] == -1)
    np.testing.assert_array_equal(states_b[:, :10], ghmm.decode(fit_a.model, a, mask_a))


def test_bad_inputs_raise_value_errors_naming_the_problem():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 5, 3))
    mask = np.ones((4, 5), bool)
    fit = ghmm.fit_gaussian_hmm
    with pytest.raises(ValueError, match=r"shape \[N, n, D\]"):
        fit(x[0], None, 2)
    with pytest.raises(ValueError, match="empty"):
        fit(x[:0], None, 2)
    with pytest.raises(ValueError, match="NaN"):
        bad = x.copy()
        bad[1, 2, 0] = np.nan
        fit(bad, mask, 2)
    with pytest.raises(ValueError, match="mask must have shape"):
        fit(x, mask[:, :4], 2)
    with pytest.raises(ValueError, match="bool"):
        fit(x, mask.astype(int), 2)
    with pytest.raises(ValueError, match="prefix"):
        holes = mask.copy()
        holes[0, 1] = False
        fit(x, holes, 2)
    with pytest.raises(ValueError, match="no valid frame"):
        fit(x, np.zeros_like(mask), 2)
    with pytest.raises(ValueError, match="num_states"):
        fit(x, mask, 0)
    short = np.zeros_like(mask)
    short[0, :2] = True
    with pytest.raises(ValueError, match="larger than the number of valid frames"):
        fit(x, short, 3)
    with pytest.raises(ValueError, match="covariance_type"):
        fit(x, mask, 2, covariance_type="tied")
    with pytest.raises(ValueError, match="pca_dims"):
        fit(x, mask, 2, pca_dims=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        fit(x, mask, 2, pca_dims=(1, 2), heldout_fraction=0.0)
    with pytest.raises(ValueError, match="pseudocount"):
        fit(x, mask, 2, pca_dims=2, pseudocount=0.0)
    model = random_model(rng, 2, 2, 3)
    with pytest.raises(ValueError, match="D = 4"):
        ghmm.decode(model, rng.standard_normal((2, 5, 4)))
    with pytest.raises(ValueError, match="NaN"):
        ghmm.log_emissions(model, np.full((2, 3), np.nan))
