"""Tests of hmdm_jax.emission with an oracle ε-network on point-mass classes (pure jnp, no Flax).

Class c's data is the point mass y = μ_c. The oracle for class k returns the exact noise *assuming*
y = μ_k: ε_θ(z_t, t, k) = (z_t − √ᾱ_t μ_k)/√(1 − ᾱ_t) (+ an optional class-independent "model error"),
so for the true class the reverse mean is exactly the posterior mean, and for a wrong class
ε_θ − ε = √(ᾱ_t/(1 − ᾱ_t)) (μ_c − μ_k), independent of the noise. Every ELBO term is then a closed form.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from hmdm_jax import diffusion as dfn
from hmdm_jax import em as hem
from hmdm_jax import emission as em

K = 3
SMALL_T = 20
SCHED_SMALL = dfn.linear_schedule(SMALL_T)
SCHED_BIG = dfn.linear_schedule(1000)


def oracle_eps(params, z_t, t, k):
    """The oracle ε-network. params: mus [K, *event], offset (class k scores μ_{k+offset}), error."""
    ab = params["alpha_bars"][t - 1].reshape((-1,) + (1,) * (z_t.ndim - 1))
    one_minus = params["one_minus"][t - 1].reshape(ab.shape)
    mu = params["mus"][k + params["offset"]]
    return (z_t - jnp.sqrt(ab) * mu) / jnp.sqrt(one_minus) + params["error"] * jnp.sin(3.0 * z_t)


def make_params(schedule, mus, offset=0, error=0.0):
    t = jnp.arange(1, schedule.num_steps + 1)
    return {"mus": jnp.asarray(mus, jnp.float32), "offset": jnp.int32(offset), "error": jnp.float32(error),
            "alpha_bars": dfn.alpha_bar(schedule, t), "one_minus": dfn.one_minus_alpha_bar(schedule, t)}


def class_means(event_shape, seed=0, num_classes=K):
    """Well-separated class means in [−0.8, 0.8] on the 8-bit grid (so the discretized decoder applies)."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(25, 231, size=(num_classes,) + tuple(event_shape))
    return (2 * levels / 255 - 1).astype(np.float32)


# Every estimator with a small num_t, plus scaled/per-dim/discretized variants; computed in ONE
# jitted call per (shape, K, schedule) so that the whole file compiles only a handful of graphs.
BASE_CONFIGS = (
    ("random_t", (("estimator", "random_t"),)),
    ("last_decoder", (("estimator", "last_decoder"),)),
    ("multi_t", (("estimator", "multi_t"), ("num_t", 3))),
    ("elbo", (("estimator", "elbo"),)),
    ("elbo_term", (("estimator", "elbo_term"), ("num_t", 2))),
    ("eps_mse", (("estimator", "eps_mse"), ("num_t", 2))),
    ("eps_mse_scaled", (("estimator", "eps_mse"), ("num_t", 2), ("scale", 7.5))),
    ("eps_mse_per_dim", (("estimator", "eps_mse"), ("num_t", 2), ("per_dim", True), ("scale", 7.5))),
    ("random_t_disc", (("estimator", "random_t"), ("decoder", "discretized"), ("variance", "beta_tilde"))),
    ("last_decoder_disc", (("estimator", "last_decoder"), ("decoder", "discretized"))),
    ("elbo_disc", (("estimator", "elbo"), ("decoder", "discretized"), ("variance", "beta_tilde"))),
    ("elbo_grid", (("estimator", "elbo"), ("num_t", 7))),
)
ESTIMATOR_NAMES = tuple(name for name, _ in BASE_CONFIGS)


@functools.partial(jax.jit, static_argnames=("num_classes", "configs", "chunk_size"))
def all_scores(params, schedule, y, key, num_classes, configs=BASE_CONFIGS, chunk_size=None):
    return {name: em.log_emission(oracle_eps, params, schedule, y, key, num_classes, chunk_size=chunk_size,
                                  **dict(cfg))
            for name, cfg in configs}


# ------------------------------------------------------------------------------------ closed forms

def analytic_elbo(schedule, mus, true_class, variance="beta", decoder="gaussian"):
    """ELBO_k(μ_c) for every k under the exact oracle (float64): ``[K]`` nats."""
    betas = np.asarray(schedule.betas, np.float64)
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    om = 1 - ab
    mus = np.asarray(mus, np.float64).reshape(len(mus), -1)
    y = mus[true_class]
    d = y.size
    d2 = np.sum((mus - y) ** 2, axis=1)  # [K]
    out = np.zeros(len(mus))
    # t = 1: the decoder mean is exactly μ_k, the variance β_1
    if decoder == "gaussian":
        out += -0.5 * d * np.log(2 * np.pi * betas[0]) - d2 / (2 * betas[0])
    else:
        out += np.array([_discretized_ref(y, mu, math.sqrt(betas[0])) for mu in mus])
    for t in range(2, len(betas) + 1):
        i = t - 1
        tilde = om[i - 1] / om[i] * betas[i]
        sigma2 = betas[i] if variance == "beta" else tilde
        const = 0.5 * d * (np.log(sigma2 / tilde) + tilde / sigma2 - 1)
        mean_sq = betas[i] ** 2 / (alphas[i] * om[i]) * ab[i] / om[i] * d2  # ‖μ̃ − μ_θ‖²
        out -= const + mean_sq / (2 * sigma2)
    out -= 0.5 * (d * (-np.log(om[-1]) + om[-1] - 1) + ab[-1] * np.sum(y ** 2))
    return out


