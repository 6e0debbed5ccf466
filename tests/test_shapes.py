"""The jaxtyping shape annotations of the core's public functions, checked with beartype: calls with
consistent shapes pass, a mismatched dimension is named in a type-check error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from hmdm_jax import diffusion, emission, hmm

K, N = 3, 5
pytestmark = pytest.mark.filterwarnings("ignore::beartype.roar.BeartypeDecorHintPep585DeprecationWarning")


def checked(fn):
    return jaxtyped(typechecker=beartype)(getattr(fn, "__wrapped__", fn))  # the function under jax.jit


def hmm_inputs(k_b=K, n_mask=N):
    rng = np.random.default_rng(0)
    log_pi = jnp.log(jnp.full(K, 1 / K))
    log_A = jnp.log(jnp.asarray(rng.dirichlet(np.ones(K), K), jnp.float32))
    return log_pi, log_A, jnp.asarray(rng.normal(size=(N, k_b)), jnp.float32), jnp.ones(n_mask, bool)


@pytest.mark.parametrize("name", ["forward_filter", "viterbi", "smooth", "expected_counts"])
def test_hmm_annotations_accept_consistent_and_reject_mismatched_shapes(name):
    fn = checked(getattr(hmm, name))
    fn(*hmm_inputs())
    fn(*hmm_inputs()[:3])  # mask is optional
    with pytest.raises(TypeCheckError):
        fn(*hmm_inputs(k_b=K + 1))  # log_b has K + 1 classes
    with pytest.raises(TypeCheckError):
        fn(*hmm_inputs(n_mask=N + 1))  # the mask is longer than the sequence


def test_ffbs_and_path_counts_annotations():
    log_pi, log_A, log_b, mask = hmm_inputs()
    sample = checked(hmm.ffbs)(jax.random.PRNGKey(0), log_pi, log_A, log_b, mask)
    checked(hmm.path_counts)(sample.states, K, mask)
    with pytest.raises(TypeCheckError):
        checked(hmm.path_counts)(sample.states, K, jnp.ones(N + 2, bool))


def test_emission_and_diffusion_annotations():
    schedule = diffusion.linear_schedule(50)
    eps_fn = lambda params, z, t, k: z * params
    y = jnp.zeros((4, 2))
    out = checked(emission.log_emission)(eps_fn, 1.0, schedule, y, jax.random.PRNGKey(0), K, num_t=1)
    assert out.shape == (4, K)
    with pytest.raises(TypeCheckError):
        checked(emission.log_emission)(eps_fn, 1.0, schedule, y, jax.random.split(jax.random.PRNGKey(0), 3), K)
    checked(diffusion.q_sample)(schedule, y, 3, jnp.ones((4, 2)))
    with pytest.raises(TypeCheckError):
        checked(diffusion.q_sample)(schedule, y, 3, jnp.ones((4, 3)))
