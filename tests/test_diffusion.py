"""Tests of the DDPM kernel (hmdm_jax.diffusion) against closed forms, float64 references and statistics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from hmdm_jax import diffusion as dfn

T = 1000
SCHED = dfn.linear_schedule(T)


def _np_alpha_bars(schedule):
    betas = np.asarray(schedule.betas, np.float64)
    return np.cumprod(1.0 - betas)


# ------------------------------------------------------------------------------------ schedules

def test_linear_schedule_endpoints_and_rescaling():
    betas = np.asarray(SCHED.betas)
    assert betas.shape == (T,)
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1), rtol=1e-3)
    short = np.asarray(dfn.linear_schedule(100).betas)  # rescaled by 1000/T: same noise range
    np.testing.assert_allclose(short[[0, -1]], [1e-3, 0.2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(SCHED.alphas), 1.0 - betas, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(SCHED.alpha_bars), _np_alpha_bars(SCHED), rtol=1e-5)
    assert SCHED.num_steps == T


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_bar_decreasing_in_unit_interval(name):
    sched = dfn.get_schedule(name, 200)
    ab = np.asarray(sched.alpha_bars, np.float64)
    assert np.all(np.diff(ab) < 0) and ab[0] < 1 and ab[-1] > 0
    assert ab[-1] < 1e-3  # z_T is (nearly) pure noise
    assert float(dfn.alpha_bar(sched, 0)) == 1.0


def test_cosine_schedule_follows_squared_cosine():
    n, s = 200, 0.008
    sched = dfn.cosine_schedule(n)
    betas = np.asarray(sched.betas, np.float64)
    assert np.all(np.diff(betas[:-1]) > 0) and betas.max() <= 0.999 + 1e-7  # increasing, clipped
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    u = np.arange(1, n) / n  # the last step is clipped, so compare before it
    np.testing.assert_allclose(np.asarray(sched.alpha_bars)[:-1], f(u) / f(0), rtol=2e-5, atol=1e-7)


def test_schedule_validation():
    with pytest.raises(ValueError, match="open interval"):
        dfn.schedule_from_betas([0.1, 1.0])
    with pytest.raises(ValueError, match="non-empty"):
        dfn.schedule_from_betas([])
    with pytest.raises(ValueError, match="unknown schedule"):
        dfn.get_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="unknown variance"):
        dfn.p_variance(SCHED, 3, "learned")


# ------------------------------------------------------------------------------------ forward process

def test_q_sample_formula_exact():
    rng = np.random.default_rng(0)
    y, noise = rng.normal(size=(2, 5, 4)).astype(np.float32)
    ab = _np_alpha_bars(SCHED)
    for t in (1, 2, 17, 500, T):
        expected = np.sqrt(ab[t - 1]) * y + np.sqrt(1 - ab[t - 1]) * noise
        np.testing.assert_allclose(dfn.q_sample(SCHED, y, t, noise), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(dfn.q_sample(SCHED, y, 0, noise), y)  # z_0 = y


_q_sample_batch = jax.jit(jax.vmap(dfn.q_sample, (None, None, None, 0)))


@pytest.mark.parametrize("t", [1, 50, 500, 1000])
def test_q_sample_moments(t):
    n = 200_000
    y = jnp.array([1.0, -0.5, 0.25], jnp.float32)
    noise = jax.random.normal(jax.random.PRNGKey(t), (n, 3))
    z = np.asarray(_q_sample_batch(SCHED, y, t, noise), np.float64)
    ab = _np_alpha_bars(SCHED)[t - 1]
    se_mean = math.sqrt((1 - ab) / n)
    np.testing.assert_allclose(z.mean(0), math.sqrt(ab) * np.asarray(y), atol=4.5 * se_mean)
    np.testing.assert_allclose(z.var(0), 1 - ab, rtol=4.5 * math.sqrt(2 / n))


def test_ancestral_steps_compose_to_closed_form_kernel():
    sched = dfn.linear_schedule(50)
    t_end, n = 30, 100_000
    y = jnp.array([0.8, -1.0], jnp.float32)
    noise = jax.random.normal(jax.random.PRNGKey(1), (t_end, n, 2))

    def step(z, inputs):
        t, eps = inputs
        return dfn.q_step(sched, z, t, eps), None

    z0 = jnp.broadcast_to(y, (n, 2))
    z, _ = jax.lax.scan(step, z0, (jnp.arange(1, t_end + 1), noise))
    z = np.asarray(z, np.float64)
    ab = _np_alpha_bars(sched)[t_end - 1]
    np.testing.assert_allclose(z.mean(0), math.sqrt(ab) * np.asarray(y), atol=4.5 * math.sqrt((1 - ab) / n))
    np.testing.assert_allclose(z.var(0), 1 - ab, rtol=4.5 * math.sqrt(2 / n))
    # the coordinates stay independent
    assert abs(np.corrcoef(z.T)[0, 1]) < 4.5 / math.sqrt(n)


# ------------------------------------------------------------------------------------ posterior and reverse step

@pytest.mark.parametrize("t", [2, 3, 100, 999, 1000])
def test_q_posterior_is_product_of_gaussians(t):
    """q(z_{t−1}|z_t, y) ∝ q(z_{t−1}|y) q(z_t|z_{t−1}): combine precisions in float64."""
    rng = np.random.default_rng(t)
    y, z_t = rng.normal(size=(2, 6))
    ab = _np_alpha_bars(SCHED)
    a_prev, beta = ab[t - 2], float(np.asarray(SCHED.betas, np.float64)[t - 1])
    alpha = 1 - beta
    # prior N(√ā_{t−1} y, 1 − ā_{t−1}) times likelihood of z_t: N(z_t; √α z_{t−1}, β) in z_{t−1}
    precision = 1 / (1 - a_prev) + alpha / beta
    mean = (math.sqrt(a_prev) * y / (1 - a_prev) + math.sqrt(alpha) * z_t / beta) / precision
    post = dfn.q_posterior(SCHED, jnp.asarray(y, jnp.float32), jnp.asarray(z_t, jnp.float32), t)
    np.testing.assert_allclose(post.mean, mean, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(float(post.variance), 1 / precision, rtol=2e-4)
    np.testing.assert_allclose(float(dfn.p_variance(SCHED, t, "beta_tilde")), 1 / precision, rtol=2e-4)


def test_q_posterior_at_t1_is_point_mass_at_y():
    y = jnp.array([0.3, -0.7])
    post = dfn.q_posterior(SCHED, y, jnp.array([5.0, 2.0]), 1)
    np.testing.assert_allclose(post.mean, y, rtol=1e-6)
    assert float(post.variance) == 0.0


@pytest.mark.parametrize("t", [1, 2, 10, 400, 1000])
def test_reverse_mean_with_true_eps_equals_posterior_mean(t):
    rng = np.random.default_rng(10 + t)
    y = jnp.asarray(rng.uniform(-1, 1, size=(4, 4, 3)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(4, 4, 3)), jnp.float32)
    z_t = dfn.q_sample(SCHED, y, t, eps)
    post_mean = dfn.q_posterior(SCHED, y, z_t, t).mean
    np.testing.assert_allclose(dfn.p_mean(SCHED, z_t, t, eps), post_mean, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(dfn.predict_y_from_eps(SCHED, z_t, t, eps), y, atol=2e-2 if t == T else 1e-4)


def test_p_variance_options():
    betas = np.asarray(SCHED.betas, np.float64)
    ab = _np_alpha_bars(SCHED)
    t = np.array([1, 2, 500])
    np.testing.assert_allclose(dfn.p_variance(SCHED, jnp.asarray(t), "beta"), betas[t - 1], rtol=1e-6)
    tilde = (1 - ab[t - 2]) / (1 - ab[t - 1]) * betas[t - 1]
    tilde[0] = betas[0]  # β̃_1 = 0 falls back to β_1
    np.testing.assert_allclose(dfn.p_variance(SCHED, jnp.asarray(t), "beta_tilde"), tilde, rtol=1e-4)


def test_reverse_step_noise():
    z_t = jnp.full((3,), 0.5)
    eps = jnp.array([0.1, -0.2, 0.3])
    mean1 = dfn.p_mean(SCHED, z_t, 1, eps)
    np.testing.assert_array_equal(dfn.reverse_step(jax.random.PRNGKey(0), SCHED, z_t, 1, eps), mean1)
    keys = jax.random.split(jax.random.PRNGKey(1), 50_000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: dfn.reverse_step(k, SCHED, z_t, 300, eps)))(keys), np.float64)
    beta = float(SCHED.betas[299])
    np.testing.assert_allclose(draws.mean(0), dfn.p_mean(SCHED, z_t, 300, eps), atol=4.5 * math.sqrt(beta / 50_000))
    np.testing.assert_allclose(draws.var(0), beta, rtol=4.5 * math.sqrt(2 / 50_000))


# ------------------------------------------------------------------------------------ densities

def test_gaussian_log_prob_matches_scipy():
    rng = np.random.default_rng(3)
    x, m = rng.normal(size=(2, 7))
    var = 0.37
    expected = stats.multivariate_normal(m, var * np.eye(7)).logpdf(x)
    got = dfn.gaussian_log_prob(jnp.asarray(x, jnp.float32), dfn.Gaussian(jnp.asarray(m, jnp.float32), jnp.float32(var)))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_gaussian_kl_closed_form_and_monte_carlo():
    rng = np.random.default_rng(4)
    d = 5
    mq, mp = rng.normal(size=(2, d))
    vq, vp = 0.3, 1.7
    q = dfn.Gaussian(jnp.asarray(mq, jnp.float32), jnp.float32(vq))
    p = dfn.Gaussian(jnp.asarray(mp, jnp.float32), jnp.float32(vp))
    kl = float(dfn.gaussian_kl(q, p))
    # full-covariance formula: ½[tr(Σp⁻¹Σq) + Δᵀ Σp⁻¹ Δ − d + ln(det Σp / det Σq)]
    Sq, Sp = vq * np.eye(d), vp * np.eye(d)
    delta = mp - mq
    ref = 0.5 * (np.trace(np.linalg.solve(Sp, Sq)) + delta @ np.linalg.solve(Sp, delta) - d
                 + np.linalg.slogdet(Sp)[1] - np.linalg.slogdet(Sq)[1])
    np.testing.assert_allclose(kl, ref, rtol=1e-5)
    # Monte Carlo E_q[log q − log p]
    n = 200_000
    x = mq + math.sqrt(vq) * rng.normal(size=(n, d))
    log_ratio = stats.multivariate_normal(mq, Sq).logpdf(x) - stats.multivariate_normal(mp, Sp).logpdf(x)
    assert abs(log_ratio.mean() - kl) < 4.5 * log_ratio.std() / math.sqrt(n)
    assert float(dfn.gaussian_kl(q, q)) == pytest.approx(0.0, abs=1e-6)


def test_prior_kl_and_decoder_log_prob():
    y = jnp.array([[0.5, -1.0], [0.0, 1.0]])
    ab = _np_alpha_bars(SCHED)[-1]
    yn = np.asarray(y, np.float64)
    d = yn.size
    ref = 0.5 * (d * (-math.log(1 - ab) + (1 - ab) - 1) + ab * np.sum(yn ** 2))
    np.testing.assert_allclose(float(dfn.prior_kl(SCHED, y)), ref, rtol=1e-4, atol=1e-6)
    z1, eps = jnp.array([[0.4, -0.9], [0.1, 0.8]]), jnp.array([[0.3, 0.2], [-0.1, 0.5]])
    mean = dfn.p_mean(SCHED, z1, 1, eps)
    ref_dec = stats.norm(np.asarray(mean, np.float64), math.sqrt(float(SCHED.betas[0]))).logpdf(yn).sum()
    np.testing.assert_allclose(float(dfn.decoder_log_prob(SCHED, y, z1, eps)), ref_dec, rtol=1e-5)


def _discretized_reference(y, mean, std, num_bins=256):
    """float64 reference: P(bin) = Φ(upper) − Φ(lower), edge bins open; via scipy's log cdf/sf."""
    h = 1.0 / (num_bins - 1)
    y, mean = np.asarray(y, np.float64), np.asarray(mean, np.float64)
    lo, hi = (y - h - mean) / std, (y + h - mean) / std
    # interior: log(Φ(hi) − Φ(lo)) computed on the lower tail by symmetry
    a, b = np.where(mean <= y, (lo, hi), (-hi, -lo))  # P = sf(a) − sf(b) = cdf(−a) − cdf(−b)
    inner = stats.norm.logcdf(-a) + np.log1p(-np.exp(stats.norm.logcdf(-b) - stats.norm.logcdf(-a)))
    out = np.where(y < -1 + h, stats.norm.logcdf(hi), np.where(y > 1 - h, stats.norm.logsf(lo), inner))
    return out.sum()