def _discretized_ref(y, mean, std):
    h = 1 / 255
    y, mean = np.asarray(y, np.float64), np.asarray(mean, np.float64)
    lo, hi = (y - h - mean) / std, (y + h - mean) / std
    a, b = np.where(mean <= y, (lo, hi), (-hi, -lo))
    inner = stats.norm.logcdf(-a) + np.log1p(-np.exp(stats.norm.logcdf(-b) - stats.norm.logcdf(-a)))
    return np.where(y < -1 + h, stats.norm.logcdf(hi), np.where(y > 1 - h, stats.norm.logsf(lo), inner)).sum()


def eps_gap_sq(schedule, t, mus, true_class):
    """‖ε_θ(·, t, k) − ε‖² = ᾱ_t/(1 − ᾱ_t) ‖μ_c − μ_k‖² for the exact oracle: ``[len(t), K]``."""
    ab = np.cumprod(1 - np.asarray(schedule.betas, np.float64))[np.asarray(t) - 1]
    mus = np.asarray(mus, np.float64).reshape(len(mus), -1)
    d2 = np.sum((mus - mus[true_class]) ** 2, axis=1)
    return (ab / (1 - ab))[:, None] * d2[None]


# ------------------------------------------------------------------------------------ shapes and CRN

SHAPES = {"vector": (12,), "image_c1": (4, 4, 1), "image_c3": (3, 3, 3)}


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_every_estimator_gives_finite_batch_by_class(shape_name):
    event = SHAPES[shape_name]
    mus = class_means(event, seed=1)
    labels = np.array([0, 1, 2, 2, 1, 0, 1])
    params = make_params(SCHED_SMALL, mus, error=0.2)
    scores = all_scores(params, SCHED_SMALL, jnp.asarray(mus[labels]), jax.random.PRNGKey(0), K)
    d = math.prod(event)
    for name, log_b in scores.items():
        assert log_b.shape == (7, K) and log_b.dtype == jnp.float32, name
        assert np.all(np.isfinite(log_b)), name
    # scale multiplies; per_dim divides by D
    np.testing.assert_allclose(scores["eps_mse_scaled"], 7.5 * scores["eps_mse"], rtol=1e-6)
    np.testing.assert_allclose(scores["eps_mse_per_dim"], 7.5 * scores["eps_mse"] / d, rtol=1e-6)


def test_class_independent_network_gives_identical_class_scores():
    """Common random numbers: if ε_θ ignores k, the K scores of an observation are equal exactly,
    while two copies of the same observation get their own draws (different scores)."""
    mus = np.repeat(class_means((12,), seed=2)[:1], K, axis=0)  # every class has the same mean
    params = make_params(SCHED_SMALL, mus, error=0.2)
    y = jnp.asarray(np.repeat(class_means((12,), seed=3)[:1], 7, axis=0))  # 7 copies of one point
    scores = all_scores(params, SCHED_SMALL, y, jax.random.PRNGKey(1), K)
    for name, log_b in scores.items():
        log_b = np.asarray(log_b)
        np.testing.assert_array_equal(log_b, np.repeat(log_b[:, :1], K, axis=1), err_msg=name)
        if name not in ("elbo", "elbo_disc", "elbo_grid"):  # sampled: own t per copy
            assert len(np.unique(log_b[:, 0])) > 1, name
        else:  # own z_t draws per copy
            assert len(np.unique(log_b[:, 0])) == 7, name


