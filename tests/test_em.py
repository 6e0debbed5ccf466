"""The mixture and HMDM EM steps: posteriors, clamping, the balanced E-step, the label loss, the M-step and
the scoring band, on three 2-D blobs with oracle or small networks (the loop is tested in test_run.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hmdm_jax import diffusion, em, emission, hmdm, hmm, mixture, steps, warm_start
from hmdm_jax.state import create_train_state
from tests.blobs import CENTERS, K, STICKY_A, blobs, markov_labels, oracle_eps_fn


# ------------------------------------------------------------------------------------------ posteriors


@pytest.mark.parametrize("estimator", ["eps_mse", "elbo_term"])
def test_oracle_posterior_concentrates_on_true_class(estimator):
    schedule = diffusion.linear_schedule(200)
    labels = np.arange(300) % K
    y = jnp.asarray(CENTERS[labels])  # point masses: the oracle ε is exact for the true class
    config = em.EMConfig(num_classes=K, scoring=em.Scoring(estimator=estimator, num_t=8, t_range=(0.02, 0.2)),
                         temperature=em.Temperature(1.0))
    keys = em.frame_keys(jax.random.PRNGKey(0), len(labels))
    log_b = jax.jit(lambda: em.e_step_scores(config, oracle_eps_fn(schedule), jnp.asarray(CENTERS), schedule, y,
                                             keys, 0))()  # jitted: eagerly, every op compiles on its own
    post = np.exp(np.asarray(mixture.class_posterior(log_b, jnp.full((K,), -np.log(K)))))
    np.testing.assert_allclose(post.sum(1), 1.0, rtol=1e-5)
    p_true = post[np.arange(len(labels)), labels]
    assert np.all(post.argmax(1) == labels) and np.median(p_true) > 0.999


def test_tempering_sharpens_and_annealing_interpolates():
    config = em.EMConfig(num_classes=K, temperature=em.Temperature(final=0.2, initial=5.0, anneal_steps=100))
    np.testing.assert_allclose(em.temperature_at(config, 0), 5.0, rtol=1e-6)
    np.testing.assert_allclose(em.temperature_at(config, 50), np.sqrt(5.0 * 0.2), rtol=1e-5)
    np.testing.assert_allclose(em.temperature_at(config, 10**6), 0.2, rtol=1e-6)
    log_b = jnp.array([[0.0, -1.0, -2.0]])
    flat = mixture.class_posterior(log_b / 5.0, jnp.zeros(K))
    sharp = mixture.class_posterior(log_b / 0.2, jnp.zeros(K))
    assert em.posterior_entropy(sharp) < em.posterior_entropy(flat)


# ------------------------------------------------------------------------------------------ clamping


def test_clamped_labels_are_never_changed():
    """Observed labels clamp the class exactly: posterior one-hot, every FFBS draw keeps them, even
    when the emission strongly prefers another class."""
    rng = np.random.default_rng(1)
    schedule = diffusion.linear_schedule(200)
    labels = markov_labels(rng, 4, 12)
    images = jnp.asarray(blobs(rng, labels))
    observed = np.where(rng.random(labels.shape) < 0.4, (labels + 1) % K, -1).astype(np.int32)  # wrong on purpose
    config = em.EMConfig(num_classes=K, scoring=em.Scoring(t_range=(0.02, 0.2)))
    log_b = hmdm.sequence_log_emissions(config, oracle_eps_fn(schedule), jnp.asarray(CENTERS), schedule, images,
                                        jax.random.PRNGKey(2), 0, jnp.asarray(observed))
    log_A = jnp.log(jnp.asarray(STICKY_A, jnp.float32))
    # [draws] keys × [4] sequences; the draw axis is outermost
    draw = jax.jit(jax.vmap(jax.vmap(hmm.ffbs, (None, None, None, 0)), (0, None, None, None)))
    keys = jax.random.split(jax.random.PRNGKey(3), 200)
    states = np.asarray(draw(keys, jnp.full((K,), -np.log(K)), log_A, log_b).states)  # [200, 4, 12]
    known = observed >= 0
    assert np.all(states[:, known] == observed[known])
    free = ~known
    assert np.mean(states[:, free] == labels[free]) > 0.9  # the free frames still follow the data

    post = np.exp(np.asarray(mixture.class_posterior(log_b.reshape(-1, K), jnp.zeros(K), jnp.asarray(observed.reshape(-1)))))
    rows = observed.reshape(-1) >= 0
    np.testing.assert_array_equal(post[rows], np.eye(K)[observed.reshape(-1)[rows]])


def test_balanced_posterior_gives_each_class_its_prior_share_and_only_rescales_rows_and_columns():
    """Sinkhorn balancing: rows stay distributions, class k's column sums to B·π_k (a skewed batch that
    prefers class 0 included), the change is a per-frame plus a per-class offset (so each frame's class
    order is kept), clamped frames keep their class, and a class no frame can take gives no NaN."""
    rng = np.random.default_rng(11)
    batch, k = 60, 4
    logits = rng.normal(size=(batch, k)) * 2.0 + np.array([3.0, 0.0, -1.0, 0.5])  # class 0 preferred
    labels = np.full(batch, -1, np.int32)
    labels[:6] = [0, 1, 2, 3, 2, 1]
    log_pi = jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4], jnp.float32))
    log_post = mixture.class_posterior(jnp.asarray(logits, jnp.float32), log_pi, jnp.asarray(labels))
    balanced = np.asarray(em.balanced_class_posterior(log_post, log_pi), np.float64)
    assert np.exp(np.asarray(log_post))[:, 0].sum() > 0.4 * batch  # unbalanced before
    np.testing.assert_allclose(np.exp(balanced).sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.exp(balanced).sum(0), batch * np.exp(np.asarray(log_pi)), atol=1e-3 * batch)
    np.testing.assert_array_equal(np.exp(balanced[:6]), np.eye(k)[labels[:6]])  # clamped frames keep their class
    free = balanced[6:] - np.asarray(log_post, np.float64)[6:]  # = a_i + c_k on the free frames
    double_difference = free - free[:, :1] - free[:1, :] + free[:1, :1]
    np.testing.assert_allclose(double_difference, 0.0, atol=1e-3)
    # no frame may take class 3: its column stays −inf, the rest stays finite
    impossible = jnp.asarray(np.where(np.arange(k) == 3, -np.inf, np.log(np.full((batch, k), 1 / 3))), jnp.float32)
    out = np.asarray(em.balanced_class_posterior(impossible, jnp.full(k, -np.log(k))))
    assert not np.isnan(out).any() and np.all(out[:, 3] == -np.inf)
    np.testing.assert_allclose(np.exp(out).sum(1), 1.0, atol=1e-5)


def test_balanced_mixture_step_shares_the_batch_even_when_one_class_explains_every_frame():
    """All frames from blob 0 under the exact per-class ε: at a sharp temperature the paper's E-step gives
    every frame class 0; with ``balance_classes`` each class takes close to a third of the batch."""
    rng = np.random.default_rng(12)
    schedule = diffusion.linear_schedule(200)
    y = jnp.asarray(blobs(rng, np.zeros(96, np.int32)))
    params = jnp.asarray(CENTERS)
    optimizer = optax.sgd(0.0)
    usage = {}
    for balance in (False, True):
        config = em.EMConfig(num_classes=K, scoring=em.Scoring(t_range=(0.02, 0.2)), temperature=em.Temperature(0.05),
                            balance_classes=balance)
        step = jax.jit(mixture.make_train_step(config, oracle_eps_fn(schedule), schedule, optimizer))
        state = create_train_state(jax.random.PRNGKey(0), params, optimizer, K)
        usage[balance] = np.asarray(step(state, {"images": y}, jax.random.PRNGKey(1))[1]["class_usage"])
    assert usage[False][0] > 0.95
    assert np.all(np.abs(usage[True] - 1 / K) < 0.06)
    with pytest.raises(ValueError, match="balance_classes is for the mixture"):
        hmdm.make_train_step(em.EMConfig(num_classes=K, balance_classes=True), oracle_eps_fn(schedule), schedule,
                             optimizer)


def test_class_balanced_loss_is_the_mean_over_present_classes_of_each_class_mean_loss():
    """``balance_loss``: classes 0 (three frames), 1 (one), 2 (one and a padding frame), 3 (absent)."""
    classes = jnp.array([0, 0, 0, 1, 2, 2], jnp.int32)
    weights = jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)
    balanced = steps.class_balanced_weights(classes, weights, 4)
    np.testing.assert_allclose(balanced, [5 / 9, 5 / 9, 5 / 9, 5 / 3, 5 / 3, 0], rtol=1e-6)
    schedule = diffusion.linear_schedule(200)
    rng = np.random.default_rng(3)
    y = jnp.asarray(blobs(rng, np.asarray(classes) % K))
    params = jnp.asarray(CENTERS + 0.3)  # a wrong oracle: every frame has a loss of its own
    eps_fn = oracle_eps_fn(schedule)
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    classes_k = classes % K
    per_frame = np.array([float(steps.denoising_loss(eps_fn, params, schedule, y, classes_k, keys,
                                                     jnp.eye(6)[i], jnp.float32(1.0))) for i in range(6)])
    loss = steps.denoising_loss(eps_fn, params, schedule, y, classes_k, keys, balanced, jnp.sum(balanced))
    expected = np.mean([per_frame[:3].mean(), per_frame[3], per_frame[4]])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - per_frame[:5].mean()) > 1e-3  # the plain loss differs


def test_label_loss_is_the_weighted_cross_entropy_of_the_tempered_posterior_and_its_gradient_lowers_it():
    """em.label_loss equals α · mean over observed frames of −log softmax(tempered_log_emissions/τ + log π)[label]
    (one draw), ignores unknown labels, and a gradient step on the class means lowers it."""
    rng = np.random.default_rng(7)
    schedule = diffusion.linear_schedule(200)
    labels = rng.integers(0, K, 24).astype(np.int32)
    y = jnp.asarray(blobs(rng, labels, spread=0.4))
    observed = np.where(rng.random(24) < 0.5, labels, -1).astype(np.int32)
    config = em.EMConfig(num_classes=K, scoring=em.Scoring(t_range=(0.02, 0.2)), temperature=em.Temperature(50.0),
                           labels=em.Labels(loss_weight=0.3))
    eps_fn = oracle_eps_fn(schedule)
    log_prior = jnp.log(jnp.asarray([0.5, 0.3, 0.2], jnp.float32))
    keys = em.frame_keys(jax.random.PRNGKey(8), 24)
    params = jnp.asarray(CENTERS) * 0.3  # wrong means and a high temperature: the posterior is soft
    rows = observed >= 0
    # jitted: run eagerly, every op of the loss compiles on its own
    fn = jax.jit(lambda p: em.label_loss(config, eps_fn, p, schedule, y, jnp.asarray(observed), keys, log_prior, 0,
                                         jnp.float32(rows.sum())))
    loss = fn(params)
    scores = np.asarray(jax.jit(lambda p: em.tempered_log_emissions(config, eps_fn, p, schedule, y, keys, 0,
                                                                    num_t=1))(params), np.float64)
    logits = scores + np.asarray(log_prior)
    log_post = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    expected = 0.3 * -log_post[rows, observed[rows]].mean()
    assert expected > 0.05
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    none = jax.jit(lambda p: em.label_loss(config, eps_fn, p, schedule, y, jnp.full(24, -1, jnp.int32), keys, log_prior,
                                           0, 0.0))(params)
    assert float(none) == 0.0

    grad = jax.jit(jax.grad(fn))(params)
    assert float(fn(params - 0.05 * grad)) < float(loss)


def test_label_loss_frames_scores_observed_frames_first_and_a_cap_above_their_count_changes_nothing():
    """em.observed_label_loss with ``label_loss_frames``: a cap at or above the number of observed frames
    gives exactly the uncapped loss (same per-frame draws); a smaller cap is the mean over the first
    observed frames in batch order, each with its own key; a cap below 1 is refused."""
    rng = np.random.default_rng(11)
    schedule = diffusion.linear_schedule(200)
    labels = rng.integers(0, K, 24).astype(np.int32)
    y = jnp.asarray(blobs(rng, labels, spread=0.4))
    observed = np.full(24, -1, np.int32)
    rows = np.array([2, 5, 9, 13, 17, 20, 23])  # scattered, so the cap must move them to the front
    observed[rows] = labels[rows]
    eps_fn, params = oracle_eps_fn(schedule), jnp.asarray(CENTERS) * 0.3
    log_prior, key = jnp.log(jnp.full(K, 1.0 / K)), jax.random.PRNGKey(12)
    base = em.EMConfig(num_classes=K, scoring=em.Scoring(t_range=(0.02, 0.2)), temperature=em.Temperature(50.0),
                           labels=em.Labels(loss_weight=0.3))

    def loss(cap):
        config = base.replace(labels=dict(loss_frames=cap))
        # jitted: run eagerly, every op of the loss compiles on its own
        return float(jax.jit(em.observed_label_loss(config, eps_fn, schedule, y, jnp.asarray(observed), log_prior, 0,
                                                    key))(params))

    uncapped = loss(None)
    assert uncapped > 0.05
    np.testing.assert_allclose([loss(7), loss(16)], uncapped, rtol=1e-6)
    keys = em.frame_keys(key, 24)
    first = rows[:3]
    expected = jax.jit(lambda p: em.label_loss(base, eps_fn, p, schedule, y[first], jnp.asarray(observed[first]),
                                               keys[first], log_prior, 0, jnp.float32(3)))(params)
    np.testing.assert_allclose(loss(3), float(expected), rtol=1e-6)
    assert abs(loss(3) - uncapped) > 1e-3
    with pytest.raises(ValueError, match="loss_frames"):
        em.Labels(loss_frames=0)


def test_paper_config_is_the_literal_algorithm():
    paper = em.EMConfig.paper(K)
    assert (paper.scoring.estimator, paper.scoring.num_t, paper.temperature.final, paper.priors.learn_pi) == (
        "random_t", 1, 1.0, True)
    assert em.resolved_t_range(paper, 1000) is None
    assert em.resolved_t_range(em.EMConfig(num_classes=K), 1000) == (300, 600)
    with pytest.raises(ValueError, match="pseudo_count"):
        em.Priors(pseudo_count=0.0)
    with pytest.raises(ValueError, match="t_range"):
        em.Scoring(t_range=(0.5, 0.2))


def test_dirichlet_m_step_never_reaches_zero():
    counts = jnp.array([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, 4.0]])
    probs = np.exp(np.asarray(steps.dirichlet_log_probs(counts, 1.0, sticky_count=2.0)))
    np.testing.assert_allclose(probs, [[13 / 15, 1 / 15, 1 / 15], [1 / 5, 3 / 5, 1 / 5],
                                       [4 / 15, 4 / 15, 7 / 15]], rtol=1e-6)
    assert probs.min() > 0


def test_seeded_kmeans_follows_the_observed_labels_where_plain_kmeans_does_not():
    """Two classes, each two blobs: the widest gap (y) separates the blobs by row, the labels by column.
    Plain k-means takes the lower-inertia row split (accuracy 0.5); seeded from the labelled class means
    it converges to the column split, numbered as the labels."""
    rng = np.random.default_rng(3)
    corner = rng.integers(0, 4, 400)
    centres = np.array([[0.0, 0.0], [0.0, 12.0], [11.0, 0.0], [11.0, 12.0]])
    frames = centres[corner] + 0.5 * rng.normal(size=(400, 2))
    labels = (corner >= 2).astype(np.int32)
    seed_labels = np.where(rng.random(400) < 0.05, labels, -1)
    seeded = warm_start.kmeans_labels(frames, 2, pca_dims=None, seed_labels=seed_labels)
    np.testing.assert_array_equal(seeded, labels)
    plain = warm_start.kmeans_labels(frames, 2, pca_dims=None)
    assert 0.4 < np.mean(plain == labels) < 0.6
    # a class without any labelled frame: seeding is impossible, plain k-means is used
    unseeded = warm_start.kmeans_labels(frames, 2, pca_dims=None, seed_labels=np.where(labels == 0, seed_labels, -1))
    np.testing.assert_array_equal(unseeded, plain)
    with pytest.raises(ValueError, match="one entry per frame"):
        warm_start.kmeans_labels(frames, 2, seed_labels=seed_labels[:10])


def test_umap_start_follows_the_manifold_where_kmeans_cuts_across_it():
    """Two interleaved half-moons: k-means cuts across them, the Gaussian mixture on a UMAP embedding
    follows each moon. Frames repeated three times (as sequences reuse images) get the labels of their
    one copy, and the start is seeded by labelled class means when every class has some."""
    from sklearn.datasets import make_moons

    frames, labels = make_moons(300, noise=0.05, random_state=0)
    accuracy = lambda clusters: max(np.mean(clusters == labels), np.mean(clusters != labels))
    assert accuracy(warm_start.kmeans_labels(frames, 2, pca_dims=None)) < 0.9
    clusters = warm_start.cluster_labels(frames, 2, "umap", pca_dims=None)
    assert accuracy(clusters) > 0.98
    repeated = warm_start.cluster_labels(np.tile(frames, (3, 1)), 2, "umap", pca_dims=None)
    np.testing.assert_array_equal(repeated, np.tile(clusters, 3))
    seed_labels = np.where(np.arange(300) % 20 == 0, labels, -1)
    seeded = warm_start.umap_labels(frames, 2, pca_dims=None, seed_labels=seed_labels)
    assert np.mean(seeded == labels) > 0.95  # numbered as the labels (swapped: < 0.05)
    with pytest.raises(ValueError, match="distinct frames"):
        warm_start.umap_labels(np.tile(frames[:5], (10, 1)), 2, pca_dims=None)


# ------------------------------------------------------------------------------------------ scoring band


def gaussian_oracle_eps_fn(schedule, spread):
    """The exact E[ε | z_t, k] of Gaussian classes N(μ_k, spread² I) at ``params [K, D]``."""

    def eps_fn(params, z, t, k):
        ab = diffusion.alpha_bar(schedule, t)[:, None]
        return jnp.sqrt(1.0 - ab) * (z - jnp.sqrt(ab) * params[k]) / (ab * spread**2 + 1.0 - ab)

    return eps_fn


def test_temperature_fit_is_the_log_likelihood_of_the_many_draw_decision_and_follows_the_score_noise():
    """temperature_fit by brute force (the E-step's draws and an independent many-draw decision, keys as
    documented), and what it is for: the fitted temperature is inside the grid, and an E-step that averages
    more draws (less noise, same evidence) is fitted a lower temperature."""
    schedule, spread = diffusion.linear_schedule(200), 0.3
    rng = np.random.default_rng(2)
    y = jnp.asarray(blobs(rng, np.arange(300) % K, spread))
    eps_fn, params = gaussian_oracle_eps_fn(schedule, spread), jnp.asarray(CENTERS)
    # the low band, where one draw's noise is of the order of the class evidence (agreement < 0.7 below)
    config = em.EMConfig(num_classes=K, scoring=em.Scoring(num_t=1, t_range=(0.01, 0.05)))
    key = jax.random.PRNGKey(4)
    grid = (0.05, 0.2, 1.0, 5.0)
    fits = np.asarray(jax.jit(lambda: em.temperature_fit(config, eps_fn, params, schedule, y, key, grid))())
    score = jax.jit(lambda keys, n: emission.log_emission(eps_fn, params, schedule, y, keys, K, estimator="eps_mse",
                                                          num_t=n, t_range=(2, 10)), static_argnums=1)
    log_b = np.asarray(score(em.frame_keys(key, 300), 1), np.float64)
    decision = np.argmax(np.asarray(score(em.frame_keys(jax.random.fold_in(key, 1), 300), em.REFERENCE_DRAWS)), 1)
    for tau, fit in zip(grid, fits):
        log_post = log_b / tau - np.logaddexp.reduce(log_b / tau, axis=1, keepdims=True)
        assert fit == pytest.approx(np.mean(log_post[np.arange(300), decision]), abs=1e-4)

    one, fits_one = em.select_temperature(config, eps_fn, params, schedule, y, key)
    assert em.TEMPERATURE_GRID[0] < one < em.TEMPERATURE_GRID[-1]
    assert one == em.TEMPERATURE_GRID[int(np.argmax(np.asarray(fits_one)))]
    eight, _ = em.select_temperature(config.replace(scoring=dict(num_t=8)), eps_fn, params, schedule, y, key)
    assert eight < one / 1.5, (one, eight)


def test_decoding_fit_is_the_chain_log_likelihood_ratio_by_brute_force():
    """decoding_fit (no refit) against an enumeration of every state path: for each τ, Σ over sequences of
    log Σ_x π(x_1) Π A(x_l, x_l+1) Π softmax(log b_l / τ)[x_l] / prior_τ(x_l), per valid frame, with prior_τ
    the mean tempered posterior of the valid frames; padded frames count nowhere."""
    import itertools
    rng = np.random.default_rng(0)
    k, grid = 3, (0.1, 0.7, 3.0, 1e4)
    log_b = rng.normal(0, 2, (2, 4, k))
    mask = np.array([[True, True, True, True], [True, True, False, False]])
    log_pi = np.log(rng.dirichlet(np.ones(k)))
    log_A = np.log(rng.dirichlet(np.ones(k), size=k))
    fits = np.asarray(hmdm.decoding_fit(jnp.asarray(log_b, jnp.float32), jnp.asarray(mask),
                                        jnp.asarray(log_pi, jnp.float32), jnp.asarray(log_A, jnp.float32),
                                        grid=grid).fits)
    for tau, fit in zip(grid, fits):
        log_post = log_b / tau - np.logaddexp.reduce(log_b / tau, axis=-1, keepdims=True)
        log_prior = np.logaddexp.reduce(log_post[mask], axis=0) - np.log(mask.sum())
        total = 0.0
        for seq, valid in zip(log_post - log_prior, mask):
            n = int(valid.sum())
            paths = [log_pi[p[0]] + sum(log_A[a, b] for a, b in zip(p, p[1:])) + sum(seq[l, p[l]] for l in range(n))
                     for p in itertools.product(range(k), repeat=n)]
            total += np.logaddexp.reduce(paths)
        assert fit == pytest.approx(total / mask.sum(), abs=2e-4)
    assert abs(fits[-1]) < 1e-3  # no evidence in the frames: the chain adds nothing


@pytest.mark.parametrize("scale", [0.25, 4.0])
def test_decoding_temperature_recovers_the_scale_of_mis_scaled_exact_scores(scale):
    """Scores that are ``scale`` × the exact log-densities of Gaussian frames on a symmetric sticky chain: at
    τ = scale the tempered emissions are the true model, so the held-out likelihood peaks there, and the
    chosen τ decodes better than the E-step's τ = 1 would (scores 4× too sharp or too soft)."""
    rng = np.random.default_rng(1)
    spread = 0.6  # blobs that overlap: the chain matters
    states = markov_labels(rng, 300, 20)
    y = blobs(rng, states, spread)
    log_density = -((y[:, :, None, :] - CENTERS) ** 2).sum(-1) / (2 * spread**2)  # [N, n, K] up to a constant
    log_b = jnp.asarray(scale * log_density, jnp.float32)
    mask = jnp.ones(states.shape, bool)
    log_pi, log_A = jnp.full((K,), -np.log(K)), jnp.log(jnp.asarray(STICKY_A, jnp.float32))
    tau, _, _, fits = hmdm.select_decoding(log_b, mask, log_pi, log_A)
    assert scale / 1.3 < tau < scale * 1.3, (scale, tau)
    viterbi = jax.vmap(hmm.viterbi, (None, None, 0, 0))
    accuracy = lambda t: float(np.mean(np.asarray(viterbi(log_pi, log_A, log_b / t, mask).states) == states))
    assert accuracy(tau) > accuracy(1.0) + 0.01, (accuracy(tau), accuracy(1.0))


