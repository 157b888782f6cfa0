"""score_jax: SCORE adversarial training (Pang et al., ICML 2022) in JAX/Flax."""

__version__ = "0.1.0"