def test_vmapped_classes_equal_python_loop_over_classes():
    """Scoring class k alone (K = 1, with the same key) reproduces column k of the vmapped result."""
    mus = class_means((12,), seed=1)
    y = jnp.asarray(mus[np.array([0, 1, 2, 2, 1, 0, 1])])
    key = jax.random.PRNGKey(0)
    together = all_scores(make_params(SCHED_SMALL, mus, error=0.2), SCHED_SMALL, y, key, K)
    looped = [all_scores(make_params(SCHED_SMALL, mus, offset=k, error=0.2), SCHED_SMALL, y, key, 1)
              for k in range(K)]
    for name in ESTIMATOR_NAMES:
        stacked = np.concatenate([np.asarray(col[name]) for col in looped], axis=1)
        np.testing.assert_allclose(stacked, together[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_chunked_equals_unchunked_with_ragged_last_chunk():
    mus = class_means((12,), seed=1)
    y = jnp.asarray(mus[np.array([0, 1, 2, 2, 1, 0, 1])])  # B = 7, chunks of 3: 3 + 3 + 1 (padded)
    params = make_params(SCHED_SMALL, mus, error=0.2)
    key = jax.random.PRNGKey(0)
    whole = all_scores(params, SCHED_SMALL, y, key, K)
    chunked = all_scores(params, SCHED_SMALL, y, key, K, chunk_size=3)
    for name in ESTIMATOR_NAMES:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-6, atol=1e-6, err_msg=name)
    # jitted: run eagerly, every op compiles on its own
    big_chunk = jax.jit(lambda: em.log_emission(oracle_eps, params, SCHED_SMALL, y, key, K, chunk_size=100, num_t=2))()
    np.testing.assert_allclose(big_chunk, whole["eps_mse"], rtol=1e-6)
    terms_c, terms = jax.jit(lambda: [em.elbo_terms(oracle_eps, params, SCHED_SMALL, y, key, K, chunk_size=c)
                                      for c in (3, None)])()
    np.testing.assert_allclose(terms_c.terms, terms.terms, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(terms_c.prior, terms.prior, rtol=1e-6)


# ------------------------------------------------------------------------------------ the ELBO

@pytest.mark.parametrize("variance,decoder", [("beta", "gaussian"), ("beta_tilde", "discretized")])
def test_elbo_is_sum_of_terms_and_matches_closed_form(variance, decoder):
    event = (12,)
    mus = class_means(event, seed=4)
    labels = np.array([0, 1, 2, 1])
    params = make_params(SCHED_SMALL, mus)  # exact oracle
    y, key = jnp.asarray(mus[labels]), jax.random.PRNGKey(3)
    elbo = em.log_emission(oracle_eps, params, SCHED_SMALL, y, key, K, estimator="elbo", variance=variance,
                           decoder=decoder)
    parts = em.elbo_terms(oracle_eps, params, SCHED_SMALL, y, key, K, variance=variance, decoder=decoder)
    assert parts.terms.shape == (SMALL_T, 4, K) and parts.prior.shape == (4,)
    np.testing.assert_array_equal(parts.t_values, np.arange(1, SMALL_T + 1))
    np.testing.assert_allclose(parts.terms.sum(0) + parts.prior[:, None], elbo, rtol=1e-5)
    for i, c in enumerate(labels):
        np.testing.assert_allclose(elbo[i], analytic_elbo(SCHED_SMALL, mus, c, variance, decoder), rtol=2e-4)
    # the grid estimate is the weighted sum of the terms at the grid's t (same draws)
    grid_t, weights = em.elbo_grid(SMALL_T, 6)
    grid = em.log_emission(oracle_eps, params, SCHED_SMALL, y, key, K, estimator="elbo", num_t=6,
                           variance=variance, decoder=decoder)
    np.testing.assert_allclose(grid, np.tensordot(weights, np.asarray(parts.terms)[grid_t - 1], 1)
                               + np.asarray(parts.prior)[:, None], rtol=1e-5)


def test_elbo_terms_are_kl_constants_plus_weighted_eps_error():
    """Each t ≥ 2 term is −(const_t + w_t ‖ε − ε_θ‖²): the class-dependent part elbo_term estimates."""
    mus = class_means((12,), seed=5)
    labels = np.array([2, 0])
    params = make_params(SCHED_SMALL, mus)
    parts = em.elbo_terms(oracle_eps, params, SCHED_SMALL, jnp.asarray(mus[labels]), jax.random.PRNGKey(0), K,
                          t_values=[1, 2, 9, 20])
    betas = np.asarray(SCHED_SMALL.betas, np.float64)
    ab = np.cumprod(1 - betas)
    t = np.array([1, 2, 9, 20])
    w = betas[t - 1] ** 2 / (2 * betas[t - 1] * (1 - betas[t - 1]) * (1 - ab[t - 1]))
    for i, c in enumerate(labels):
        class_part = -w[:, None] * eps_gap_sq(SCHED_SMALL, t, mus, c)  # [4, K]
        got = np.asarray(parts.terms[:, i], np.float64)
        np.testing.assert_allclose(got - got[:, [c]], class_part - class_part[:, [c]], rtol=1e-4, atol=1e-3)


def test_elbo_grid_weights():
    t, w = em.elbo_grid(1000, 50)
    assert t.shape == w.shape == (50,) and t[0] == 1 and w[0] == 1
    assert w.sum() == 1000 and np.all(np.diff(t) > 0) and t[-1] <= 1000
    blocks = np.split(np.arange(2, 1001), np.cumsum(w[1:].astype(int))[:-1])
    assert all(lo_hi[0] <= m <= lo_hi[-1] for lo_hi, m in zip(blocks, t[1:]))  # midpoints lie in blocks
    full_t, full_w = em.elbo_grid(20, None)
    np.testing.assert_array_equal(full_t, np.arange(1, 21)) and np.testing.assert_array_equal(full_w, 1)
    np.testing.assert_array_equal(em.elbo_grid(20, 20)[0], full_t)
    np.testing.assert_array_equal(em.elbo_grid(20, 99)[0], full_t)
    with pytest.raises(ValueError, match="num_t >= 2"):
        em.elbo_grid(20, 1)


def test_elbo_bounds_gaussian_log_likelihood():
    """Class data N(μ, s² I) with the Bayes-optimal ε-network E[ε | z_t]: E ELBO ≤ log p(y), and with
    σ_t² = β_t the bound is nearly tight (T = 200)."""
    s, d, n = 0.5, 4, 1000
    sched = dfn.linear_schedule(200)
    mus = jnp.array([[0.5, -0.5, 0.2, 0.0], [-0.5, 0.5, 0.0, 0.3]], jnp.float32)
    y = mus[0] + s * jax.random.normal(jax.random.PRNGKey(1), (n, d))

    def gauss_eps(params, z, t, k):
        ab, om = dfn.alpha_bar(sched, t)[:, None], dfn.one_minus_alpha_bar(sched, t)[:, None]
        return jnp.sqrt(om) * (z - jnp.sqrt(ab) * params[k]) / (ab * s * s + om)

    @jax.jit
    def both(y):
        return [em.log_emission(gauss_eps, mus, sched, y, jax.random.PRNGKey(0), 2, estimator="elbo", variance=v)
                for v in ("beta", "beta_tilde")]

    log_p = stats.norm(np.asarray(mus[0], np.float64), s).logpdf(np.asarray(y, np.float64)).sum(1)
    for variance, elbo in zip(("beta", "beta_tilde"), both(y)):
        gap = np.asarray(elbo[:, 0], np.float64) - log_p
        se = gap.std() / math.sqrt(n)
        assert gap.mean() < 4 * se, variance  # a lower bound
        assert gap.mean() > (-0.4 if variance == "beta" else -6.0), variance
        assert np.mean(np.asarray(elbo).argmax(1) == 0) > 0.85  # mostly classified to the true class


# ------------------------------------------------------------------------------------ oracle classification

BIG_CONFIGS = (
    ("random_t", (("estimator", "random_t"),)),
    ("last_decoder", (("estimator", "last_decoder"), ("decoder", "discretized"))),
    ("multi_t", (("estimator", "multi_t"), ("num_t", 32))),
    ("elbo_grid", (("estimator", "elbo"), ("num_t", 20), ("decoder", "discretized"))),
    ("elbo_term", (("estimator", "elbo_term"),)),
    ("elbo_term_many", (("estimator", "elbo_term"), ("num_t", 16))),
    ("eps_mse", (("estimator", "eps_mse"),)),
    ("eps_mse_full", (("estimator", "eps_mse"), ("t_range", (1, 1000)))),
)


@pytest.fixture(scope="module")
def digits_like():
    """784-dim images [B, 28, 28, 1] of 3 point-mass classes, scored under the exact and a noisy oracle."""
    mus = class_means((28, 28, 1), seed=7)
    labels = np.arange(240) % K
    y = jnp.asarray(mus[labels])
    key = jax.random.PRNGKey(11)
    out = {}
    for error in (0.0, 0.3):
        out[error] = all_scores(make_params(SCHED_BIG, mus, error=error), SCHED_BIG, y, key, K, BIG_CONFIGS)
    return mus, labels, out


@pytest.mark.parametrize("name", ["last_decoder", "multi_t", "elbo_grid", "elbo_term", "elbo_term_many",
                                  "eps_mse", "eps_mse_full"])
@pytest.mark.parametrize("error", [0.0, 0.3])
def test_oracle_ranks_true_class_first(digits_like, name, error):
    mus, labels, out = digits_like
    log_b = np.asarray(out[error][name], np.float64)
    assert np.all(np.isfinite(log_b))
    if error > 0 and name in ("elbo_term", "eps_mse", "eps_mse_full"):
        # one t draw per example: a draw near t = T carries little class signal under a noisy ε
        assert np.mean(log_b.argmax(1) == labels) >= 0.9
    else:
        np.testing.assert_array_equal(log_b.argmax(1), labels)  # every example
    margin = log_b[np.arange(len(labels)), labels][:, None] - log_b
    assert np.median(np.sort(margin, 1)[:, 1]) > 10.0  # and not by a hair
    if name in ("elbo_grid", "last_decoder"):  # realistic magnitudes: 784-dim log-likelihoods
        wrong = log_b[labels[:, None] != np.arange(K)[None]]
        assert np.all(wrong < -1e3) and np.median(wrong) > -1e8


def test_random_t_is_right_on_average_but_weak(digits_like):
    """The paper's estimator: E[true − wrong] = c²‖δ‖²/(2σ²) > 0, yet a single draw is a weak classifier."""
    mus, labels, out = digits_like
    log_b = np.asarray(out[0.0]["random_t"], np.float64)
    n = len(labels)
    true = log_b[np.arange(n), labels]
    for k in range(1, K):
        diff = true - log_b[np.arange(n), (labels + k) % K]
        # heavy-tailed (a draw near t = 1 gives gaps of 1e2..1e5 nats): a sign test, 3σ above a fair coin
        assert np.mean(diff > 0) > 0.5 + 3 * math.sqrt(0.25 / n)
    acc = np.mean(log_b.argmax(1) == labels)
    assert 0.36 < acc < 0.9  # far from the other estimators' 1.0 (the measured failure of the paper's b̃)


def test_random_t_true_class_mean_matches_closed_form(digits_like):
    """True class: z_{t−1} − μ̃ ~ N(0, β̃_t I), so E log N(z_{t−1}; μ̃, β_t) = −D/2 log 2πβ_t − Dβ̃_t/(2β_t),
    averaged over t ~ U{1..T} (t = 1: the decoder, log N(y; y, β_1))."""
    mus, labels, out = digits_like
    log_b = np.asarray(out[0.0]["random_t"], np.float64)
    true = log_b[np.arange(len(labels)), labels]
    betas = np.asarray(SCHED_BIG.betas, np.float64)
    om = 1 - np.cumprod(1 - betas)
    tilde = np.concatenate([[0.0], om[:-1] / om[1:] * betas[1:]])
    d = 784
    expected = np.mean(-0.5 * d * np.log(2 * np.pi * betas) - d * tilde / (2 * betas))
    assert abs(true.mean() - expected) < 4.5 * true.std() / math.sqrt(len(true))


def test_eps_estimators_expectations_match_closed_form(digits_like):
    """elbo_term: E[true − wrong] = ELBO_true − ELBO_k (the class-dependent part, exactly); eps_mse:
    E[−‖ε − ε_θ‖²] = −mean over the t-band of ᾱ_t/(1 − ᾱ_t) ‖Δμ‖²."""
    mus, labels, out = digits_like
    betas = np.asarray(SCHED_BIG.betas, np.float64)
    ab = np.cumprod(1 - betas)
    t_all = np.arange(1, 1001)
    w = betas ** 2 / (2 * betas * (1 - betas) * (1 - ab))
    for name in ("elbo_term_many", "eps_mse"):
        log_b = np.asarray(out[0.0][name], np.float64)
        for c in range(K):
            rows = log_b[labels == c]
            if name == "elbo_term_many":
                expected = -(w[:, None] * eps_gap_sq(SCHED_BIG, t_all, mus, c)).sum(0)  # [K]
            else:
                band = np.arange(300, 601)
                expected = -eps_gap_sq(SCHED_BIG, band, mus, c).mean(0)
            np.testing.assert_allclose(rows[:, c], 0.0, atol=1e-3)
            for k in range(K):
                if k != c:
                    se = rows[:, k].std() / math.sqrt(len(rows))
                    assert abs(rows[:, k].mean() - expected[k]) < 4.5 * se + 1e-4 * abs(expected[k]), (name, c, k)


# ------------------------------------------------------------------------------------ t ranges, jit, gradients

@pytest.mark.parametrize("estimator,t_range,expected", [
    ("eps_mse", None, (300, 600)), ("eps_mse", (5, 9), (5, 9)), ("random_t", None, (1, 1000)),
    ("elbo_term", None, (1, 1000)), ("last_decoder", None, (1, 1)), ("multi_t", (998, 1000), (998, 1000))])
def test_t_draws_cover_exactly_the_range(estimator, t_range, expected):
    seen = []

    def spy_eps(params, z, t, k):
        jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t)
        return jnp.zeros_like(z)

    num_t = None if estimator in ("random_t", "last_decoder") else 8
    em.log_emission(spy_eps, None, SCHED_BIG, jnp.zeros((100, 2)), jax.random.PRNGKey(0), 2, estimator=estimator,
                    num_t=num_t, t_range=t_range)
    t = np.concatenate([s.ravel() for s in seen])
    assert t.min() >= expected[0] and t.max() <= expected[1]
    width = expected[1] - expected[0] + 1
    if width > 1:  # uniform: the mean is the band's centre, both ends are reached when the band is small
        assert abs(t.mean() - (expected[0] + expected[1]) / 2) < 4.5 * width / math.sqrt(12 * t.size)
    if width <= 5:
        assert set(np.unique(t)) == set(range(expected[0], expected[1] + 1))
    if t_range is None:
        assert em.default_t_range(estimator, 1000) == expected


def test_jit_factory_and_traced_scale_agree_with_eager():
    mus = class_means((12,), seed=1)
    params = make_params(SCHED_SMALL, mus, error=0.2)
    y, key = jnp.asarray(mus[[0, 1, 2]]), jax.random.PRNGKey(4)
    eager = em.log_emission(oracle_eps, params, SCHED_SMALL, y, key, K, num_t=2, t_range=(3, 8), per_dim=True)
    fn = em.make_log_emission(oracle_eps, K, num_t=2, t_range=[3, 8], per_dim=True)
    np.testing.assert_allclose(fn(params, SCHED_SMALL, y, key), eager, rtol=1e-6)
    jitted = jax.jit(em.log_emission, static_argnames=em.EMISSION_STATIC_ARGNAMES)
    scaled = jitted(oracle_eps, params, SCHED_SMALL, y, key, K, num_t=2, t_range=(3, 8), per_dim=True,
                    scale=jnp.float32(5.0))
    np.testing.assert_allclose(scaled, 5.0 * eager, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown log_emission options"):
        em.make_log_emission(oracle_eps, K, temperature=0.1)


@pytest.mark.parametrize("estimator", ["eps_mse", "elbo", "random_t"])
def test_scores_are_differentiable_in_params(estimator):
    mus = class_means((6,), seed=1)
    y = jnp.asarray(mus[[0, 1, 2]])

    def total(m):
        params = make_params(SCHED_SMALL, mus, error=0.1) | {"mus": m}
        return jnp.sum(em.log_emission(oracle_eps, params, SCHED_SMALL, y, jax.random.PRNGKey(0), K,
                                       estimator=estimator))

    grad = jax.grad(total)(jnp.asarray(mus))
    assert np.all(np.isfinite(grad)) and np.any(np.abs(grad) > 0)


# ------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="paper"), "unknown estimator"),
    (dict(t_range=(0, 5)), "t_range"),
    (dict(t_range=(10, 5)), "t_range"),
    (dict(t_range=(1, 21)), "t_range"),
    (dict(t_range=(5,)), "pair of ints"),
    (dict(estimator="elbo", t_range=(2, 5)), "does not apply"),
    (dict(num_t=0), "num_t"),
    (dict(estimator="random_t", num_t=4), "multi_t"),
    (dict(estimator="elbo", num_t=1), "num_t >= 2"),
    (dict(variance="learned"), "unknown variance"),
    (dict(decoder="bernoulli"), "unknown decoder"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(num_classes=0), "num_classes"),
    (dict(y=jnp.zeros((12,))), "batch axis"),
])
def test_bad_arguments_raise_clear_value_errors(kwargs, match):
    args = dict(y=jnp.zeros((2, 12)), num_classes=K)
    args.update(kwargs)
    y, num_classes = args.pop("y"), args.pop("num_classes")
    params = make_params(SCHED_SMALL, class_means((12,)))
    with pytest.raises(ValueError, match=match):
        em.log_emission(oracle_eps, params, SCHED_SMALL, y, jax.random.PRNGKey(0), num_classes, **args)