def test_the_chain_refit_is_baum_welch_it_recovers_a_wrong_chain_and_is_chosen_with_the_temperature():
    """Exact Gaussian log-densities of frames on the sticky chain, scaled by 3 (too sharp), decoded with a wrong
    chain (uniform A): Baum–Welch with the emissions fixed never lowers the likelihood, brings A within
    sampling error of the chain that generated the paths, and ``select_decoding`` finds τ and the chain together,
    decoding better than the wrong chain at its own best τ."""
    rng = np.random.default_rng(4)
    spread = 0.6
    states = markov_labels(rng, 200, 20)
    y = blobs(rng, states, spread)
    log_b = jnp.asarray(-3.0 * ((y[:, :, None, :] - CENTERS) ** 2).sum(-1) / (2 * spread**2), jnp.float32)
    mask = jnp.ones(states.shape, bool)
    log_pi, wrong_A = jnp.full((K,), -np.log(K)), jnp.full((K, K), -np.log(K))
    priors = em.Priors(pseudo_count=1.0)
    log_q = hmdm.tempered_log_densities(log_b, mask, 3.0)
    forward = jax.vmap(hmm.forward_filter, (None, None, 0, 0))
    likelihoods = [float(forward(*hmdm.refit_chain(priors, log_q, mask, log_pi, wrong_A, i), log_q, mask)
                         .log_marginal.sum()) for i in range(6)]
    assert all(b >= a - 1e-2 for a, b in zip(likelihoods, likelihoods[1:])) and likelihoods[-1] > likelihoods[0] + 100
    _, refit_A = hmdm.refit_chain(priors, log_q, mask, log_pi, wrong_A)
    pairs = np.stack([states[:, :-1].ravel(), states[:, 1:].ravel()])
    empirical = np.zeros((K, K))
    np.add.at(empirical, tuple(pairs), 1)
    empirical /= empirical.sum(1, keepdims=True)
    np.testing.assert_allclose(np.exp(refit_A), empirical, atol=0.04)
    # π is not learnt under the default priors, and A not when learn_A is off
    fixed_pi, fixed_A = hmdm.refit_chain(em.Priors(learn_A=False), log_q, mask, log_pi, wrong_A)
    np.testing.assert_array_equal(fixed_A, wrong_A)
    np.testing.assert_array_equal(fixed_pi, log_pi)
    tau, chosen_pi, chosen_A, fits = hmdm.select_decoding(log_b, mask, log_pi, wrong_A, priors)
    tau_wrong, _, _, fits_wrong = hmdm.select_decoding(log_b, mask, log_pi, wrong_A)
    assert 3.0 / 1.3 < tau < 3.0 * 1.3 and fits.max() > fits_wrong.max()
    np.testing.assert_allclose(np.exp(chosen_A), empirical, atol=0.04)
    viterbi = jax.vmap(hmm.viterbi, (None, None, 0, 0))
    accuracy = lambda A, t: float(np.mean(np.asarray(viterbi(log_pi, A, log_b / t, mask).states) == states))
    assert accuracy(chosen_A, tau) > accuracy(wrong_A, tau_wrong) + 0.01


