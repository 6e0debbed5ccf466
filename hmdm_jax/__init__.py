"""hmdm_jax: mixtures of diffusion models and hidden Markov diffusion models in JAX."""
__version__ = "0.1.0"