# ------------------------------------------------------------------------------------ estimators as values

def test_registry_is_ordered_by_name_and_get_estimator_looks_names_up():
    assert tuple(em.ESTIMATORS) == ("random_t", "last_decoder", "multi_t", "elbo", "elbo_term", "eps_mse")
    for name, est in em.ESTIMATORS.items():
        assert isinstance(est, em.Estimator) and est.name == name
        assert em.get_estimator(name) is est and em.get_estimator(est) is est
        hash(est)  # a static argument of jitted functions
    assert "eps_mse" in em.ESTIMATORS and "paper" not in em.ESTIMATORS
    assert str(em.ESTIMATORS) == str(tuple(em.ESTIMATORS))  # what error messages that print it show
    with pytest.raises(ValueError, match=r"unknown estimator 'paper'; expected one of \('random_t'.*'eps_mse'\)"):
        em.get_estimator("paper")
    with pytest.raises(TypeError):
        em.ESTIMATORS["mine"] = em.ESTIMATORS["eps_mse"]  # read-only


@pytest.mark.parametrize("name,num_t,expected", [
    ("random_t", None, ("random_t", 1)), ("random_t", 1, ("random_t", 1)), ("random_t", 5, ("multi_t", 5)),
    ("last_decoder", None, ("last_decoder", 1)), ("last_decoder", 5, ("last_decoder", 1)),
    ("multi_t", 5, ("multi_t", 5)), ("elbo", 50, ("elbo", 50)), ("elbo", None, ("elbo", None)),
    ("elbo_term", 3, ("elbo_term", 3)), ("eps_mse", None, ("eps_mse", None))])