def test_band_agreement_is_one_draw_accuracy_and_selects_the_informative_band():
    schedule, spread = diffusion.linear_schedule(200), 0.3
    rng = np.random.default_rng(0)
    labels = np.arange(600) % K
    y = jnp.asarray(blobs(rng, labels, spread))
    eps_fn, params = gaussian_oracle_eps_fn(schedule, spread), jnp.asarray(CENTERS)
    config = em.EMConfig(num_classes=K)
    bands = ((0.01, 0.05), (0.3, 0.6), (0.7, 1.0))
    key = jax.random.PRNGKey(1)
    agreement = np.asarray(em.band_agreement(config, eps_fn, params, schedule, y, jnp.asarray(labels), key, bands))
    # brute force: one eps_mse draw per frame on the band's integer steps, keys as in the training step
    for band, value in zip(bands, agreement):
        t_range = (max(1, round(band[0] * 200)), round(band[1] * 200))
        log_b = jax.jit(lambda: emission.log_emission(eps_fn, params, schedule, y, em.frame_keys(key, len(labels)), K,
                                                      estimator="eps_mse", num_t=1, t_range=t_range))()
        assert value == pytest.approx(np.mean(np.argmax(np.asarray(log_b), 1) == labels), abs=1e-6)
    # overlapping classes (spread 0.3): at t ≤ 5% of T one draw's noise on the few-pixel difference
    # between the classes' ε dominates; in the middle the exact ε separates them
    assert agreement[0] < 0.7 and agreement[1] > 0.95
    best, scores = em.select_t_range(config, eps_fn, params, schedule, y, jnp.asarray(labels), key, bands)
    assert best == bands[int(np.argmax(agreement))] != bands[0] and np.allclose(scores, agreement)
