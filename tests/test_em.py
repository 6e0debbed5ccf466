"""The mixture and HMDM EM steps and the training loop: posteriors, clamping, recovery, exact resume.

Synthetic data: three well-separated 2-D blobs. From a random start (no k-means) the mixture must find
the blobs and HMDM must find the blobs and the transition matrix; these are the issue's CPU-fast quality
bars. The score band is set low (2–20% of T) as RESULTS.md recommends for low-dimensional data.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hmdm_jax import diffusion, em, emission, hmdm, hmm, mixture, models, warm_start
from hmdm_jax import train as ht
from hmdm_jax.metrics import accuracy as am
from hmdm_jax.state import create_train_state

K = 3
CENTERS = np.array([[0.8, 0.0], [-0.4, 0.7], [-0.4, -0.7]], np.float32)
STICKY_A = np.full((K, K), 0.1) + 0.7 * np.eye(K)


def blobs(rng, labels, spread=0.15):
    return (CENTERS[labels] + spread * rng.standard_normal(labels.shape + (2,))).astype(np.float32)


def markov_labels(rng, num_sequences, length, A=STICKY_A):
    x = np.zeros((num_sequences, length), np.int32)
    x[:, 0] = rng.integers(0, K, num_sequences)
    cum = np.cumsum(A, axis=1)
    for i in range(1, length):
        x[:, i] = (rng.random(num_sequences)[:, None] > cum[x[:, i - 1]]).sum(1)
    return x


def blob_config(model_type, steps, batch_size, **loop):
    return ht.RunConfig(
        model_type, models.get_model_config("mlp-small"),
        em.EMConfig(num_classes=K, t_range=(0.02, 0.2)), (2,),
        optim=ht.OptimConfig(learning_rate=2e-3, warmup_steps=50),
        diffusion=ht.DiffusionConfig(num_steps=200),
        loop=ht.LoopConfig(**{**dict(num_steps=steps, batch_size=batch_size, warm_start="none", eval_every=0,
                                     checkpoint_every=0, log_every=50), **loop}),
    )


def oracle_eps_fn(schedule):
    """The exact ε of point-mass classes at ``params [K, D]``: ε = (z − √ᾱ μ_k)/√(1 − ᾱ)."""

    def eps_fn(params, z, t, k):
        ab = diffusion.alpha_bar(schedule, t)[:, None]
        return (z - jnp.sqrt(ab) * params[k]) / jnp.sqrt(1.0 - ab)

    return eps_fn


# ------------------------------------------------------------------------------------------ posteriors


@pytest.mark.parametrize("estimator", ["eps_mse", "elbo_term"])
def test_oracle_posterior_concentrates_on_true_class(estimator):
    schedule = diffusion.linear_schedule(200)
    labels = np.arange(300) % K
    y = jnp.asarray(CENTERS[labels])  # point masses: the oracle ε is exact for the true class
    config = em.EMConfig(num_classes=K, estimator=estimator, num_t=8,
                         t_range=(0.02, 0.2), temperature=1.0)
    keys = em.frame_keys(jax.random.PRNGKey(0), len(labels))
    log_b = em.score_classes(config, oracle_eps_fn(schedule), jnp.asarray(CENTERS), schedule, y, keys, 0)
    post = np.exp(np.asarray(mixture.class_posterior(log_b, jnp.full((K,), -np.log(K)))))
    np.testing.assert_allclose(post.sum(1), 1.0, rtol=1e-5)
    p_true = post[np.arange(len(labels)), labels]
    assert np.all(post.argmax(1) == labels) and np.median(p_true) > 0.999


def test_tempering_sharpens_and_annealing_interpolates():
    config = em.EMConfig(num_classes=K, temperature=0.2, initial_temperature=5.0, anneal_steps=100)
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
    config = em.EMConfig(num_classes=K, t_range=(0.02, 0.2))
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
        config = em.EMConfig(num_classes=K, t_range=(0.02, 0.2), temperature=0.05, balance_classes=balance)
        step = jax.jit(mixture.make_train_step(config, oracle_eps_fn(schedule), schedule, optimizer))
        state = create_train_state(jax.random.PRNGKey(0), params, optimizer, K)
        usage[balance] = np.asarray(step(state, {"images": y}, jax.random.PRNGKey(1))[1]["class_usage"])
    assert usage[False][0] > 0.95
    assert np.all(np.abs(usage[True] - 1 / K) < 0.06)
    with pytest.raises(ValueError, match="balance_classes is for the mixture"):
        hmdm.make_train_step(em.EMConfig(num_classes=K, balance_classes=True), oracle_eps_fn(schedule), schedule,
                             optimizer)


@pytest.mark.parametrize("model_type", ["mixture", "hmdm"])
def test_fully_labelled_step_counts_are_the_label_counts(model_type):
    """With every label observed and count_decay = 1, the step's π/A statistics are exactly the counts
    of the labels (so clamped classes reached the M-step unchanged)."""
    rng = np.random.default_rng(4)
    config = blob_config(model_type, 1, 4)
    config = dataclasses.replace(config, em=dataclasses.replace(config.em, count_decay=1.0, learn_pi=True))
    parts = ht.build_parts(config)
    state = ht.init_state(config, parts)
    step = ht.make_step(config, parts)
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


def test_label_loss_is_the_weighted_cross_entropy_of_the_tempered_posterior_and_its_gradient_lowers_it():
    """em.label_loss equals α · mean over observed frames of −log softmax(class_scores/τ + log π)[label]
    (one draw), ignores unknown labels, and a gradient step on the class means lowers it."""
    rng = np.random.default_rng(7)
    schedule = diffusion.linear_schedule(200)
    labels = rng.integers(0, K, 24).astype(np.int32)
    y = jnp.asarray(blobs(rng, labels, spread=0.4))
    observed = np.where(rng.random(24) < 0.5, labels, -1).astype(np.int32)
    config = em.EMConfig(num_classes=K, t_range=(0.02, 0.2), temperature=50.0, label_loss_weight=0.3)
    eps_fn = oracle_eps_fn(schedule)
    log_prior = jnp.log(jnp.asarray([0.5, 0.3, 0.2], jnp.float32))
    keys = em.frame_keys(jax.random.PRNGKey(8), 24)
    params = jnp.asarray(CENTERS) * 0.3  # wrong means and a high temperature: the posterior is soft
    loss = em.label_loss(config, eps_fn, params, schedule, y, jnp.asarray(observed), keys, log_prior, 0,
                         jnp.float32((observed >= 0).sum()))
    scores = np.asarray(em.class_scores(config, eps_fn, params, schedule, y, keys, 0, num_t=1), np.float64)
    logits = scores + np.asarray(log_prior)
    log_post = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    rows = observed >= 0
    expected = 0.3 * -log_post[rows, observed[rows]].mean()
    assert expected > 0.05
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    none = em.label_loss(config, eps_fn, params, schedule, y, jnp.full(24, -1, jnp.int32), keys, log_prior, 0, 0.0)
    assert float(none) == 0.0

    fn = lambda p: em.label_loss(config, eps_fn, p, schedule, y, jnp.asarray(observed), keys, log_prior, 0,
                                 jnp.float32(rows.sum()))
    grad = jax.grad(fn)(params)
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
    base = em.EMConfig(num_classes=K, t_range=(0.02, 0.2), temperature=50.0, label_loss_weight=0.3)

    def loss(cap):
        config = dataclasses.replace(base, label_loss_frames=cap)
        return float(em.observed_label_loss(config, eps_fn, schedule, y, jnp.asarray(observed), log_prior, 0, key)(params))

    uncapped = loss(None)
    assert uncapped > 0.05
    np.testing.assert_allclose([loss(7), loss(16)], uncapped, rtol=1e-6)
    keys = em.frame_keys(key, 24)
    first = rows[:3]
    expected = em.label_loss(base, eps_fn, params, schedule, y[first], jnp.asarray(observed[first]), keys[first],
                             log_prior, 0, jnp.float32(3))
    np.testing.assert_allclose(loss(3), float(expected), rtol=1e-6)
    assert abs(loss(3) - uncapped) > 1e-3
    with pytest.raises(ValueError, match="label_loss_frames"):
        em.EMConfig(num_classes=K, label_loss_frames=0)


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
    config = dataclasses.replace(plain, em=dataclasses.replace(plain.em, label_loss_weight=1.0))
    parts = ht.build_parts(config)
    if model_type == "mixture":
        labels = rng.integers(0, K, 16).astype(np.int32)
        batch = {"images": blobs(rng, labels), "labels": np.where(np.arange(16) < 4, labels, -1).astype(np.int32)}
    else:
        labels = markov_labels(rng, 4, 6)
        batch = {"images": blobs(rng, labels), "labels": np.where(rng.random(labels.shape) < 0.3, labels, -1).astype(np.int32)}
    _, metrics = ht.make_step(config, parts)(ht.init_state(config, parts), batch)
    assert np.isfinite(float(metrics["label_loss"])) and float(metrics["label_loss"]) > 0.1  # ≈ log K untrained
    _, metrics = ht.make_step(plain, ht.build_parts(plain))(ht.init_state(plain, parts), batch)
    assert "label_loss" not in metrics


# ------------------------------------------------------------------------------------------ recovery


def test_mixture_recovers_blobs_from_random_start(tmp_path):
    rng = np.random.default_rng(0)
    train_labels, held_labels = rng.integers(0, K, 512), rng.integers(0, K, 256)
    data = ht.TrainData(blobs(rng, train_labels), train_labels.astype(np.int32), np.zeros(512, bool))
    held = ht.TrainData(blobs(rng, held_labels), held_labels.astype(np.int32), np.zeros(256, bool))
    config = blob_config("mixture", 400, 128)
    result = ht.train(config, data, tmp_path, heldout=held, progress=False)
    ev = ht.evaluate(config, result.parts, result.state, data, held, num_t=16)
    assert ev["heldout_accuracy"] >= 0.95, ev
    assert min(ev["class_usage"]) > 0.2  # no dead or swallowed class
    np.testing.assert_allclose(np.exp(np.asarray(result.state.log_pi)), 1.0 / K, rtol=1e-6)  # π fixed by default


def test_hmdm_recovers_transitions_and_decodes_heldout(tmp_path):
    rng = np.random.default_rng(0)
    train_labels, held_labels = markov_labels(rng, 64, 20), markov_labels(rng, 32, 20)
    full = lambda x: np.ones(x.shape, bool)
    data = ht.TrainData(blobs(rng, train_labels), train_labels, ~full(train_labels), full(train_labels))
    held = ht.TrainData(blobs(rng, held_labels), held_labels, ~full(held_labels), full(held_labels))
    config = blob_config("hmdm", 400, 8)
    result = ht.train(config, data, tmp_path, heldout=held, progress=False, true_A=STICKY_A)
    ev = ht.evaluate(config, result.parts, result.state, data, held, num_t=16, true_A=STICKY_A)
    assert ev["heldout_accuracy"] >= 0.95, ev
    assert ev["A_mae"] <= 0.05, ev
    rows = np.exp(np.asarray(result.state.log_A)).sum(1)
    np.testing.assert_allclose(rows, 1.0, rtol=1e-5)


def test_paper_config_is_the_literal_algorithm():
    paper = em.EMConfig.paper(K)
    assert (paper.estimator, paper.num_t, paper.temperature, paper.learn_pi) == ("random_t", 1, 1.0, True)
    assert em.resolved_t_range(paper, 1000) is None
    assert em.resolved_t_range(em.EMConfig(num_classes=K), 1000) == (300, 600)
    with pytest.raises(ValueError, match="pseudo_count"):
        em.EMConfig(num_classes=K, pseudo_count=0.0)
    with pytest.raises(ValueError, match="t_range"):
        em.EMConfig(num_classes=K, t_range=(0.5, 0.2))


def test_dirichlet_m_step_never_reaches_zero():
    counts = jnp.array([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, 4.0]])
    probs = np.exp(np.asarray(em.dirichlet_log_probs(counts, 1.0, sticky_count=2.0)))
    np.testing.assert_allclose(probs, [[13 / 15, 1 / 15, 1 / 15], [1 / 5, 3 / 5, 1 / 5],
                                       [4 / 15, 4 / 15, 7 / 15]], rtol=1e-6)
    assert probs.min() > 0


# ------------------------------------------------------------------------------------------ the loop


@pytest.mark.parametrize("model_type", ["mixture", "hmdm"])
def test_resume_is_bit_exact(tmp_path, model_type):
    """A run stopped after 6 steps and resumed equals an uninterrupted 12-step run, bit for bit."""
    rng = np.random.default_rng(5)
    if model_type == "mixture":
        labels = rng.integers(0, K, 64).astype(np.int32)
        data = ht.TrainData(blobs(rng, labels), labels, np.zeros(64, bool))
        batch = 16
    else:
        labels = markov_labels(rng, 16, 6)
        data = ht.TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))
        batch = 4
    config = blob_config(model_type, 12, batch, warm_start_steps=0)
    config = dataclasses.replace(config, loop=dataclasses.replace(config.loop, checkpoint_every=3))
    whole = ht.train(config, data, tmp_path / "whole", progress=False).state
    ht.train(config, data, tmp_path / "split", progress=False, stop_after=6)
    _, _, stopped, _ = ht.load_run(tmp_path / "split")
    assert int(stopped.step) == 6
    resumed = ht.train(config, data, tmp_path / "split", progress=False, resume=True).state
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
    data = ht.TrainData(blobs(rng, labels), labels, np.zeros(labels.shape, bool), np.ones(labels.shape, bool))
    single = blob_config("hmdm", 7, 4, warm_start_steps=0, steps_per_call=1)
    fused = dataclasses.replace(single, loop=dataclasses.replace(single.loop, steps_per_call=3))
    a = ht.train(single, data, tmp_path / "single", progress=False).state
    b = ht.train(fused, data, tmp_path / "fused", progress=False).state
    assert int(a.step) == int(b.step) == 7
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-4, atol=1e-5)
    init = ht.init_state(single, ht.build_parts(single))
    assert not np.allclose(np.asarray(jax.tree.leaves(init.params)[0]), np.asarray(jax.tree.leaves(b.params)[0]))


def test_band_selection_after_warm_start_is_saved_and_resumes_exactly(tmp_path):
    """loop.select_t_range: the band chosen at the end of the k-means warm start is the argmax of the
    agreement written to metrics.jsonl, is in the checkpoint's config, and a resumed run keeps it."""
    rng = np.random.default_rng(6)
    labels = rng.integers(0, K, 64).astype(np.int32)
    data = ht.TrainData(blobs(rng, labels), labels, np.zeros(64, bool))
    config = blob_config("mixture", 12, 16, warm_start="kmeans", warm_start_steps=4, select_t_range=True,
                         select_frames=48, checkpoint_every=3)
    whole = ht.train(config, data, tmp_path / "whole", progress=False)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    (choice,) = [r for r in records if "t_range" in r]
    agreement = list(choice["band_agreement"].values())
    assert choice["step"] == 4 and tuple(choice["t_range"]) == em.CANDIDATE_BANDS[int(np.argmax(agreement))]
    assert whole.config.em.t_range == tuple(choice["t_range"])
    assert tuple(ht.load_run(tmp_path / "whole")[0].em.t_range) == whole.config.em.t_range

    ht.train(config, data, tmp_path / "split", progress=False, stop_after=6)
    resumed = ht.train(config, data, tmp_path / "split", progress=False, resume=True)
    assert resumed.config.em.t_range == whole.config.em.t_range
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    no_assignment = blob_config("mixture", 12, 16, select_t_range=True)  # warm_start="none"
    with pytest.raises(ValueError, match="select_t_range"):
        ht.train(no_assignment, data, tmp_path / "none", progress=False)


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
        warm, after = ht.training_labels(config, ht.TrainData(images, labels, observed))
        np.testing.assert_array_equal(warm[observed], labels[observed])
        np.testing.assert_array_equal(after, np.where(observed, labels, -1))
        assert np.mean(warm[~observed] == labels[~observed]) > 0.95


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
    warm, _ = ht.training_labels(config, ht.TrainData(images, blob_of.astype(np.int32), observed))
    np.testing.assert_array_equal(warm, blob_of)
    monkeypatch.setattr(warm_start, "MAX_WARD_FRAMES", 100)
    with pytest.raises(ValueError, match="O\\(N²\\) memory"):
        warm_start.cluster_labels(images, K, "ward")
    with pytest.raises(ValueError, match="unknown warm_start 'spectral'"):
        ht.training_labels(blob_config("mixture", 10, 8, warm_start="spectral"), ht.TrainData(images, blob_of, observed))