def test_resolve_num_draws_single_draw_rule(name, num_t, expected):
    est, draws = em.resolve_num_draws(name, num_t)
    assert (est.name, draws) == expected
    assert em.resolve_num_draws(em.ESTIMATORS[name], num_t) == (est, draws)


def test_band_steps_rounds_fractions_into_one_to_t():
    assert em.band_steps((0.3, 0.6), 1000) == (300, 600) == em.default_t_range("eps_mse", 1000)
    assert em.band_steps(em.FULL_BAND, 20) == (1, 20) and em.band_steps(em.FIRST_STEP_BAND, 20) == (1, 1)
    assert em.band_steps((0.001, 0.002), 100) == (1, 1) and em.band_steps((0.9, 1.0), 7) == (6, 7)
    for num_steps in (20, 200, 1000):  # the rounding em.resolved_t_range used before, for every candidate band
        for lo, hi in hem.CANDIDATE_BANDS:
            old_lo = max(1, int(round(lo * num_steps)))
            assert em.band_steps((lo, hi), num_steps) == (old_lo, max(old_lo, int(round(hi * num_steps))))


def test_estimator_value_is_accepted_and_a_new_estimator_is_one_definition():
    mus = class_means((12,), seed=1)
    params = make_params(SCHED_SMALL, mus, error=0.2)
    y, key = jnp.asarray(mus[[0, 1, 2, 1]]), jax.random.PRNGKey(2)
    by_name = em.log_emission(oracle_eps, params, SCHED_SMALL, y, key, K, estimator="elbo_term", num_t=2)
    by_value = em.log_emission(oracle_eps, params, SCHED_SMALL, y, key, K, estimator=em.ESTIMATORS["elbo_term"],
                               num_t=2)
    np.testing.assert_array_equal(by_value, by_name)
    # an estimator outside the registry: eps_mse with its own default band, (1, 2) for T = 20
    low = dataclasses.replace(em.ESTIMATORS["eps_mse"], name="eps_mse_low", default_band=(0.0, 0.1))
    assert low.default_t_range(SMALL_T) == (1, 2)
    jitted = em.make_log_emission(oracle_eps, K, estimator=low, num_t=3)
    np.testing.assert_array_equal(
        jitted(params, SCHED_SMALL, y, key),
        jax.jit(lambda p: em.log_emission(oracle_eps, p, SCHED_SMALL, y, key, K, num_t=3, t_range=(1, 2)))(params))


