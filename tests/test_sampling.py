"""Tests of hmdm_jax.sampling against exact references and a 1-D Gaussian mixture with a known score.

The oracle ε-network is exact for Gaussian-mixture data: with data p(y) = Σ_m w_m N(μ_m, s_m²) (per
coordinate), p_t(z) = Σ_m w_m N(√ᾱ_t μ_m, ᾱ_t s_m² + 1 − ᾱ_t) and ε*(z, t) = −√(1 − ᾱ_t) ∇ log p_t(z).
Class 0 is component 0 alone, class 1 component 1 alone, class 2 (the null class) the mixture with
weights (0.3, 0.7).

On CPU the cost is almost all XLA compilation (a few seconds per sampler configuration and batch
shape), so every sampler call here uses one batch shape, ``[NB, *EV]`` colour images, and a handful of
sampler configurations. The oracle acts per pixel and all noise is i.i.d., so the NB·|EV| = 8064 pixels
of a batch are independent draws: the shape tests, the exact references and the distribution tests
(T = 100) share the same compiled samplers. Long runs at T = 1000 with 10⁵ samples are marked ``slow``.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st

from hmdm_jax import diffusion as D
from hmdm_jax import sampling as S

T = 100
SCHED = D.linear_schedule(T)
MU = np.array([-1.0, 1.5])
SD = np.array([0.3, 0.5])
MIX_W = np.array([0.3, 0.7])
MIX_VAR = MIX_W @ (SD**2 + MU**2) - (MIX_W @ MU) ** 2
NULL = 2  # K = 2 classes; index 2 is the unconditional (mixture) class
LOG_W = jnp.log(jnp.array([[1.0, 0.0], [0.0, 1.0], MIX_W], jnp.float32))  # [K + 1, 2]

EV = (2, 3, 3)  # event shape of every sampler call: H ≠ W, 3 channels
NB = 448        # batch of every sampler call: 448 · 18 = 8064 pixels
N_PIX = NB * int(np.prod(EV))
DDIM_STEPS = 50  # the DDIM sub-sequence of the few-step tests (every other step of T)
# KS bound for N_PIX samples against the exact law: the 1e-3 critical value (0.022) plus the
# discretisation bias of T = 100 steps with the exact ε (measured with 2·10⁵ samples: ≤ 0.014 for
# ancestral sampling with σ² = β̃ and DDIM η = 1, 0.013 for DDIM η = 0 with 50 steps).
KS_BOUND = 0.03

NULL_CLASSES = jnp.full((NB,), NULL, jnp.int32)
ALTERNATING = jnp.asarray(np.arange(NB) % 2, jnp.int32)  # classes 0, 1, 0, 1, ...
MIXED = jnp.asarray(np.arange(NB) % 3, jnp.int32)        # classes 0, 1, ∅, 0, ...


def key(seed):
    """An "rbg" PRNG key: the samplers are key-agnostic, and XLA:CPU compiles a sampler about 1.5×
    faster with rbg than with the default threefry (test_default_threefry_key_traces
    checks the default)."""
    return jax.random.key(seed, impl="rbg")


def oracle_eps(params, z, t, k):
    """Exact ε for the per-coordinate mixture of class k (see module docstring); ``params`` unused."""
    del params
    return _oracle(SCHED, z, t, k)


def _oracle(sched, z, t, k):
    expand = (-1,) + (1,) * (z.ndim - 1)
    a = D.alpha_bar(sched, t).reshape(expand)[..., None]  # [B, 1.., 1]
    diff = z[..., None] - jnp.sqrt(a) * MU  # [B, *event, 2]
    var = a * SD**2 + 1.0 - a
    log_w = LOG_W[k].reshape(expand[:1] + (1,) * (z.ndim - 1) + (2,))
    resp = jax.nn.softmax(log_w - 0.5 * jnp.log(var) - 0.5 * diff**2 / var, axis=-1)
    score = jnp.sum(resp * (-diff / var), axis=-1)
    return -jnp.sqrt(1.0 - a[..., 0]) * score


ORACLE_JIT = jax.jit(oracle_eps)  # for the tests' own eager evaluations (one compile per shape)


def mixture_cdf(x):
    return MIX_W[0] * st.norm.cdf(x, MU[0], SD[0]) + MIX_W[1] * st.norm.cdf(x, MU[1], SD[1])


def pixels(x, classes=None, k=None):
    """All pixels of a [NB, *EV] batch as float64 (only those of images of class k if given)."""
    x = np.asarray(x, np.float64)
    if k is not None:
        x = x[np.asarray(classes) == k]
    return x.reshape(-1)


def differs_everywhere(a, b):
    return np.min(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) > 0


def class_images(classes, seed):
    """[B, *EV] images whose pixels are i.i.d. draws of each image's class (∅: the mixture)."""
    rng = np.random.default_rng(seed)
    c = np.asarray(classes)[:, None]
    comp = np.where(c == NULL, rng.random((c.shape[0], int(np.prod(EV)))) < MIX_W[1], c)
    return jnp.asarray(rng.normal(MU[comp], SD[comp]).reshape(-1, *EV), jnp.float32)