def test_observed_batch_fraction_draws_that_share_from_labelled_items():
    rng = np.random.default_rng(10)
    labels = rng.integers(0, K, 200).astype(np.int32)
    observed = rng.random(200) < 0.05
    data = ht.TrainData(blobs(rng, labels), labels, observed)
    config = blob_config("mixture", 10, 16, observed_batch_fraction=0.5)
    clamped = np.stack([np.where(observed, labels, -1)] * 2)
    plain = blob_config("mixture", 10, 16)
    for step in range(6):
        batch = ht.make_batch(config, data, clamped, step)
        from_observed = batch["labels"] >= 0
        assert from_observed[8:].all() and len(batch["labels"]) == 16  # the second half: labelled items
        # the first half is the plain batch's first half; the whole is a function of (seed, step)
        np.testing.assert_array_equal(batch["images"][:8], ht.make_batch(plain, data, clamped, step)["images"][:8])
        np.testing.assert_array_equal(batch["images"], ht.make_batch(config, data, clamped, step)["images"])
    shares = np.mean([(ht.make_batch(plain, data, clamped, s)["labels"] >= 0).mean() for s in range(40)])
    assert shares < 0.1  # without it, about the 5 % observed
    unsupervised = data._replace(observed=np.zeros(200, bool))  # nothing to weight up: plain batches
    np.testing.assert_array_equal(ht.make_batch(config, unsupervised, clamped, 3)["images"],
                                  ht.make_batch(plain, unsupervised, clamped, 3)["images"])
    with pytest.raises(ValueError, match="observed_batch_fraction must be in"):
        ht.LoopConfig(observed_batch_fraction=1.0)