def test_estimator_flags_match_what_log_emission_does():
    """uses_decoder / uses_variance say whether those arguments change the scores (the decoder on draws at
    t = 1, the variance on draws at t ≥ 2: at t = 1 both are β_1); takes_band and single_draw are enforced."""
    mus = class_means((6,), seed=3)
    params = make_params(SCHED_SMALL, mus, error=0.2)
    y, key = jnp.asarray(mus[[0, 1, 2]]), jax.random.PRNGKey(5)
    configs = []
    for name, est in em.ESTIMATORS.items():
        for label, band, option in (("dec", (1, 1), ("decoder", "discretized")),
                                    ("var", (2, 3), ("variance", "beta_tilde"))):
            base = (("estimator", name),) + ((("t_range", band),) if est.takes_band else ())
            configs += [(f"{name}/{label}/base", base), (f"{name}/{label}/changed", base + (option,))]
    scores = all_scores(params, SCHED_SMALL, y, key, K, tuple(configs))
    for name, est in em.ESTIMATORS.items():
        for label, flag in (("dec", est.uses_decoder), ("var", est.uses_variance)):
            base, changed = np.asarray(scores[f"{name}/{label}/base"]), np.asarray(scores[f"{name}/{label}/changed"])
            assert np.all(np.isfinite(base)) and np.all(np.isfinite(changed))
            assert (not np.array_equal(base, changed)) == flag, (name, label)
        if not est.takes_band:
            with pytest.raises(ValueError, match="does not apply"):
                em.log_emission(oracle_eps, params, SCHED_SMALL, y, key, K, estimator=name, t_range=(1, 1))
        if est.single_draw:
            with pytest.raises(ValueError, match="one t-draw"):
                em.log_emission(oracle_eps, params, SCHED_SMALL, y, key, K, estimator=name, num_t=2)