@jax.jit
def _bin_log_probs(values, dist):
    return jax.vmap(lambda v: dfn.discretized_gaussian_log_prob(v, dist))(values)


_discretized_log_prob = jax.jit(dfn.discretized_gaussian_log_prob)


def test_discretized_gaussian_sums_to_one_over_bins():
    bins = 2 * np.arange(256) / 255 - 1
    for mean, var in [(0.0, 0.01), (0.93, 1e-4), (-0.2, 2.0), (1.3, 0.05)]:
        dist = dfn.Gaussian(jnp.float32(mean), jnp.float32(var))
        logp = _bin_log_probs(jnp.asarray(bins, jnp.float32), dist)
        assert np.all(np.isfinite(logp))
        np.testing.assert_allclose(np.exp(np.asarray(logp, np.float64)).sum(), 1.0, atol=2e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_discretized_gaussian_matches_reference(channels):
    rng = np.random.default_rng(channels)
    y = (2 * rng.integers(0, 256, size=(5, 4, channels)) / 255 - 1).astype(np.float32)
    y[0, 0], y[0, 1] = -1.0, 1.0  # both edge bins present
    mean = np.clip(y + rng.normal(scale=0.05, size=y.shape), -1.2, 1.2).astype(np.float32)
    var = 0.02 ** 2
    got = float(_discretized_log_prob(jnp.asarray(y), dfn.Gaussian(jnp.asarray(mean), jnp.float32(var))))
    np.testing.assert_allclose(got, _discretized_reference(y, mean, 0.02), rtol=2e-5)


def test_discretized_gaussian_far_tail_is_accurate():
    """Bins 10σ and 30σ from the mean: a difference of CDFs near 1 would floor these in float32."""
    std = 0.01
    y = jnp.array([0.2, 0.2, -0.4], jnp.float32)
    mean = jnp.array([0.1, 0.5, -0.1], jnp.float32)
    got = [_discretized_log_prob(a, dfn.Gaussian(m, jnp.float32(std ** 2))) for a, m in zip(y, mean)]
    ref = [_discretized_reference(a, m, std) for a, m in zip(np.asarray(y), np.asarray(mean))]
    np.testing.assert_allclose(got, ref, rtol=1e-4)


# ------------------------------------------------------------------------------------ batching

def test_per_example_functions_vmap_over_batches_with_own_t():
    rng = np.random.default_rng(5)
    b = 6
    y = jnp.asarray(rng.uniform(-1, 1, size=(b, 3, 3, 1)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=(b, 3, 3, 1)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(b, 3, 3, 1)), jnp.float32)
    t = jnp.array([1, 2, 5, 100, 999, 1000], jnp.int32)

    def per_example(y_i, n_i, e_i, t_i):
        z = dfn.q_sample(SCHED, y_i, t_i, n_i)
        post = dfn.q_posterior(SCHED, y_i, z, t_i)
        out = [z, post.mean, post.variance]
        for variance in dfn.VARIANCES:
            rev = dfn.p_reverse(SCHED, z, t_i, e_i, variance)
            out += [rev.mean, rev.variance, dfn.gaussian_log_prob(y_i, rev), dfn.discretized_gaussian_log_prob(y_i, rev)]
        return out

    batched = jax.jit(jax.vmap(per_example))(y, noise, eps, t)
    single_fn = jax.jit(per_example)
    for i in range(b):
        single = single_fn(y[i], noise[i], eps[i], t[i])
        for got, want in zip(batched, single):
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)