def test_presets_final_estimator_and_observed_batch_fraction():
    """The mixture is finally classified by its grid ELBO, weights labelled images up and, when labels are
    observed, adds the label loss; HMDM keeps its tempered training scorer, uniform batches and no label loss."""
    mix = ht.preset("cpu-small", "mixture", 10, (8, 8, 1), num_images=1797).loop
    assert (mix.final_estimator, mix.final_num_t, mix.observed_batch_fraction, mix.select_t_range) == ("elbo", 50, 0.5, True)
    assert mix.warm_start == "ward"
    # Ward's O(N²) memory: image sets above its limit keep k-means (the run would otherwise be refused)
    assert ht.preset("cpu-small", "mixture", 10, (28, 28, 1), num_images=60_000).loop.warm_start == "kmeans"
    unlabelled = ht.preset("cpu-small", "mixture", 10, (8, 8, 1), observed_labels=0.0)
    labelled = ht.preset("cpu-small", "mixture", 10, (8, 8, 1), observed_labels=0.1)
    assert (unlabelled.em.label_loss_weight, unlabelled.loop.num_steps) == (0, 3000)
    assert (labelled.em.label_loss_weight, labelled.loop.num_steps) == (0.1, 6000)
    assert ht.preset("cpu-small", "hmdm", 10, (8, 8, 1), observed_labels=0.1).em.label_loss_weight == 0
    hmdm_loop = ht.preset("cpu-small", "hmdm", 10, (8, 8, 1)).loop
    assert hmdm_loop.final_estimator is None and hmdm_loop.observed_batch_fraction == 0 and not hmdm_loop.select_t_range
    assert hmdm_loop.warm_start == "kmeans"
    with pytest.raises(ValueError, match="final_estimator must be None or one of"):
        ht.LoopConfig(final_estimator="elbow")
    with pytest.raises(ValueError, match="hard_estep_estimator must be None or one of"):
        ht.LoopConfig(hard_estep_estimator="elbow")