# ------------------------------------------------------------------------------------ EMConfig's band and estimator

def t_spy_eps(seen):
    """A network whose ε depends on t and k, recording every t it is called with into ``seen``."""

    def eps_fn(params, z, t, k):
        jax.debug.callback(lambda tt: seen.append(np.asarray(tt)), t)
        return params * jnp.sin(z + k[:, None]) * (t[:, None] / 1000.0)

    return eps_fn


@pytest.mark.parametrize("estimator,num_t", [("elbo_term", 8), ("multi_t", 8), ("random_t", 1), ("eps_mse", 8)])
def test_em_config_band_reaches_every_estimator_that_takes_one(estimator, num_t):
    """EMConfig.t_range = (0.3, 0.6) is the band of every estimator that takes one (it was dropped for all but
    eps_mse): t is drawn only in 300..600 of T = 1000, and the class scores are log_emission's with the
    integer band."""
    seen = []
    eps_fn = t_spy_eps(seen)
    config = hem.EMConfig(num_classes=2, scoring=hem.Scoring(estimator=estimator, num_t=num_t, t_range=(0.3, 0.6)),
                          temperature=hem.Temperature(0.5))
    y = jnp.asarray(np.random.default_rng(0).normal(size=(60, 2)), jnp.float32)
    keys = hem.frame_keys(jax.random.PRNGKey(0), 60)
    scores = hem.tempered_log_emissions(config, eps_fn, jnp.float32(0.5), SCHED_BIG, y, keys, jnp.int32(0))
    t = np.concatenate([s.ravel() for s in seen])
    assert t.min() >= 300 and t.max() <= 600 and t.max() - t.min() > 200, (t.min(), t.max())
    assert hem.resolved_t_range(config, 1000) == (300, 600)
    direct = em.log_emission(eps_fn, jnp.float32(0.5), SCHED_BIG, y, keys, 2, estimator=estimator, num_t=num_t,
                             t_range=(300, 600))
    np.testing.assert_array_equal(scores, direct / jnp.float32(0.5))


@pytest.mark.parametrize("estimator", ["elbo", "last_decoder"])
def test_em_band_for_fixed_t_estimator_raises_and_evaluation_drops_it(estimator):
    num_t = 4 if estimator == "elbo" else 1
    config = hem.EMConfig(num_classes=2, scoring=hem.Scoring(estimator=estimator, num_t=num_t))  # the default band (0.3, 0.6)
    with pytest.raises(ValueError, match="does not apply to estimator"):
        hem.resolved_t_range(config, 1000)
    y, keys = jnp.zeros((3, 2)), hem.frame_keys(jax.random.PRNGKey(0), 3)
    zero_eps = lambda params, z, t, k: jnp.zeros_like(z)
    with pytest.raises(ValueError, match="does not apply to estimator"):
        hem.tempered_log_emissions(config, zero_eps, None, SCHED_SMALL, y, keys, jnp.int32(0))
    evaluated = hem.evaluation_config(hem.EMConfig(num_classes=2), estimator=estimator, num_t=num_t)
    s = evaluated.scoring
    assert (s.estimator, s.num_t, s.t_range) == (estimator, num_t, None)
    assert hem.resolved_t_range(evaluated, 1000) is None
    scores = hem.tempered_log_emissions(evaluated, zero_eps, None, SCHED_SMALL, y, keys, jnp.int32(0))
    assert scores.shape == (3, 2) and np.all(np.isfinite(scores))