# The sampler configurations (each compiled once; the tests vary keys, classes, η and ω's value).


def ancestral(rng_key, classes, **kw):
    return S.ancestral_sample(rng_key, oracle_eps, None, SCHED, classes, EV, **kw)


def ddim(rng_key, classes, num_steps=DDIM_STEPS, eta=0.0, **kw):
    return S.ddim_sample(rng_key, oracle_eps, None, SCHED, classes, EV, num_steps=num_steps, eta=eta,
                         **kw)


def guided(w):
    return dict(guidance_weight=w, null_class=NULL)


@pytest.fixture(scope="module")
def ancestral_null():
    """Ancestral samples (σ² = β) of the mixture (class ∅), key 0."""
    return pixels(ancestral(key(0), NULL_CLASSES))


@pytest.fixture(scope="module")
def ancestral_tilde_null():
    """Ancestral samples with σ² = β̃ (class ∅), key 1."""
    return pixels(ancestral(key(1), NULL_CLASSES, variance="beta_tilde"))


@pytest.fixture(scope="module")
def ddim_eta1_null():
    """DDIM samples with η = 1 over all T steps (class ∅), key 2."""
    return pixels(ddim(key(2), NULL_CLASSES, num_steps=T, eta=1.0))


@pytest.fixture(scope="module")
def ancestral_by_class():
    """Ancestral samples with alternating classes 0, 1 (same compilation as ancestral_null)."""
    return np.asarray(ancestral(key(3), ALTERNATING), np.float64)


# ------------------------------------------------------------------------------------------------
# Shapes, determinism, jit
# ------------------------------------------------------------------------------------------------

LOG_PI2 = jnp.log(jnp.array([0.4, 0.6]))
LOG_A2 = jnp.log(jnp.array([[0.5, 0.5], [0.0, 1.0]]))  # 1 -> 0 impossible
SEQ_LEN = 8
NUM_SEQ = NB // SEQ_LEN