@pytest.mark.parametrize("estimator", [None, "elbo"])
def test_hard_estep_clamps_decoded_classes_keeps_observed_labels_and_resumes_exactly(tmp_path, estimator):
    rng = np.random.default_rng(8)
    labels = rng.integers(0, K, 64).astype(np.int32)
    observed = rng.random(64) < 0.25
    data = ht.TrainData(blobs(rng, labels), labels, observed)
    config = blob_config("mixture", 12, 16, warm_start="kmeans", warm_start_steps=4, hard_estep_every=4,
                         hard_estep_num_t=2, hard_estep_estimator=estimator, reseed_every=0, checkpoint_every=4)
    whole = ht.train(config, data, tmp_path / "whole", progress=False)
    metadata = ht.load_run(tmp_path / "whole")[3]
    assigned = np.asarray(metadata["reseed"]["labels"])
    assert metadata["reseed"]["until"] == 12  # E-steps at steps 4 and 8 (none at the end of the run)
    assert assigned.shape == (64,) and np.all((assigned >= 0) & (assigned < K))
    np.testing.assert_array_equal(assigned[observed], labels[observed])
    # the clamp is exactly the decoding of the training frames by the step-8 state (observed labels aside)
    _, parts, state8, _ = ht.load_run(tmp_path / "whole", step=8)
    decoded = ht.predict_states(config, parts, state8, data.images, None, num_t=2,
                                batch_size=config.loop.eval_batch_size,
                                key=jax.random.fold_in(state8.key, ht.HARD_ESTEP_KEY), estimator=estimator)["states"]
    np.testing.assert_array_equal(assigned[~observed], decoded[~observed])
    if estimator is not None:  # the option is used: the training scorer decodes differently
        other = ht.predict_states(config, parts, state8, data.images, None, num_t=2,
                                  batch_size=config.loop.eval_batch_size,
                                  key=jax.random.fold_in(state8.key, ht.HARD_ESTEP_KEY))["states"]
        assert np.any(other[~observed] != decoded[~observed])

    ht.train(config, data, tmp_path / "split", progress=False, stop_after=6)  # inside the first clamp
    resumed = ht.train(config, data, tmp_path / "split", progress=False, resume=True)
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_overrides_name_unknown_fields():
    config = blob_config("mixture", 10, 8)
    changed = ht.apply_overrides(config, ["em.temperature=0.3", "loop.num_steps=7", "em.t_range=[0.1, 0.4]"])
    assert changed.em.temperature == 0.3 and changed.loop.num_steps == 7 and changed.em.t_range == (0.1, 0.4)
    assert ht.RunConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(ValueError, match="em.temprature"):
        ht.apply_overrides(config, ["em.temprature=0.3"])