@pytest.mark.parametrize("config,estimator,num_t,expected", [
    (hem.EMConfig.paper(2), None, 4, ("multi_t", 4, None)),
    (hem.EMConfig.paper(2), None, None, ("random_t", 1, None)),
    (hem.EMConfig(2, scoring=hem.Scoring(t_range=None)), "last_decoder", 8, ("last_decoder", 1, None)),
    (hem.EMConfig(2), "last_decoder", None, ("last_decoder", 1, None)),
    (hem.EMConfig(2), "elbo", 50, ("elbo", 50, None)),
    (hem.EMConfig(2), "multi_t", 4, ("multi_t", 4, (0.3, 0.6))),
    (hem.EMConfig(2, scoring=hem.Scoring(estimator="elbo_term", t_range=(0.1, 0.2))), "random_t", 3, ("multi_t", 3, (0.1, 0.2))),
    (hem.EMConfig(2), None, None, ("eps_mse", 2, (0.3, 0.6))),
])
def test_evaluation_config_resolves_draws_and_band(config, estimator, num_t, expected):
    evaluated = hem.evaluation_config(config, estimator, num_t)
    s = evaluated.scoring
    assert (s.estimator, s.num_t, s.t_range) == expected
    assert evaluated == config.replace(scoring=dict(estimator=expected[0], num_t=expected[1], t_range=expected[2]))


def test_em_config_rejects_unknown_estimator_and_bad_num_t():
    with pytest.raises(ValueError, match=r"unknown estimator 'elbow'.*'eps_mse'"):
        hem.Scoring(estimator="elbow")
    with pytest.raises(ValueError, match="num_t"):
        hem.Scoring(num_t=0)
    hem.Scoring(estimator="elbo")  # a band is checked where it is used (overrides go one by one)


# ------------------------------------------------------------------------------------ labels and posteriors

def test_clamp_to_labels_keeps_known_labels_and_unknown_rows():
    rng = np.random.default_rng(0)
    log_b = jnp.asarray(-1e5 * rng.uniform(size=(4, 5, K)), jnp.float32)
    labels = jnp.asarray(rng.integers(-1, K, size=(4, 5)), jnp.int32)
    clamped = np.asarray(em.clamp_to_labels(log_b, labels))
    lb, lab = np.asarray(log_b), np.asarray(labels)
    for idx in np.ndindex(lab.shape):
        if lab[idx] < 0:
            np.testing.assert_array_equal(clamped[idx], lb[idx])
        else:
            assert clamped[idx][lab[idx]] == lb[idx][lab[idx]]
            assert np.all(np.isneginf(np.delete(clamped[idx], lab[idx])))
    assert (lab >= 0).any() and (lab < 0).any()
    with pytest.raises(ValueError, match="labels shape"):
        em.clamp_to_labels(log_b, labels[:, :3])


def test_class_log_posterior_normalised_with_neg_inf_entries():
    log_b = jnp.array([[-1.2e5, -1.2001e5, -1.3e5],  # huge magnitudes, close values
                       [-5.0, -jnp.inf, -3.0],         # a clamped-out class
                       [-jnp.inf, -jnp.inf, -jnp.inf],  # no possible class
                       [0.0, 0.0, 0.0]])
    log_pi = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    post = np.asarray(em.class_log_posterior(log_b, log_pi), np.float64)
    assert not np.any(np.isnan(post))
    joint = np.asarray(log_b, np.float64) + np.asarray(log_pi, np.float64)
    for i in (0, 1, 3):
        np.testing.assert_allclose(np.exp(post[i]).sum(), 1.0, rtol=1e-6)
        finite = np.isfinite(joint[i])
        ref = joint[i][finite] - np.log(np.exp(joint[i][finite] - joint[i][finite].max()).sum()) - joint[i][finite].max()
        np.testing.assert_allclose(post[i][finite], ref, rtol=1e-5, atol=1e-5)
        assert np.array_equal(np.isneginf(post[i]), ~finite)
    assert np.all(np.isneginf(post[2]))
    # a zero prior probability also gives −inf, and clamping then normalising keeps the label
    clamped = em.class_log_posterior(em.clamp_to_labels(log_b[:2], jnp.array([2, -1])), log_pi)
    np.testing.assert_allclose(np.exp(np.asarray(clamped[0])), [0, 0, 1], atol=0)
    with pytest.raises(ValueError, match="classes"):
        em.class_log_posterior(log_b, log_pi[:2])
