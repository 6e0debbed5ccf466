"""Tests of hmdm_jax.hmm against brute-force enumeration of all K^n hidden paths.

Emissions come in three flavours: small log-likelihoods, diffusion-sized ones (≈ −1e5 with gaps of
hundreds to thousands of nats between classes) and clamped frames (−inf everywhere but one class).
Parameters are rounded to float32 before the float64 brute force, so both see the same numbers.
The sampler is checked by path frequencies against the exact path posterior, with a bound that
deliberately broken samplers (A transposed, transition or filtered index shifted by one frame) fail.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from hmdm_jax import hmm

EMISSIONS = ("plain", "diffusion", "clamped")


# ----------------------------------------------------------------------------------------------
# Problems and the brute force
# ----------------------------------------------------------------------------------------------


def f32(x):
    """Rounds to float32 and back, so that the float64 reference sees exactly our inputs."""
    return np.asarray(x, np.float32).astype(np.float64)


def make_hmm(seed, num_states=3, length=6, time_varying=False, emissions="plain", concentration=1.0):
    """Random (log_pi [K], log_A [K, K] or [n − 1, K, K], log_b [n, K]) as float32-exact float64."""
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.full(num_states, concentration))
    shape = (length - 1, num_states) if time_varying else (num_states,)
    A = rng.dirichlet(np.full(num_states, concentration), size=shape)
    log_b = rng.normal(scale=2.0, size=(length, num_states))
    if emissions in ("diffusion", "clamped"):
        # Most classes within a few nats of each other, some hundreds or thousands behind.
        gaps = rng.choice([0.0, 0.0, 0.0, -300.0, -1500.0], size=(length, num_states))
        log_b = -1e5 + 3.0 * log_b + gaps
    if emissions == "clamped":
        for frame in rng.choice(length, size=max(1, length // 3), replace=False):
            keep = rng.integers(num_states)
            log_b[frame] = np.where(np.arange(num_states) == keep, log_b[frame], -np.inf)
    return f32(np.log(pi)), f32(np.log(A)), f32(log_b)


def brute_force(log_pi, log_A, log_b):
    """Everything by enumeration, float64: a dict of exact references."""
    length, num_states = log_b.shape
    paths = np.array(list(itertools.product(range(num_states), repeat=length)))
    frames = np.arange(length)
    # prefix[p, i] = log p(y_1..y_i, x_1..x_i) along path p.
    steps = np.empty(paths.shape)
    steps[:, 0] = log_pi[paths[:, 0]]
    for l in range(length - 1):
        A_l = log_A[l] if log_A.ndim == 3 else log_A
        steps[:, l + 1] = A_l[paths[:, l], paths[:, l + 1]]
    with np.errstate(invalid="ignore"):
        prefix = np.cumsum(steps + log_b[frames, paths], axis=1)
    log_joint = prefix[:, -1]
    log_marginal = logsumexp(log_joint)
    weights = np.exp(log_joint - log_marginal)

    log_alpha = np.full((length, num_states), -np.inf)
    marginals = np.zeros((length, num_states))
    for i in range(length):
        repeats = (length - i - 1) * np.log(num_states)  # each prefix appears K^(n−i−1) times
        for k in range(num_states):
            on = paths[:, i] == k
            log_alpha[i, k] = logsumexp(prefix[on, i]) - repeats
            marginals[i, k] = weights[on].sum()
    transitions = np.zeros((num_states, num_states))
    for l in range(length - 1):
        np.add.at(transitions, (paths[:, l], paths[:, l + 1]), weights)
    best = np.argmax(log_joint)
    return dict(
        paths=paths, path_probs=weights, log_marginal=log_marginal, log_alpha=log_alpha, marginals=marginals,
        initial=marginals[0], transitions=transitions, viterbi=paths[best], viterbi_score=log_joint[best],
    )


def as32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def all_results(key, log_pi, log_A, log_b, mask=None):
    """Every inference result for one sequence (jitted as one program below: one compilation)."""
    return dict(
        forward_filter=hmm.forward_filter(log_pi, log_A, log_b, mask),
        viterbi=hmm.viterbi(log_pi, log_A, log_b, mask),
        smooth=hmm.smooth(log_pi, log_A, log_b, mask),
        expected_counts=hmm.expected_counts(log_pi, log_A, log_b, mask),
        ffbs=hmm.ffbs(key, log_pi, log_A, log_b, mask),
    )


results = jax.jit(all_results)


def assert_log_close(actual, expected, rtol):
    """Equal −inf pattern, finite entries within rtol (relative to each value's own magnitude)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Exactness against the brute force
# ----------------------------------------------------------------------------------------------


def check_against_brute_force(params, ref, rtol, atol):
    log_b = params[2]
    res = results(jax.random.PRNGKey(0), *params)
    out = res["forward_filter"]
    assert_log_close(out.log_alpha, ref["log_alpha"], rtol)
    np.testing.assert_allclose(out.log_marginal, ref["log_marginal"], rtol=rtol)

    path = res["viterbi"]
    np.testing.assert_array_equal(path.states, ref["viterbi"])
    np.testing.assert_allclose(path.log_joint, ref["viterbi_score"], rtol=rtol)

    np.testing.assert_allclose(res["smooth"], ref["marginals"], rtol=0, atol=atol)
    counts = res["expected_counts"]
    np.testing.assert_allclose(counts.initial, ref["initial"], rtol=0, atol=atol)
    np.testing.assert_allclose(counts.transitions, ref["transitions"], rtol=0, atol=atol * log_b.shape[0])
    np.testing.assert_allclose(res["ffbs"].log_marginal, ref["log_marginal"], rtol=rtol)


@pytest.mark.parametrize("emissions", EMISSIONS)
@pytest.mark.parametrize("time_varying", [False, True])
def test_exact_float32(emissions, time_varying):
    params = make_hmm(1, time_varying=time_varying, emissions=emissions)
    ref = brute_force(*params)
    # float32 results: relative rounding ≈ 1e-7 per operation on values up to 6e5 in magnitude.
    check_against_brute_force(as32(*params), ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("time_varying", [pytest.param(False, marks=pytest.mark.slow), True])
def test_exact_float64(time_varying, emissions="clamped"):
    """With x64 every result matches the enumeration to 1e-9 (the float64 brute force itself only
    resolves ≈1e-10 at −6e5): the algorithm is exact, float32 rounding is its only error."""
    params = make_hmm(2, time_varying=time_varying, emissions=emissions)
    ref = brute_force(*params)
    with jax.enable_x64(True):
        params64 = tuple(jnp.asarray(p, jnp.float64) for p in params)
        assert hmm.forward_filter(*params64).log_alpha.dtype == jnp.float64
        check_against_brute_force(params64, ref, rtol=1e-9, atol=1e-9)


def test_exact_large_k():
    """K = 20, above the small-K formulations (dot products, recomputed Viterbi pointers)."""
    params = make_hmm(3, num_states=20, length=3, time_varying=True, emissions="clamped")
    check_against_brute_force(as32(*params), brute_force(*params), rtol=2e-6, atol=2e-6)


def test_log_alpha_keeps_entries_far_below_the_maximum():
    """A class 1500 nats behind is a finite log_alpha entry, not −inf (no underflow in log outputs)."""
    log_pi, log_A, log_b = make_hmm(4, emissions="plain")
    log_b[:, 1] -= 1500.0
    log_b -= 1e5
    ref = brute_force(log_pi, log_A, log_b)
    out = hmm.forward_filter(*as32(log_pi, log_A, log_b))
    assert np.all(np.isfinite(out.log_alpha))
    assert_log_close(out.log_alpha, ref["log_alpha"], rtol=2e-6)


def test_tiny_transition_column_does_not_underflow():
    """A state entered with probability e^−200 (below float32's range) and then clamped."""
    log_pi, log_A, log_b = make_hmm(5)
    log_A[:, 2] = -200.0
    log_A[:, :2] -= logsumexp(log_A[:, :2], axis=1, keepdims=True)  # rows still sum to 1
    log_A = f32(log_A)
    log_b[3] = [-np.inf, -np.inf, 0.0]
    ref = brute_force(log_pi, log_A, log_b)
    check_against_brute_force(as32(log_pi, log_A, log_b), ref, rtol=2e-6, atol=2e-6)


def test_no_nan_when_padding_holds_garbage_and_clamps_everywhere():
    log_pi, log_A, log_b = make_hmm(6, emissions="clamped")
    log_b = np.where(np.isfinite(log_b), log_b, -np.inf)
    log_b[:, 0] = -np.inf  # class 0 impossible everywhere
    log_b[4:] = np.nan  # padding may hold anything
    mask = np.arange(6) < 4
    for leaf in jax.tree_util.tree_leaves(results(jax.random.PRNGKey(0), *as32(log_pi, log_A, log_b), mask)):
        assert not np.any(np.isnan(leaf))


# ----------------------------------------------------------------------------------------------
# Masks: padded == truncated
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("valid", [1, 4, 6])
def test_mask_equals_truncation(time_varying, valid):
    log_pi, log_A, log_b = make_hmm(7, time_varying=time_varying, emissions="clamped")
    length = log_b.shape[0]
    mask = np.arange(length) < valid
    padded = log_b.copy()
    padded[valid:] = 123.0  # would dominate everything if it leaked
    short_A = log_A[: valid - 1] if time_varying else log_A
    ref = brute_force(log_pi, short_A, log_b[:valid])
    res = results(jax.random.PRNGKey(0), *as32(log_pi, log_A, padded), jnp.asarray(mask))

    out = res["forward_filter"]
    assert_log_close(out.log_alpha[:valid], ref["log_alpha"], rtol=2e-6)
    assert np.all(np.isneginf(out.log_alpha[valid:]))
    np.testing.assert_allclose(out.log_marginal, ref["log_marginal"], rtol=2e-6)

    path = res["viterbi"]
    np.testing.assert_array_equal(path.states[:valid], ref["viterbi"])
    np.testing.assert_array_equal(path.states[valid:], -1)
    np.testing.assert_allclose(path.log_joint, ref["viterbi_score"], rtol=2e-6)

    marginals = res["smooth"]
    np.testing.assert_allclose(marginals[:valid], ref["marginals"], atol=2e-6)
    np.testing.assert_array_equal(marginals[valid:], 0.0)

    counts = res["expected_counts"]
    np.testing.assert_allclose(counts.initial, ref["initial"], atol=2e-6)
    np.testing.assert_allclose(counts.transitions, ref["transitions"], atol=1e-5)
    assert float(np.sum(counts.transitions)) == pytest.approx(valid - 1, abs=1e-5)

    states = res["ffbs"].states
    assert np.all(np.asarray(states[valid:]) == -1) and np.all(np.asarray(states[:valid]) >= 0)


def test_all_padded_sequence():
    res = results(jax.random.PRNGKey(0), *as32(*make_hmm(8)), jnp.zeros(6, bool))
    assert float(res["forward_filter"].log_marginal) == 0.0
    assert np.all(np.isneginf(res["forward_filter"].log_alpha))
    np.testing.assert_array_equal(res["viterbi"].states, -1)
    np.testing.assert_array_equal(res["ffbs"].states, -1)
    np.testing.assert_array_equal(res["smooth"], 0.0)
    np.testing.assert_array_equal(res["expected_counts"].transitions, 0.0)


# ----------------------------------------------------------------------------------------------
# Counts from paths
# ----------------------------------------------------------------------------------------------


def test_path_counts():
    states = jnp.array([2, 0, 0, 1, -1, -1], jnp.int32)
    counts = hmm.path_counts(states, 3)
    np.testing.assert_array_equal(counts.initial, [0, 0, 1])
    expected = np.zeros((3, 3))
    expected[2, 0] = expected[0, 0] = expected[0, 1] = 1
    np.testing.assert_array_equal(counts.transitions, expected)
    masked = hmm.path_counts(jnp.array([2, 0, 0, 1, 1, 1], jnp.int32), 3, jnp.arange(6) < 4)
    np.testing.assert_array_equal(masked.transitions, expected)
    batched = jax.vmap(hmm.path_counts, (0, None))(jnp.stack([states, states]), 3)
    np.testing.assert_array_equal(batched.transitions[1], expected)


def test_expected_counts_are_the_mean_of_path_counts():
    """E[path_counts(x)] under the exact posterior equals expected_counts (brute force)."""
    params = make_hmm(9, time_varying=True)
    ref = brute_force(*params)
    counts = jax.vmap(hmm.path_counts, (0, None))(jnp.asarray(ref["paths"], jnp.int32), 3)
    weights = ref["path_probs"][:, None, None]
    mean_transitions = np.sum(np.asarray(counts.transitions, np.float64) * weights, axis=0)
    np.testing.assert_allclose(mean_transitions, ref["transitions"], atol=1e-10)
    np.testing.assert_allclose(hmm.expected_counts(*as32(*params)).transitions, mean_transitions, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Sampling: path frequencies against the exact posterior
# ----------------------------------------------------------------------------------------------

NUM_DRAWS = 40_000


def path_index(states, num_states):
    """Row-major index of each path (matches itertools.product in brute_force)."""
    states = np.asarray(states)
    return states @ (num_states ** np.arange(states.shape[1] - 1, -1, -1))


def total_variation(states, probs, num_states):
    freq = np.bincount(path_index(states, num_states), minlength=probs.size) / states.shape[0]
    return 0.5 * np.abs(freq - probs).sum()


def tv_bound(probs, num_draws, seed=0):
    """99.9% quantile of the total variation of num_draws exact draws (simulated multinomials)."""
    rng = np.random.default_rng(seed)
    probs = probs / probs.sum()
    counts = rng.multinomial(num_draws, np.append(probs[:-1], 0.0), size=1000)  # last = the rest
    counts[:, -1] = num_draws - counts[:, :-1].sum(axis=1)
    tvs = 0.5 * np.abs(counts / num_draws - probs).sum(axis=1)
    return np.quantile(tvs, 0.999)


def sampler_problem(time_varying):
    """Strongly asymmetric transitions and weak emissions: the posterior depends on A's direction."""
    return make_hmm(10, time_varying=time_varying, concentration=0.3)


def draws_from_backward_sample(log_alpha, log_A, num_draws=NUM_DRAWS, mask=None):
    keys = jax.random.split(jax.random.PRNGKey(42), num_draws)
    return jax.vmap(hmm.backward_sample, (0, None, None, None))(keys, log_alpha, log_A, mask)


@pytest.mark.parametrize("time_varying", [False, True])
def test_ffbs_matches_exact_path_posterior(time_varying):
    params = sampler_problem(time_varying)
    ref = brute_force(*params)
    keys = jax.random.split(jax.random.PRNGKey(0), NUM_DRAWS)
    out = jax.vmap(hmm.ffbs, (0, None, None, None))(keys, *as32(*params))
    np.testing.assert_allclose(out.log_marginal, ref["log_marginal"], rtol=1e-5)
    assert total_variation(out.states, ref["path_probs"], 3) < tv_bound(ref["path_probs"], NUM_DRAWS)


@pytest.mark.parametrize("time_varying", [False, True])
def test_sampler_bound_has_power(time_varying):
    """The correct sampler passes the bound; the same sampler fed the classic bugs fails it."""
    log_pi, log_A, log_b = as32(*sampler_problem(time_varying))
    ref = brute_force(*sampler_problem(time_varying))
    bound = tv_bound(ref["path_probs"], NUM_DRAWS)
    log_alpha = hmm.forward_filter(log_pi, log_A, log_b).log_alpha

    correct = draws_from_backward_sample(log_alpha, log_A)
    assert total_variation(correct, ref["path_probs"], 3) < bound

    buggy = {
        "A transposed": (log_alpha, jnp.swapaxes(log_A, -1, -2)),
        # x_l drawn from alpha_{l−1}: filtered index one frame late.
        "filtered shifted": (jnp.concatenate([log_alpha[:1], log_alpha[:-1]]), log_A),
    }
    if time_varying:
        # dynamax's old bug: alpha_l paired with A_{l+1} (index clamped at the end, as JAX does).
        buggy["transition shifted"] = (log_alpha, jnp.concatenate([log_A[1:], log_A[-1:]]))
    for name, (rows, transitions) in buggy.items():
        tv = total_variation(draws_from_backward_sample(rows, transitions), ref["path_probs"], 3)
        assert tv > 2 * bound, f"the bound cannot detect '{name}' (TV {tv:.4f}, bound {bound:.4f})"


@pytest.mark.parametrize("time_varying", [False, True])
def test_ffbs_with_mask_samples_the_truncated_posterior(time_varying):
    log_pi, log_A, log_b = sampler_problem(time_varying)
    valid = 4
    short_A = log_A[: valid - 1] if time_varying else log_A
    ref = brute_force(log_pi, short_A, log_b[:valid])
    mask = jnp.arange(6) < valid
    keys = jax.random.split(jax.random.PRNGKey(1), NUM_DRAWS)
    out = jax.vmap(hmm.ffbs, (0, None, None, None, None))(keys, *as32(log_pi, log_A, log_b), mask)
    states = np.asarray(out.states)
    assert np.all(states[:, valid:] == -1)
    assert total_variation(states[:, :valid], ref["path_probs"], 3) < tv_bound(ref["path_probs"], NUM_DRAWS)


def test_ffbs_respects_clamps_and_diffusion_scale():
    params = make_hmm(11, emissions="clamped")
    ref = brute_force(*params)
    log_b = params[2]
    keys = jax.random.split(jax.random.PRNGKey(2), NUM_DRAWS)
    states = np.asarray(jax.vmap(hmm.ffbs, (0, None, None, None))(keys, *as32(*params)).states)
    clamped = np.where(np.sum(np.isfinite(log_b), axis=1) == 1)[0]
    np.testing.assert_array_equal(states[:, clamped], np.argmax(log_b[clamped], axis=1)[None].repeat(NUM_DRAWS, 0))
    assert total_variation(states, ref["path_probs"], 3) < tv_bound(ref["path_probs"], NUM_DRAWS)


def test_sampler_large_k_marginals():
    """K = 70 (the cumsum branch of the sampler): frame-0 frequencies against the exact marginal."""
    params = make_hmm(12, num_states=70, length=2, concentration=0.3)
    ref = brute_force(*params)
    keys = jax.random.split(jax.random.PRNGKey(3), NUM_DRAWS)
    states = np.asarray(jax.vmap(hmm.ffbs, (0, None, None, None))(keys, *as32(*params)).states)
    probs = ref["marginals"][0]
    freq = np.bincount(states[:, 0], minlength=70) / NUM_DRAWS
    assert 0.5 * np.abs(freq - probs).sum() < tv_bound(probs, NUM_DRAWS)


# ----------------------------------------------------------------------------------------------
# Batching, jit, gradients
# ----------------------------------------------------------------------------------------------


def test_vmap_equals_loop_and_jit():
    batch = [make_hmm(20 + b, time_varying=True, emissions="clamped") for b in range(4)]
    log_pi = jnp.asarray(batch[0][0], jnp.float32)
    log_A = jnp.asarray(np.stack([p[1] for p in batch]), jnp.float32)
    log_b = jnp.asarray(np.stack([p[2] for p in batch]), jnp.float32)
    mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [5], [2], [6]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    batched = jax.jit(jax.vmap(all_results, (0, None, 0, 0, 0)))(keys, log_pi, log_A, log_b, mask)
    for b in range(4):
        single = results(keys[b], log_pi, log_A[b], log_b[b], mask[b])
        for name, value in single.items():
            for got, want in zip(jax.tree_util.tree_leaves(batched[name]), jax.tree_util.tree_leaves(value)):
                np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_gradient_of_log_marginal_is_the_smoothed_marginal():
    """d log p(y) / d log_b[i, k] = p(x_i = k | y): the filter is differentiable and exact."""
    log_pi, log_A, log_b = as32(*make_hmm(13, time_varying=True, emissions="diffusion"))
    mask = jnp.arange(6) < 5
    grad = jax.grad(lambda b: hmm.forward_filter(log_pi, log_A, b, mask).log_marginal)(log_b)
    np.testing.assert_allclose(grad, hmm.smooth(log_pi, log_A, log_b, mask), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(log_pi=np.zeros(4)), "K mismatch"),
        (dict(log_pi=np.zeros((1, 3))), "log_pi must have shape"),
        (dict(log_A=np.zeros((4, 4))), r"log_A must have shape \[K, K\]"),
        (dict(log_A=np.zeros(3)), "rank 2"),
        (dict(log_A=np.zeros((4, 3, 3))), "n - 1 = 5"),
        (dict(log_A=np.zeros((5, 4, 4))), "K mismatch"),
        (dict(log_b=np.zeros((2, 6, 3))), "vmap"),
        (dict(log_b=np.zeros((0, 3)), log_A=np.zeros((3, 3))), "at least one frame"),
        (dict(mask=np.ones(5, bool)), r"mask must have shape \[n\]"),
        (dict(mask=np.ones(6, np.int32)), "mask must be a bool"),
    ],
)
def test_shape_errors(change, message):
    args = dict(log_pi=np.zeros(3), log_A=np.zeros((3, 3)), log_b=np.zeros((6, 3)), mask=None)
    args.update(change)
    for fn in (hmm.forward_filter, hmm.viterbi, hmm.smooth, hmm.expected_counts):
        with pytest.raises(ValueError, match=message):
            fn(**args)
    with pytest.raises(ValueError, match=message):
        hmm.ffbs(jax.random.PRNGKey(0), **args)
    # Shapes are static, so the same errors are raised while tracing inside jit.
    with pytest.raises(ValueError, match=message):
        jax.jit(lambda a: hmm.forward_filter(**a))(args)


def test_backward_sample_and_path_counts_errors():
    with pytest.raises(ValueError, match="log_alpha must have shape"):
        hmm.backward_sample(jax.random.PRNGKey(0), np.zeros(3), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"log_A must have shape \[K, K\]"):
        hmm.backward_sample(jax.random.PRNGKey(0), np.zeros((6, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="integers"):
        hmm.path_counts(np.zeros(4, np.float32), 3)
    with pytest.raises(ValueError, match="num_classes"):
        hmm.path_counts(np.zeros(4, np.int32), 0)


def test_check_hmm_params():
    log_pi, log_A, log_b = make_hmm(14, time_varying=True)
    hmm.check_hmm_params(log_pi, log_A, log_b=log_b)  # valid: no error
    hmm.check_hmm_params(log_pi, log_A[0])
    bad_A = log_A.copy()
    bad_A[2, 1] += 0.1
    with pytest.raises(ValueError, match=r"log_A\[2\], row 1"):
        hmm.check_hmm_params(log_pi, bad_A)
    with pytest.raises(ValueError, match="row 1 sums to"):
        hmm.check_hmm_params(log_pi, bad_A[2])
    with pytest.raises(ValueError, match="exp\\(log_pi\\) must sum to 1"):
        hmm.check_hmm_params(log_pi + 0.1, log_A)
    nan_A = log_A.copy()
    nan_A[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hmm.check_hmm_params(log_pi, nan_A)
    dead = log_b.copy()
    dead[3] = -np.inf
    with pytest.raises(ValueError, match="frame 3"):
        hmm.check_hmm_params(log_pi, log_A, log_b=dead)
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda p: hmm.check_hmm_params(p, log_A[0]))(log_pi)


def test_unnormalised_parameters_inside_jit_give_the_unnormalised_sum():
    """The documented contract: no value checks inside jit; the formulas run on the weights given."""
    log_pi, log_A, log_b = make_hmm(15)
    log_A = log_A + 0.5  # every row now sums to e^0.5
    ref = brute_force(log_pi, log_A, log_b)
    out = hmm.forward_filter(*as32(log_pi, log_A, log_b))
    np.testing.assert_allclose(out.log_marginal, ref["log_marginal"], rtol=1e-6)