RUNS = {
    "ancestral": lambda k: ancestral(k, MIXED),
    "ddim": lambda k: ddim(k, MIXED, eta=0.5),
    "prior": lambda k: S.sample_from_prior(k, oracle_eps, None, SCHED, LOG_PI2, NB, EV,
                                           sampler="ddim", num_steps=DDIM_STEPS, eta=0.5),
    "sequences": lambda k: S.generate_sequences(k, oracle_eps, None, SCHED, LOG_PI2, LOG_A2, NUM_SEQ,
                                                SEQ_LEN, EV),
    "reconstruct": lambda k: S.reconstruct(k, oracle_eps, None, SCHED, class_images(MIXED, 0), 1,
                                           MIXED),
    "reconstruct_ddim": lambda k: S.reconstruct(k, oracle_eps, None, SCHED, class_images(MIXED, 0),
                                                T // 2, MIXED, sampler="ddim", num_steps=10),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_shapes_and_determinism(name):
    sample = RUNS[name]
    a, b, c = sample(key(1)), sample(key(1)), sample(key(2))
    images = (lambda s: s.images) if name in ("prior", "sequences") else (lambda s: s)
    expected = (NUM_SEQ, SEQ_LEN, *EV) if name == "sequences" else (NB, *EV)
    assert images(a).shape == expected and images(a).dtype == jnp.float32
    assert np.all(np.isfinite(images(a)))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)  # same key, same output (classes / states included)
    assert differs_everywhere(images(a), images(c))  # every coordinate differs with another key
    if name == "prior":
        assert a.classes.shape == (NB,) and a.classes.dtype == jnp.int32
    if name == "sequences":
        assert a.states.shape == (NUM_SEQ, SEQ_LEN) and a.states.dtype == jnp.int32


def test_static_argnames_allow_an_outer_jit():
    """Every public function traces and lowers under a caller's jax.jit with STATIC_ARGNAMES static
    (value checks are skipped on tracers, shape checks remain); lowering compiles nothing."""
    y = class_images(MIXED, 0)
    t = jnp.asarray(np.arange(NB) % T + 1, jnp.int32)
    log_pi3, log_a3 = jnp.log(jnp.asarray(PI3)), jnp.log(jnp.asarray(A3))
    calls = {
        "guided_eps": ((oracle_eps, None, y, t, MIXED, 1.5, NULL), {}, (NB, *EV)),
        "ancestral_sample": ((key(0), oracle_eps, None, SCHED, MIXED, EV),
                             dict(variance="beta_tilde", guidance_weight=1.0, null_class=NULL),
                             (NB, *EV)),
        "ddim_sample": ((key(0), oracle_eps, None, SCHED, MIXED, EV), dict(num_steps=7, eta=0.5),
                        (NB, *EV)),
        "sample_classes": ((key(0), LOG_PI2, 5), {}, (5,)),
        "sample_from_prior": ((key(0), oracle_eps, None, SCHED, LOG_PI2, 5, EV),
                              dict(sampler="ddim", num_steps=7), (5, *EV)),
        "sample_markov_states": ((key(0), log_pi3, log_a3, 6), {}, (6,)),
        "generate_sequences": ((key(0), oracle_eps, None, SCHED, log_pi3, log_a3, 3, 6, EV), {},
                               (3, 6, *EV)),
        "reconstruct": ((key(0), oracle_eps, None, SCHED, y, 40, MIXED),
                        dict(sampler="ddim", num_steps=4), (NB, *EV)),
    }
    assert set(calls) == set(S.STATIC_ARGNAMES)
    for name, static in S.STATIC_ARGNAMES.items():
        fn = getattr(S, name)
        params = list(inspect.signature(fn).parameters)
        assert set(static) <= set(params), name
        args, kwargs, shape = calls[name]
        lowered = jax.jit(fn, static_argnames=static).lower(*args, **kwargs)
        out = jax.tree_util.tree_leaves(lowered.out_info)[-1]
        assert out.shape == shape, name


@pytest.mark.slow
def test_outer_jit_matches_eager():
    jitted = jax.jit(S.ancestral_sample, static_argnames=S.STATIC_ARGNAMES["ancestral_sample"])
    out = jitted(key(4), oracle_eps, None, SCHED, MIXED, EV)
    np.testing.assert_allclose(out, ancestral(key(4), MIXED), rtol=1e-5, atol=1e-5)


def test_default_threefry_key_traces():
    """The default (threefry) keys trace through every sampler (abstractly: compiling a threefry
    sampler costs several seconds on CPU; the slow test below runs one)."""
    for name, sample in RUNS.items():
        out = jax.eval_shape(lambda: sample(jax.random.key(1)))
        leaves = jax.tree_util.tree_leaves(out)
        assert leaves[-1].shape[-3:] == EV and leaves[-1].dtype == jnp.float32, name


@pytest.mark.slow
def test_default_threefry_key_runs():
    a = ancestral(jax.random.key(1), MIXED)
    assert a.shape == (NB, *EV) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, ancestral(jax.random.key(1), MIXED))
    assert differs_everywhere(a, ancestral(jax.random.key(2), MIXED))


def _traced_batches(run, *args):
    """The batch sizes ε is traced with while ``run(eps_fn, *args)`` is traced (nothing compiles)."""
    calls = []

    def recording_eps(params, z, t, k):
        calls.append(z.shape[0])
        return oracle_eps(params, z, t, k)

    jax.eval_shape(lambda *a: run(recording_eps, *a), *args)
    return calls


def test_no_python_loop_over_steps_in_the_trace():
    """Each sampler traces ε once (the body of one lax.scan), not once per diffusion step."""
    y = jnp.zeros((NB, *EV))
    for run in (lambda f: S.ancestral_sample(key(0), f, None, SCHED, MIXED, EV),
                lambda f: S.ddim_sample(key(0), f, None, SCHED, MIXED, EV, num_steps=T),
                lambda f: S.reconstruct(key(0), f, None, SCHED, y, T, MIXED),
                lambda f: S.reconstruct(key(0), f, None, SCHED, y, T, MIXED, sampler="ddim",
                                        num_steps=T)):
        assert _traced_batches(run) == [NB]