def test_reseed_revives_dead_states_and_keeps_observed_labels():
    """An untrained network decodes the blobs into fewer than K states; the re-seed clamp splits the
    largest state so that every state gets frames, and never overrides an observed label."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, 256).astype(np.int32)
    data = ht.TrainData(blobs(rng, labels), labels, np.zeros(256, bool))
    config = blob_config("mixture", 60, 64)
    parts = ht.build_parts(config)
    state = ht.init_state(config, parts)
    observed = np.full(256, -1, np.int32)
    observed[:5] = 2
    decoded = ht.predict_states(config, parts, state, data.images, None, num_t=config.loop.reseed_num_t,
                                batch_size=config.loop.eval_batch_size,
                                key=jax.random.fold_in(state.key, ht.RESEED_KEY))["states"]
    assert np.bincount(decoded, minlength=K).min() < 0.5 * 256 / K  # the premise: a dead state
    clamp = ht.reseed_dead_states(config, parts, state, data, observed)
    np.testing.assert_array_equal(clamp[:5], 2)
    assigned = np.where(clamp >= 0, clamp, decoded)
    assert np.bincount(assigned, minlength=K).min() >= 0.5 * 256 / K


# ------------------------------------------------------------------------------------------ scoring band


def gaussian_oracle_eps_fn(schedule, spread):
    """The exact E[ε | z_t, k] of Gaussian classes N(μ_k, spread² I) at ``params [K, D]``."""

    def eps_fn(params, z, t, k):
        ab = diffusion.alpha_bar(schedule, t)[:, None]
        return jnp.sqrt(1.0 - ab) * (z - jnp.sqrt(ab) * params[k]) / (ab * spread**2 + 1.0 - ab)

    return eps_fn


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
        log_b = emission.log_emission(eps_fn, params, schedule, y, em.frame_keys(key, len(labels)), K,
                                      estimator="eps_mse", num_t=1, t_range=t_range)
        assert value == pytest.approx(np.mean(np.argmax(np.asarray(log_b), 1) == labels), abs=1e-6)
    # overlapping classes (spread 0.3): at t ≤ 5% of T one draw's noise on the few-pixel difference
    # between the classes' ε dominates; in the middle the exact ε separates them
    assert agreement[0] < 0.7 and agreement[1] > 0.95
    best, scores = em.select_t_range(config, eps_fn, params, schedule, y, jnp.asarray(labels), key, bands)
    assert best == bands[int(np.argmax(agreement))] != bands[0] and np.allclose(scores, agreement)
