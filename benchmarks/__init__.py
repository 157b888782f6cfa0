"""Speed benchmarks: the compiled JAX steps side by side with eager PyTorch (see README.md)."""