# ------------------------------------------------------------------------------------------------
# Exact references (float64 loops with the documented key layout, with and without guidance)
# ------------------------------------------------------------------------------------------------


def _eps_ref(z, t, classes, w):
    """(1 + ω) ε(z, t, k) − ω ε(z, t, ∅) in float64 from two separate oracle calls (ω None: plain)."""
    z32, tt = jnp.asarray(z, jnp.float32), jnp.full((z.shape[0],), t, jnp.int32)
    cond = np.asarray(ORACLE_JIT(None, z32, tt, classes), np.float64)
    if w is None:
        return cond
    uncond = np.asarray(ORACLE_JIT(None, z32, tt, jnp.full_like(classes, NULL)), np.float64)
    return (1 + w) * cond - w * uncond


def _normal(rng_key):
    return np.asarray(jax.random.normal(rng_key, (NB, *EV)), np.float64)


@pytest.mark.parametrize("w", [None, 1.5])
def test_ancestral_equals_algorithm_2_loop(w):
    """The scan equals Algorithm 2 written as a Python loop over t = T..1 (same noise draws); with a
    guidance weight ω every step uses the guided ε."""
    rng_key = key(7)
    out = ancestral(rng_key, MIXED, **({} if w is None else guided(w)))

    betas, alphas, abar = (np.asarray(a, np.float64) for a in SCHED)
    key_start, key_steps = jax.random.split(rng_key)
    z = _normal(key_start)
    step_keys = jax.random.split(key_steps, T)
    for i, t in enumerate(range(T, 0, -1)):
        eps = _eps_ref(z, t, MIXED, w)
        mean = (z - (1 - alphas[t - 1]) / np.sqrt(1 - abar[t - 1]) * eps) / np.sqrt(alphas[t - 1])
        z = mean + (np.sqrt(betas[t - 1]) * _normal(step_keys[i]) if t > 1 else 0.0)
    np.testing.assert_allclose(out, z, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("eta, w", [(0.0, None), (0.7, None),
                                    pytest.param(0.3, 1.5, marks=pytest.mark.slow)])
def test_ddim_equals_reference_loop(eta, w):
    """DDIM (Song et al. eq. 12) as a float64 loop over ddim_timesteps(T, 50), same noise draws.

    The guided case costs one more compilation; guidance itself is covered in the default run by the
    ancestral loop (same ``_eps``) and by test_null_class_evaluated_only_when_guided."""
    rng_key = key(11)
    out = ddim(rng_key, MIXED, eta=eta, **({} if w is None else guided(w)))

    abar = np.concatenate([[1.0], np.asarray(SCHED.alpha_bars, np.float64)])  # abar[t], t = 0..T
    taus = S.ddim_timesteps(T, DDIM_STEPS)
    key_start, key_steps = jax.random.split(rng_key)
    z = _normal(key_start)
    step_keys = jax.random.split(key_steps, DDIM_STEPS)
    for i, (t, t_prev) in enumerate(zip(taus[::-1], np.concatenate([[0], taus[:-1]])[::-1])):
        eps = _eps_ref(z, t, MIXED, w)
        y_hat = (z - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
        sigma = eta * np.sqrt((1 - abar[t_prev]) / (1 - abar[t]) * (1 - abar[t] / abar[t_prev]))
        z = (np.sqrt(abar[t_prev]) * y_hat + np.sqrt(1 - abar[t_prev] - sigma**2) * eps
             + sigma * _normal(step_keys[i]))
    np.testing.assert_allclose(out, z, rtol=2e-3, atol=2e-3)


def test_reconstruct_equals_reference():
    """reconstruct(y, t = 1): z_1 = q_sample(y, 1, normal(key_start)), then the noiseless last step."""
    rng_key, y = key(5), class_images(MIXED, 0)
    out = S.reconstruct(rng_key, oracle_eps, None, SCHED, y, 1, MIXED)
    betas, alphas, abar = (np.asarray(a, np.float64) for a in SCHED)
    z = np.sqrt(abar[0]) * np.asarray(y, np.float64) + np.sqrt(1 - abar[0]) * _normal(
        jax.random.split(rng_key)[0])
    expected = (z - betas[0] / np.sqrt(1 - abar[0]) * _eps_ref(z, 1, MIXED, None)) / np.sqrt(alphas[0])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_ddim_timesteps():
    np.testing.assert_array_equal(S.ddim_timesteps(10, 10), np.arange(1, 11))
    np.testing.assert_array_equal(S.ddim_timesteps(10, 1), [10])
    np.testing.assert_array_equal(S.ddim_timesteps(10, 4), [3, 5, 8, 10])  # round(2.5 i), half up
    for t_start, steps in [(200, 7), (1000, 50), (37, 36), (5, 3)]:
        taus = S.ddim_timesteps(t_start, steps)
        assert len(taus) == steps and taus[-1] == t_start and taus[0] >= 1
        gaps = np.diff(np.concatenate([[0], taus]))
        assert gaps.min() >= np.floor(t_start / steps) and gaps.max() <= np.ceil(t_start / steps)


def test_ddim_eta1_all_steps_equals_ancestral_beta_tilde(ddim_eta1_null):
    """With η = 1 and S = T, DDIM's σ² is β̃_t and its mean is the DDPM mean: same key, same samples."""
    a = pixels(ancestral(key(2), NULL_CLASSES, variance="beta_tilde"))
    np.testing.assert_allclose(a, ddim_eta1_null, atol=2e-3)


# ------------------------------------------------------------------------------------------------
# Distributions (exact score of a 1-D Gaussian mixture, T = 100, 8064 samples, fixed seeds)
# ------------------------------------------------------------------------------------------------


def test_ancestral_matches_mixture(ancestral_null):
    x = ancestral_null
    assert st.kstest(x, mixture_cdf).statistic < KS_BOUND
    assert abs(x.mean() - MIX_W @ MU) < 4 * np.sqrt(MIX_VAR / x.size)
    assert abs(x.var() / MIX_VAR - 1) < 0.05
    assert abs(np.mean(x > 0.25) - MIX_W[1]) < 4 * np.sqrt(0.21 / x.size)  # weight of the right mode


def test_ddim_eta1_matches_ancestral_in_distribution(ancestral_null, ancestral_tilde_null,
                                                     ddim_eta1_null):
    """DDIM with η = 1 over all T steps samples what ancestral sampling samples (independent keys)."""
    y = ddim_eta1_null
    assert st.kstest(y, mixture_cdf).statistic < KS_BOUND
    assert abs(y.std() / np.sqrt(MIX_VAR) - 1) < 0.05
    # Exactly the law of ancestral sampling with σ² = β̃ ...
    assert st.ks_2samp(ancestral_tilde_null, y).pvalue > 1e-3
    # ... and, up to the O(1/T) difference between DDPM's two variances σ² = β and σ² = β̃ (a KS
    # distance of 0.015 at T = 100), that of ancestral sampling with the default σ² = β.
    assert st.ks_2samp(ancestral_null, y).statistic < KS_BOUND


def test_ddim_eta0_few_steps_matches_mixture():
    y = pixels(ddim(key(4), NULL_CLASSES))  # 50 deterministic (ODE) steps
    assert st.kstest(y, mixture_cdf).statistic < KS_BOUND
    assert abs(np.mean(y > 0.25) - MIX_W[1]) < 0.02


def test_class_conditional_samples_have_class_moments(ancestral_by_class):
    for k in (0, 1):
        xk = pixels(ancestral_by_class, ALTERNATING, k)
        assert abs(xk.mean() - MU[k]) < 4 * SD[k] / np.sqrt(xk.size)
        assert abs(xk.std() / SD[k] - 1) < 0.06  # bias at T = 100: 3 % (class 0), 1.6 % (class 1)
        assert st.kstest(xk, st.norm(MU[k], SD[k]).cdf).statistic < 0.035


# ------------------------------------------------------------------------------------------------
# Guidance
# ------------------------------------------------------------------------------------------------


def test_guided_eps_formula_and_single_batched_call():
    calls = []

    def recording_eps(params, z, t, k):
        calls.append(z.shape[0])
        return ORACLE_JIT(params, z, t, k)

    z = jax.random.normal(key(0), (NB, *EV))
    t = jnp.asarray(np.arange(NB) % T + 1, jnp.int32)
    w = 2.5
    out = S.guided_eps(recording_eps, None, z, t, MIXED, w, NULL)
    assert calls == [2 * NB]  # conditional and unconditional in one call
    cond = ORACLE_JIT(None, z, t, MIXED)
    uncond = ORACLE_JIT(None, z, t, NULL_CLASSES)
    np.testing.assert_allclose(out, (1 + w) * cond - w * uncond, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, cond, atol=1e-2)  # the guidance term is not negligible here

    calls.clear()
    np.testing.assert_array_equal(S.guided_eps(recording_eps, None, z, t, MIXED, 0.0, NULL), cond)
    assert calls == [NB]  # ω = 0: no null evaluation


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_null_class_evaluated_only_when_guided(sampler):
    """A concrete ω = 0 never evaluates ∅ (batch B); a traced ω or ω ≠ 0 evaluates [k; ∅] (batch 2B)."""
    fn = S.ddim_sample if sampler == "ddim" else S.ancestral_sample
    opts = dict(num_steps=DDIM_STEPS, eta=0.5) if sampler == "ddim" else {}

    def run(eps_fn, *w, **guidance):
        if w:  # ω passed as a traced argument
            guidance = guided(w[0])
        return fn(key(0), eps_fn, None, SCHED, MIXED, EV, **opts, **guidance)

    assert _traced_batches(run) == [NB]
    assert _traced_batches(lambda f: run(f, **guided(0.0))) == [NB]
    zero32 = jnp.float32(0.0)  # a concrete array
    assert _traced_batches(lambda f: run(f, **guided(zero32))) == [NB]
    assert _traced_batches(run, jnp.float32(0.0)) == [2 * NB]  # value unknown while tracing
    assert _traced_batches(lambda f: run(f, **guided(1.5))) == [2 * NB]


def test_guidance_changes_the_samples():
    plain = ancestral(key(6), MIXED)
    np.testing.assert_array_equal(plain, ancestral(key(6), MIXED, **guided(0.0)))
    diff = np.abs(np.asarray(ancestral(key(6), MIXED, **guided(1.5))) - np.asarray(plain))
    diff = diff.reshape(NB, -1).max(axis=1)
    c = np.asarray(MIXED)
    assert np.median(diff[c != NULL]) > 0.1  # classes 0 and 1 are pushed away from the mixture ...
    assert diff[c == NULL].max() < 1e-4      # ... while for k = ∅ the guided ε is the plain one


# ------------------------------------------------------------------------------------------------
# Classes from the prior, Markov states, sequences
# ------------------------------------------------------------------------------------------------


def test_sample_classes_and_sample_from_prior():
    pi = np.array([0.2, 0.5, 0.3])
    c = np.asarray(S.sample_classes(key(0), jnp.log(pi), 20000))
    assert c.dtype == np.int32 and c.shape == (20000,)
    np.testing.assert_allclose(np.bincount(c, minlength=3) / c.size, pi, atol=0.015)

    out = S.sample_from_prior(key(1), oracle_eps, None, SCHED, LOG_PI2, NB, EV, sampler="ddim",
                              num_steps=DDIM_STEPS)
    classes = np.asarray(out.classes)
    assert abs(np.mean(classes == 1) - 0.6) < 4 * np.sqrt(0.24 / NB)
    # Each image was generated under its class: its pixels lie on that component's side.
    right = np.asarray(out.images).reshape(NB, -1) > 0.25
    assert np.mean(right == (classes == 1)[:, None]) > 0.98


A3 = np.array([[0.8, 0.2, 0.0],
               [0.1, 0.6, 0.3],
               [0.35, 0.05, 0.6]])  # non-symmetric, with an impossible transition 0 -> 2
PI3 = np.array([0.5, 0.3, 0.2])


def transition_counts(states, num_states):
    counts = np.zeros((num_states, num_states))
    np.add.at(counts, (states[:, :-1].ravel(), states[:, 1:].ravel()), 1)
    return counts


def test_markov_states_match_pi_and_A():
    keys = jax.random.split(jax.random.key(0), 4000)  # threefry: rbg keys are not mapped key by key
    states = np.asarray(jax.vmap(lambda k: S.sample_markov_states(k, jnp.log(PI3), jnp.log(A3), 30))(keys))
    assert states.shape == (4000, 30) and states.dtype == np.int32
    np.testing.assert_allclose(np.bincount(states[:, 0], minlength=3) / 4000, PI3, atol=0.03)
    counts = transition_counts(states, 3)
    assert counts[0, 2] == 0  # log A = −inf is never taken
    freq = counts / counts.sum(1, keepdims=True)
    bound = 0.02  # ≥ 20k transitions per row: standard errors ≤ 0.004
    assert np.max(np.abs(freq - A3)) < bound
    assert np.max(np.abs(freq - A3.T)) > bound  # a sampler using A transposed fails this test


def test_generate_sequences_consistency():
    """States follow (π, A); frame (s, i) is an image of state (s, i), all frames from one batched
    sampler call over the flattened states."""
    out = S.generate_sequences(key(8), oracle_eps, None, SCHED, LOG_PI2, LOG_A2, NUM_SEQ, SEQ_LEN, EV)
    states = np.asarray(out.states)
    counts = transition_counts(states, 2)
    assert counts[1, 0] == 0
    assert abs(counts[0, 1] / counts[0].sum() - 0.5) < 0.15  # ≈ 100–200 transitions out of state 0
    assert abs(np.mean(states[:, 0] == 1) - 0.6) < 0.25  # x_1 ~ π (56 chains)
    # Frame (s, i) was generated under states[s, i]: its pixels lie on that component's side.
    right = np.asarray(out.images).reshape(NUM_SEQ, SEQ_LEN, -1) > 0.25
    assert np.mean(right == (states == 1)[..., None]) > 0.98
    flat_frames = ancestral(jax.random.split(key(8))[1], out.states.reshape(-1))
    np.testing.assert_array_equal(out.images.reshape(NB, *EV), flat_frames)


# ------------------------------------------------------------------------------------------------
# Reconstruction
# ------------------------------------------------------------------------------------------------


def test_reconstruct_small_t_returns_y():
    noise_sd = float(np.sqrt(1 - SCHED.alpha_bars[0]))  # 0.032 at t = 1 (T = 100)
    y = class_images(MIXED, seed=1)
    r = S.reconstruct(key(0), oracle_eps, None, SCHED, y, 1, MIXED)
    err = np.abs(np.asarray(r) - np.asarray(y))
    assert err.mean() < 1.1 * noise_sd and err.max() < 6 * noise_sd


def test_reconstruct_from_mid_t_denoises_under_the_chosen_class():
    """From t = T/2 (ᾱ ≈ 0.08) DDIM lands on the chosen class, whatever class y came from."""
    y = class_images(jnp.ones(NB, jnp.int32), seed=2)  # every pixel from component 1 (right)
    r = S.reconstruct(key(3), oracle_eps, None, SCHED, y, T // 2, MIXED, sampler="ddim", num_steps=10)
    right = np.asarray(r).reshape(NB, -1) > 0.25
    c = np.asarray(MIXED)
    assert right[c == 0].mean() < 0.02  # moved to the left component
    assert right[c == 1].mean() > 0.97  # stays right
    # Under ∅ (the mixture) y is only partly forgotten: more pixels stay right than the prior's 70 %.
    assert 0.7 < right[c == NULL].mean() < 0.97


@pytest.mark.slow  # one more compilation (reconstruct from t = T); the mid-t test covers the class
def test_reconstruct_at_T_is_a_fresh_sample_of_the_chosen_class(ancestral_by_class):
    y = jnp.full((NB, *EV), 3.0, jnp.float32)  # far outside the data: must be forgotten at t = T
    r = S.reconstruct(key(9), oracle_eps, None, SCHED, y, T, ALTERNATING)
    for k in (0, 1):
        rk = pixels(r, ALTERNATING, k)
        assert st.kstest(rk, st.norm(MU[k], SD[k]).cdf).statistic < 0.035
        assert st.ks_2samp(rk, pixels(ancestral_by_class, ALTERNATING, k)).pvalue > 1e-3


# ------------------------------------------------------------------------------------------------
# Slow: long statistical runs at the usual scale (T = 1000, 10⁵ samples)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_slow_samplers_match_mixture_t1000():
    sched = D.linear_schedule(1000)
    eps_fn = lambda p, z, t, k: _oracle(sched, z, t, k)  # noqa: E731
    n = 100_000
    classes = jnp.full((n,), NULL, jnp.int32)
    a = pixels(S.ancestral_sample(key(20), eps_fn, None, sched, classes, (1,)))
    d = pixels(S.ddim_sample(key(21), eps_fn, None, sched, classes, (1,), num_steps=1000, eta=1.0))
    y = pixels(S.ddim_sample(key(22), eps_fn, None, sched, classes, (1,), num_steps=100, eta=0.0))
    crit = 1.95 / np.sqrt(n)  # level 1e-3
    assert st.kstest(a, mixture_cdf).statistic < crit + 0.003
    assert st.kstest(d, mixture_cdf).statistic < crit + 0.003
    assert st.ks_2samp(a, d).pvalue > 1e-3
    assert st.kstest(y, mixture_cdf).statistic < crit + 0.005


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def _classes(*c):
    return jnp.array(c, jnp.int32)


@pytest.mark.parametrize("call, message", [
    (lambda: S.ddim_sample(key(0), oracle_eps, None, SCHED, _classes(0), (1,), num_steps=T + 1),
     "num_steps"),
    (lambda: S.ddim_sample(key(0), oracle_eps, None, SCHED, _classes(0), (1,), num_steps=0),
     "num_steps"),
    (lambda: S.ddim_sample(key(0), oracle_eps, None, SCHED, _classes(0), (1,), num_steps=5,
                           eta=-0.1), "eta"),
    (lambda: S.ddim_sample(key(0), oracle_eps, None, SCHED, _classes(0), (1,), num_steps=5,
                           eta=1.5), "eta"),
    (lambda: S.reconstruct(key(0), oracle_eps, None, SCHED, jnp.zeros((1, 1)), 0, _classes(0)),
     "t must"),
    (lambda: S.reconstruct(key(0), oracle_eps, None, SCHED, jnp.zeros((1, 1)), T + 1,
                           _classes(0)), "t must"),
    (lambda: S.reconstruct(key(0), oracle_eps, None, SCHED, jnp.zeros((2, 1)), 5, _classes(0)),
     "classes"),
    (lambda: S.reconstruct(key(0), oracle_eps, None, SCHED, jnp.zeros((1, 1)), 5, _classes(0),
                           sampler="ddim", num_steps=6), "num_steps"),
    (lambda: S.ancestral_sample(key(0), oracle_eps, None, SCHED, jnp.zeros((2, 2), jnp.int32),
                                (1,)), "classes"),
    (lambda: S.ancestral_sample(key(0), oracle_eps, None, SCHED, _classes(-1), (1,)), ">= 0"),
    (lambda: S.ancestral_sample(key(0), oracle_eps, None, SCHED, _classes(3), (1,),
                                guidance_weight=1.0, null_class=NULL), "null_class"),
    (lambda: S.ancestral_sample(key(0), oracle_eps, None, SCHED, _classes(0), (1,),
                                guidance_weight=1.0), "null_class"),
    (lambda: S.ancestral_sample(key(0), oracle_eps, None, SCHED, _classes(0), (1,),
                                variance="sigma"), "variance"),
    (lambda: S.ancestral_sample(key(0), oracle_eps, None, SCHED, _classes(0), ()), "event_shape"),
    (lambda: S.sample_from_prior(key(0), oracle_eps, None, SCHED, jnp.log(jnp.array([.5, .5])),
                                 4, (1,), num_steps=5), "ddim"),
    (lambda: S.sample_from_prior(key(0), oracle_eps, None, SCHED, jnp.log(jnp.array([.5, .5])),
                                 4, (1,), sampler="ddim"), "needs num_steps"),
    (lambda: S.sample_from_prior(key(0), oracle_eps, None, SCHED, jnp.log(jnp.array([.5, .5])),
                                 4, (1,), sampler="ddim", num_steps=5, variance="beta"), "variance"),
    (lambda: S.sample_from_prior(key(0), oracle_eps, None, SCHED, jnp.log(jnp.array([.5, .5])),
                                 4, (1,), sampler="ddpm"), "sampler"),
    (lambda: S.sample_from_prior(key(0), oracle_eps, None, SCHED, jnp.log(jnp.array([.5, .5])),
                                 4, (1,), guidance_weight=1.0, null_class=3), "null_class"),
    (lambda: S.sample_classes(key(0), jnp.log(jnp.array([0.5, 0.6])), 4), "normalised"),
    (lambda: S.sample_markov_states(key(0), jnp.log(jnp.array(PI3)), jnp.log(jnp.eye(2)), 4),
     "log_A"),
    (lambda: S.sample_markov_states(key(0), jnp.log(jnp.array(PI3)), jnp.log(A3 * 1.1), 4),
     "normalised"),
    (lambda: S.sample_markov_states(key(0), jnp.log(jnp.array(PI3)), jnp.log(A3), 0), "length"),
    (lambda: S.generate_sequences(key(0), oracle_eps, None, SCHED, jnp.log(jnp.array(PI3)),
                                  jnp.log(A3), 0, 4, (1,)), "num_sequences"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
